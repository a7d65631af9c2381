"""Host<->device transfers of the engine, every one counted.

On an accelerator each of these stalls the host until the device catches up: a read
of a device tensor into Python (``.tolist()``, ``.item()``, ``.cpu()``, ``bool(t)``)
waits for every kernel queued before it, and a copy of a host-built tensor to the
device (``torch.tensor(values, device=...)``) is a blocking copy from pageable memory.
So a decode step makes as few as it can, and a fixed number: the engine and its model
drafters make each one through :func:`to_host` or :func:`to_device` (several integer
lists in one copy: :func:`pack_to_device`), which add to :data:`count`. The budget per
step (docs/architecture.md, "The path of one draft") is enforced by tests/test_sync.py.
On the CPU nothing waits, but the count is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class TransferCount:
    """Transfers so far: reads of device tensors into host values (``to_host``) and
    copies of host-built tensors to the device (``to_device``)."""

    to_host: int = 0
    to_device: int = 0

    @property
    def total(self) -> int:
        return self.to_host + self.to_device

    def snapshot(self) -> "TransferCount":
        return TransferCount(self.to_host, self.to_device)

    def since(self, earlier: "TransferCount") -> "TransferCount":
        """The transfers made after `earlier` (a :meth:`snapshot`)."""
        return TransferCount(self.to_host - earlier.to_host, self.to_device - earlier.to_device)


#: The running count, a debug counter: read differences of it (:meth:`TransferCount.since`).
count = TransferCount()


def to_host(tensor: torch.Tensor) -> Any:
    """``tensor.tolist()`` (a device tensor read into Python values), counted."""
    count.to_host += 1
    return tensor.tolist()


def to_device(values: Sequence[Any] | torch.Tensor, device: torch.device | str,
              dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` as a tensor on `device`: a host-built one is copied once, counted; a
    tensor already on the device is returned as it is (no copy, not counted)."""
    device = torch.device(device)
    if isinstance(values, torch.Tensor):
        if _same_device(values.device, device):
            return values
        count.to_device += 1
        return values.to(device)
    count.to_device += 1
    return torch.tensor(values, dtype=dtype, device=device)


def pack_to_device(parts: Sequence[Sequence[int]], device: torch.device | str) -> list[torch.Tensor]:
    """Several lists of integers copied to `device` in ONE counted copy; returns a
    1-d int64 view of each, in order."""
    flat = [value for part in parts for value in part]
    whole = to_device(flat, device)
    return list(whole.split([len(part) for part in parts]))


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are one device when cuda's current device is 0."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == \
            (b.index if b.index is not None else current)
    return a.index == b.index
