"""What exactness costs, side by side in one process: plain and speculative (pld)
decoding of the same prompts in the default mode and in exact mode
(``--specdec-lossless exact``), and the teacher-forced check of the default mode.

    python benchmarks/exact_cost.py [--dtype bfloat16] [--rounds 3] [--tokens 96]

Rounds alternate the modes, so machine noise falls on both; the medians are printed
with their ratios (after an untimed warm-up of each), and whether speculative output equalled plain decoding's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pytest_specdec.bench.lossless import check_lossless
from pytest_specdec.bench.paradigms import first_prompt
from pytest_specdec.bench.problems import load_problems
from pytest_specdec.drafters.pld import PromptLookup
from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.engine.target import load_target
from pytest_specdec.protocol.sampling import Sampler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="embedded")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--problems", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)

    target = load_target(args.target, device=args.device, dtype=args.dtype)
    problems = load_problems("embedded", limit=args.problems)
    requests = [GenerationRequest(tuple(target.encode_prompt(first_prompt(p))), args.tokens,
                                  Sampler(args.temperature, seed=i))
                for i, p in enumerate(problems)]

    def decode(exact: bool, speculative: bool) -> tuple[float, list]:
        started = time.perf_counter()
        outs = [generate(target, r, PromptLookup() if speculative else None,
                         k=PromptLookup.max_depth if speculative else 0, exact=exact)
                for r in requests]
        return time.perf_counter() - started, outs

    walls: dict[str, list[float]] = {}
    outputs: dict[str, list] = {}
    for exact in (False, True):  # warm-up: first-call costs of both modes, untimed
        for speculative in (False, True):
            decode(exact, speculative)
    for _ in range(args.rounds):
        for exact in (False, True):
            for speculative in (False, True):
                name = f"{'exact' if exact else 'default'} {'pld' if speculative else 'plain'}"
                wall, outputs[name] = decode(exact, speculative)
                walls.setdefault(name, []).append(wall)
        keys = [("p", i, 0) for i in range(len(requests))]
        started = time.perf_counter()
        verdict = check_lossless(
            target, dict(zip(keys, outputs["default plain"])),
            [(dict(zip(keys, requests)), dict(zip(keys, outputs["default pld"])))])
        walls.setdefault("teacher-forced check", []).append(time.perf_counter() - started)

    median = {name: statistics.median(w) for name, w in walls.items()}
    print(f"target {target.name} {args.dtype} on {target.device}, {len(requests)} prompts x "
          f"{args.tokens} tokens, T={args.temperature:g}, median of {args.rounds} rounds")
    for name, value in median.items():
        print(f"  {name:<22} {value:8.2f} s")
    print(f"exact / default, plain decoding: {median['exact plain'] / median['default plain']:.2f}")
    print(f"exact / default, pld:            {median['exact pld'] / median['default pld']:.2f}")
    print(f"pld speedup: default {median['default plain'] / median['default pld']:.2f}x, "
          f"exact {median['exact plain'] / median['exact pld']:.2f}x")
    check = median["teacher-forced check"]
    print(f"teacher-forced check / default pld decoding: {check / median['default pld']:.2f} "
          f"({verdict.tokens} tokens, {verdict.exact} exact, {len(verdict.near_ties)} near-ties)")
    same = lambda a, b: all(x.tokens == y.tokens for x, y in zip(outputs[a], outputs[b]))  # noqa: E731
    print(f"pld output == plain decoding: default {same('default plain', 'default pld')}, "
          f"exact {same('exact plain', 'exact pld')}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
