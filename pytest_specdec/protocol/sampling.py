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
    same under wrapping, so the result is exact on every device. `x` is left as it
    is; after its first step the hash works in place (one temporary, the shifted value).
    """
    if isinstance(x, int):
        x &= _MASK32
        x ^= x >> 16
        x = (x * 0x7FEB352D) & _MASK32
        x ^= x >> 15
        x = (x * 0x846CA68B) & _MASK32
        return x ^ (x >> 16)
    x = x & _MASK32
    x ^= x >> 16
    x.mul_(0x7FEB352D).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(0x846CA68B).bitwise_and_(_MASK32)
    x ^= x >> 16
    return x


#: Elements of the [rows, vocab] noise computed at once. The hash runs on int64 and the
#: logs on float64 (their rounding to float32 is the noise's definition), so each
#: temporary of a chunk takes 8 bytes an element: at most 32 MB, whatever the vocabulary
#: and the row count. A chunk is whole columns of every row: a one-token step over a
#: 152k vocabulary is one chunk (as many kernels as without chunks), a 60-node tree three.
CHUNK_ELEMENTS = 1 << 22

#: What ``gumbel_noise`` can return.
NOISE_DTYPES = (torch.float32, torch.float64)


def gumbel_noise(seed: int, positions: torch.Tensor, vocab_size: int, *,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard Gumbel noise of shape [len(positions), vocab_size], a function of (seed, t).

    positions: [rows] absolute positions (int). The noise is computed in float64 and
    rounded once to `dtype` (float64, or float32: the values ``Sampler.scores`` adds, bit
    for bit those of rounding the float64 noise), a chunk of columns at a time
    (:data:`CHUNK_ELEMENTS`), so no 64-bit temporary spans the whole [rows, vocab]."""
    if dtype not in NOISE_DTYPES:
        raise ValueError(f"gumbel_noise: dtype {dtype} is not one of "
                         f"{', '.join(map(str, NOISE_DTYPES))}")
    device = positions.device
    # hashed on the host (the same bits as on an int64 tensor): no host-built tensor is
    # copied to the device
    seed_key = _hash32(seed & _MASK32)
    row_key = _hash32(seed_key ^ _hash32(positions.to(torch.int64) + 0x9E3779B9))[:, None]
    out = torch.empty(row_key.shape[0], vocab_size, dtype=dtype, device=device)
    width = max(1, CHUNK_ELEMENTS // max(1, row_key.shape[0]))
    for start in range(0, vocab_size, width):
        cols = torch.arange(start, min(start + width, vocab_size), dtype=torch.int64,
                            device=device)
        bits = _hash32(row_key ^ _hash32(cols * 0x27D4EB2F + 0x165667B1)[None, :])
        # (bits + 0.5) / 2**32 lies strictly inside (0, 1), so both logs are finite;
        # in place: one float64 temporary, the same operations as -log(-log(u))
        uniform = bits.to(torch.float64).add_(0.5).div_(4294967296.0)
        out[:, start:start + cols.numel()] = uniform.log_().neg_().log_().neg_()
    return out


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
        return logits / self.temperature + gumbel_noise(self.seed, positions, logits.shape[-1],
                                                         dtype=torch.float32)

    def choose(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids, shape [n], for logits [n, vocab] at absolute positions [n]."""
        return self.scores(logits, positions).argmax(dim=-1)
