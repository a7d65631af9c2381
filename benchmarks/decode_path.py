"""The decode paths side by side: what one target forward costs on the eager and the
compiled path, and how far the decode step is from the machine's memory limit.

    python -m benchmarks.decode_path [--target embedded] [--dtype float32] [--rounds 5]

For each path it reports, as medians over interleaved rounds (the paths alternate, so a
machine whose speed drifts slows both alike):

- the decode step: a one-token forward after ``--context`` tokens;
- the verify cost of widths 2..64 in decode steps (a forward of w tokens ÷ a one-token
  forward on the same path);
- the memory limit of a step (the bandwidth probe of the report's machine line:
  ``bench.machine.measure_memory_limit``), and limit ÷ step (1.0: the step runs at the
  memory limit);
- the compile time of the compiled path's graphs (inductor's cache warm or cold, as the
  machine has it).

Nothing here is a test: speed claims live in benchmarks, measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from pytest_specdec.bench.machine import measure_memory_limit
from pytest_specdec.engine.target import load_target

WIDTHS = (1, 2, 4, 8, 16, 32, 64)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_s(target: Any, context: list[int], width: int, repeats: int) -> float:
    """The median seconds of a `width`-token forward after `context` (rolled back each time)."""
    cache = target.new_cache(len(context) + 256)
    target.forward(context, cache, keep_logits=1)
    times = []
    for _ in range(repeats):
        _sync(target.device)
        started = time.perf_counter()
        logits, _ = target.forward(context[:width], cache, keep_logits=1)
        _sync(target.device)
        times.append(time.perf_counter() - started)
        cache.crop(-width)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="embedded")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    paths = {name: load_target(args.target, device=args.device, dtype=args.dtype, engine=name)
             for name in ("eager", "compiled")}
    compiled = paths["compiled"]
    compiled.model = paths["eager"].model  # one copy of the weights, shared
    compiled.compiled = None
    context = [(17 * i) % 1000 + 10 for i in range(args.context)]
    with torch.inference_mode():
        spent = compiled.compiled_forward().warm_up(args.context + 256 + 64, WIDTHS)
        print(f"compiled path: {len(compiled.compiled.graphs)} graphs compiled or loaded "
              f"in {spent:.1f} s")
        memory = measure_memory_limit(compiled.model, compiled.device, compiled.dtype)
        if memory is None or memory.limit_s is None:
            raise SystemExit("the bandwidth probe does not fit in memory here")
        limit = memory.limit_s
        print(f"weights {memory.weight_bytes / 1e6:.0f} MB at {memory.bandwidth / 1e9:.1f} GB/s: "
              f"memory limit of a step {limit * 1e3:.1f} ms")
        table: dict[str, dict[int, list[float]]] = {p: {w: [] for w in WIDTHS} for p in paths}
        for _ in range(args.rounds):
            for name, target in paths.items():
                for width in WIDTHS:
                    table[name][width].append(forward_s(target, context, width, args.repeats))
    print(f"\n{args.rounds} rounds, medians; context {args.context}, {compiled.dtype}, "
          f"{compiled.device}")
    print("path      step ms  limit÷step  " + "  ".join(f"w={w:<3}" for w in WIDTHS[1:]))
    for name in paths:
        step = statistics.median(table[name][1])
        costs = "  ".join(f"{statistics.median(table[name][w]) / step:5.2f}" for w in WIDTHS[1:])
        print(f"{name:9} {step * 1e3:7.1f}  {limit / step:10.2f}  {costs}")
    print(f"late compiles (inside the timed forwards): {compiled.compiled.late_compiles}")


if __name__ == "__main__":
    main()
