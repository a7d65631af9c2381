"""The background load of the timing check (benchmarks/background_load.py): phases in
turn, on first, for the time asked, then every worker stopped."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.background_load", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_the_load_alternates_on_and_off_for_its_duration():
    started = time.monotonic()
    done = _run("--workers", "1", "--on", "0.5", "--off", "0.3", "--duration", "1.2")
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    states = [line.split()[2] for line in done.stdout.splitlines()]
    assert states == ["on", "off", "on"]
    assert 1.2 <= elapsed < 30


@pytest.mark.parametrize("args, message", [
    (("--workers", "0"), "--workers 0 must be >= 1"),
    (("--on", "0"), "--on 0 must be > 0 seconds"),
    (("--off", "soon"), "'soon' is not a number of seconds"),
    (("--duration", "-1"), "'-1' must be >= 0 seconds"),
])
def test_bad_values_are_named(args, message):
    done = _run(*args)
    assert done.returncode == 2
    assert message in done.stderr


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has stopped; only its exit status is left


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_kill_stops_the_load_and_its_workers():
    load = subprocess.Popen([sys.executable, "-m", "benchmarks.background_load", "--workers", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    first = load.stdout.readline()
    assert first.split()[1:3] == ["load", "on"]
    pids = [int(p) for p in first.split(":", 3)[3].strip(" )\n").split()]
    assert len(pids) == 2 and all(_running(pid) for pid in pids)
    load.kill()
    load.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in pids)
