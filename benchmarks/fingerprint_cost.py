"""What the whole-target fingerprint costs: a random-init model of the default target's
config (SmolLM2-135M), fingerprinted with the keyed digest (engine/integrity.py) and with
the linear bit sums it replaced, in each dtype asked for.

    python benchmarks/fingerprint_cost.py [--dtypes float32,bfloat16] [--rounds 7]
                                          [--device cpu] [--threads 1]

Rounds alternate the two digests, so machine noise falls on both; the medians are
printed (after an untimed warm-up of each) with the model's size and their ratio. On a
CUDA device the clock is read after a synchronize.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable
from unittest import mock

import torch

from pytest_specdec.engine import integrity
from pytest_specdec.engine.integrity import TargetFingerprint

#: SmolLM2-135M's config (the default target's), so no download or conversion is needed.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)


def linear_digest(tensor: torch.Tensor) -> torch.Tensor:
    """The digest the keyed one replaced: wrap-around sums of the bits (the total and the
    index-weighted row and column sums of the tensor viewed as [shape[0], -1])."""
    if tensor.numel() == 0:
        return torch.zeros(3, dtype=torch.int64, device=tensor.device)
    t = tensor.detach().reshape(tensor.shape or (1,))
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    bits = t.view(ints) if t.dtype != ints else t
    bits = bits.reshape(bits.shape[0] if bits.dim() > 1 else 1, -1)
    acc = torch.int64 if bits.element_size() == 8 else torch.int32
    rows = bits.sum(dim=1, dtype=acc).to(torch.int64)
    cols = bits.sum(dim=0, dtype=acc).to(torch.int64)
    weights = torch.arange(1, max(rows.numel(), cols.numel()) + 1, device=bits.device,
                           dtype=torch.int64)
    return torch.stack([rows.sum(), (rows * weights[:rows.numel()]).sum(),
                        (cols * weights[:cols.numel()]).sum()])


def build(dtype: torch.dtype, device: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMOLLM2_135M)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def timed(model: torch.nn.Module, digest: Callable, device: str) -> float:
    with mock.patch.object(integrity, "digest", digest):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        TargetFingerprint.take(model)  # reads every digest back: the sync is inside
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: expected 1 or more, got {args.rounds}")
    if args.threads < 0:
        parser.error(f"--threads: expected 0 (torch's default) or more, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    digests = {"linear (old)": linear_digest, "keyed": integrity.digest}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name.strip(), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            parser.error(f"--dtypes: {name!r} is not a floating torch dtype; expected e.g. "
                         "float32,bfloat16,float16")
        model = build(dtype, args.device)
        tensors = [*model.parameters(), *model.buffers()]
        size = sum(t.numel() * t.element_size() for t in tensors)
        times: dict[str, list[float]] = {label: [] for label in digests}
        for label, digest in digests.items():  # warm-up: caches, allocator
            timed(model, digest, args.device)
        for _ in range(args.rounds):
            for label, digest in digests.items():
                times[label].append(timed(model, digest, args.device))
        medians = {label: statistics.median(values) for label, values in times.items()}
        print(f"{name} on {args.device}: {len(tensors)} tensors, {size / 1e6:.0f} MB; "
              f"median of {args.rounds}: " + ", ".join(
                  f"{label} {seconds * 1e3:.1f} ms ({size / seconds / 1e9:.1f} GB/s)"
                  for label, seconds in medians.items())
              + f"; keyed/old {medians['keyed'] / medians['linear (old)']:.2f}x")


if __name__ == "__main__":
    main()
