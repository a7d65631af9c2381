"""Greedy and coupled sampling: the target's choice of token at each position.

Coupled sampling makes speculative output *identical* to plain decoding at any
temperature. The token at absolute position t of a sequence with seed s is

    argmax(logits_t / T + G(s, t))

where G(s, t) is a vector of standard Gumbel noise that is a pure function of (s, t)
(a counter-based hash, no generator state). By the Gumbel-max trick this is an exact
sample from softmax(logits_t / T). Because the noise at position t does not depend on
how many tokens were verified in the same forward, plain decoding and speculative
verification pick the same token wherever their logits agree, so losslessness is
checked by equality at every temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: Any) -> Any:
    """A 32-bit avalanche hash (lowbias32) on int64 tensors holding values < 2**32, or
    on a Python int.

    Products may wrap past 2**63; only the low 32 bits are kept, and those are the
    same under wrapping, so the result is exact on every device.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seed: int, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise of shape [len(positions), vocab_size], a function of (seed, t)."""
    device = positions.device
    # hashed on the host (the same bits as on an int64 tensor): no host-built tensor is
    # copied to the device
    seed_key = _hash32(seed & _MASK32)
    row_key = _hash32(seed_key ^ _hash32(positions.to(torch.int64) + 0x9E3779B9))
    cols = torch.arange(vocab_size, dtype=torch.int64, device=device)
    bits = _hash32(row_key[:, None] ^ _hash32(cols * 0x27D4EB2F + 0x165667B1)[None, :])
    # (bits + 0.5) / 2**32 lies strictly inside (0, 1), so both logs are finite
    uniform = (bits.to(torch.float64) + 0.5) / 4294967296.0
    return -torch.log(-torch.log(uniform))


@dataclass(frozen=True)
class Sampler:
    """Chooses the target's token at given absolute positions: greedy at T=0."""

    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")

    def scores(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The values whose argmax is the chosen token, in float32 (fp32 logits if greedy)."""
        logits = logits.float()
        if self.temperature == 0.0:
            return logits
        noise = gumbel_noise(self.seed, positions, logits.shape[-1]).to(torch.float32)
        return logits / self.temperature + noise

    def choose(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids, shape [n], for logits [n, vocab] at absolute positions [n]."""
        return self.scores(logits, positions).argmax(dim=-1)
