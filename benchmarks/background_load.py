"""A background load that starts and stops: the check of the timing protocol under a
machine whose speed changes during the session ([docs/timing.md](../docs/timing.md)).

    python -m benchmarks.background_load --workers 2 --on 45 --off 45 &
    make bench NAME=loaded
    kill %1
    pytest-specdec compare .benchmarks/*/*_quiet.json .benchmarks/*/*_loaded.json

Each of `--workers` processes spins on pure Python while the load is on and sleeps
while it is off; the phases alternate, on first, until `--duration` seconds have passed
(0: until stopped: Ctrl-C, or `kill`, after which the workers notice their parent is gone
and stop within a second). Each phase change is printed with its time and the workers'
process ids, so a run's cases can be matched with the phases they ran in.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from typing import Sequence


def _spin(until: float, parent: int) -> None:
    """Busy work until the monotonic clock reads `until` or the parent is gone."""
    counter = 0
    while time.monotonic() < until and os.getppid() == parent:
        for _ in range(10_000):
            counter += 1


def _worker(on: float, off: float, start: float, end: float, parent: int) -> None:
    """On and off in turn until `end` (0: never), or until the parent process is gone:
    a killed load leaves no busy orphan behind."""
    period = on + off
    while os.getppid() == parent:
        now = time.monotonic()
        if end and now >= end:
            return
        phase = (now - start) % period
        if phase < on:
            _spin(min(now + on - phase, end or float("inf")), parent)
        else:
            time.sleep(min(period - phase, (end - now) if end else period, 0.5))


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0 seconds")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.background_load",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2,
                        help="busy processes while the load is on (default 2: both cores here)")
    parser.add_argument("--on", type=_positive, default=45.0, help="seconds on (default 45)")
    parser.add_argument("--off", type=_positive, default=45.0, help="seconds off (default 45)")
    parser.add_argument("--duration", type=_positive, default=0.0,
                        help="seconds in all (default 0: until stopped)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers} must be >= 1")
    if args.on <= 0:
        parser.error(f"--on {args.on:g} must be > 0 seconds")
    start = time.monotonic()
    end = start + args.duration if args.duration else 0.0
    workers = [multiprocessing.Process(target=_worker, daemon=True,
                                       args=(args.on, args.off, start, end, os.getpid()))
               for _ in range(args.workers)]
    for worker in workers:
        worker.start()
    pids = " ".join(str(w.pid) for w in workers)
    try:
        at, on = 0.0, True  # the schedule, not the clock, decides the phases printed
        while not end or at < args.duration:
            print(f"{time.strftime('%H:%M:%S')} load {'on' if on else 'off'} "
                  f"({args.workers} workers: {pids})", flush=True)
            at += args.on if on else args.off
            on = not on or args.off == 0
            stop = start + (min(at, args.duration) if end else at)
            time.sleep(max(0.0, stop - time.monotonic()))
    except KeyboardInterrupt:
        pass
    finally:
        for worker in workers:
            worker.terminate()
            worker.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
