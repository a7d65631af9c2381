"""The whole target's fingerprint: no case can change a later one.

The engine guards what it lends a drafter (``embeddings``, ``output_head``: see
``Attachment`` in engine/guard.py), but a drafter is Python code in the same process: it can
find the model another way (``gc.get_objects()``, a tensor's storage) and write to any
parameter or buffer. The session therefore fingerprints the whole target when it
loads it and compares after every case (``SpecdecSession.check_target_intact``); a
difference fails that case with :class:`TargetChanged`, naming what changed, and the
session drops the target so the next case reloads it from its loader. No copy of the
weights is kept: an 8B target on a GPU has no room for a second one.

What is compared, per parameter and buffer (by name, tied weights once): shape, dtype,
device, and a digest of its bits; per module, the training flag (``model.train()``
turns dropout on). Parameters or buffers added or removed (a weight untied by
assigning a new ``nn.Parameter``) count as changes too.

The digest reads each tensor's bits as integers of its element size and sums them
with wrap-around (modular, so exact and independent of the reduction's order, threads
or device): the sums of its rows and of its columns (the tensor viewed as
[shape[0], -1]), reduced to three numbers: the total, and the row and column sums
weighted by their index. A change of any single element changes the total for
certain; swapping rows or columns changes the weighted sums; a miss needs changes
that cancel in all three (not something a bug does by chance). The version counter is
not used: a write through ``.data`` leaves it alone, and a tensor set back to its bits
is intact.

Cost, measured on the development machine (2 CPU cores, torch 2.13): a random-init
model of SmolLM2-135M's config (the default target: 134.5 M parameters, 274 tensors,
538 MB in fp32) takes 45-58 ms per fingerprint in fp32, 110 ms in bf16 (a pass over
the rows and one over the columns, at memory speed). Summing the float values in
float64 instead took 96 ms for one plain sum, 321 ms with the absolute sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from pytest_specdec.protocol.drafter import DraftError

#: The rule a case breaks when the target is not what it was when loaded.
TARGET_INTACT = "the target is left unchanged"
#: Names shown in a TargetChanged message before "and N more".
SHOWN = 5

_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class TargetChanged(DraftError):
    """A case left the target different from how it was loaded (its drafter reached a
    parameter or buffer it was not lent, or wrote to one it was). The session has
    dropped the target: the next case runs on a fresh load. ``drafter`` holds the
    case's label (``pld on multi_round``), also named ``case``; ``changes`` lists every
    change (see :meth:`TargetFingerprint.changes`)."""

    changes: tuple[str, ...] = field(default=())

    @property
    def case(self) -> str:
        return self.drafter

    def __str__(self) -> str:
        return f"case {self.drafter!r} broke the rule '{self.rule}': {self.detail}"

    @classmethod
    def of(cls, case_label: str, changes: list[str], total: int) -> "TargetChanged":
        shown = ", ".join(changes[:SHOWN])
        if len(changes) > SHOWN:
            shown += f" and {len(changes) - SHOWN} more"
        detail = (f"it changed {shown} ({len(changes)} of the {total} parameters, "
                  "buffers and module modes compared); the target was dropped, the next "
                  "case runs on a fresh load")
        return cls(case_label, TARGET_INTACT, detail, tuple(changes))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s bits as a 2-D integer tensor [shape[0], -1] (no copy when contiguous)."""
    t = tensor.detach()
    size = t.element_size()
    ints = _INTS.get(size, torch.int64 if size % 8 == 0 else torch.int8)
    if t.dtype != ints:
        if t.dim() == 0:
            t = t.reshape(1)
        try:
            t = t.view(ints)
        except RuntimeError:  # another element size needs a contiguous last dimension
            t = t.contiguous().view(ints)
    return t.reshape(t.shape[0] if t.dim() > 1 else 1, -1)


def digest(tensor: torch.Tensor) -> torch.Tensor:
    """Three int64 numbers on `tensor`'s device: the wrap-around sum of its bits, and its
    row and column sums weighted by their index (1-based). Equal tensors have equal
    digests; see the module's docstring for what a different tensor is sure to change."""
    if tensor.numel() == 0:
        return torch.zeros(3, dtype=torch.int64, device=tensor.device)
    bits = _bits(tensor)
    # int32 accumulators wrap around; int64 accumulators for 8-byte elements
    acc = torch.int64 if bits.element_size() == 8 else torch.int32
    rows = bits.sum(dim=1, dtype=acc).to(torch.int64)
    cols = bits.sum(dim=0, dtype=acc).to(torch.int64)
    weights = torch.arange(1, max(rows.numel(), cols.numel()) + 1, device=bits.device,
                           dtype=torch.int64)
    return torch.stack([rows.sum(), (rows * weights[:rows.numel()]).sum(),
                        (cols * weights[:cols.numel()]).sum()])


def _tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter, then every buffer, by name; a tensor shared under several names
    (tied weights) once, under its first name."""
    yield from model.named_parameters()
    yield from model.named_buffers()


@dataclass(frozen=True)
class TargetFingerprint:
    """What a target model is made of, cheaply: see the module's docstring."""

    #: name -> (shape, dtype, device, digest of its bits; None where unreadable)
    tensors: dict[str, tuple[tuple[int, ...], str, str, tuple[int, ...] | None]]
    #: module name -> its training flag
    modes: dict[str, bool]

    @classmethod
    @torch.no_grad()
    def take(cls, model: torch.nn.Module) -> "TargetFingerprint":
        names, meta, digests = [], [], []
        for name, tensor in _tensors(model):
            names.append(name)
            meta.append((tuple(tensor.shape), str(tensor.dtype), str(tensor.device)))
            try:
                digests.append(None if tensor.is_meta else digest(tensor))
            except Exception:  # a tensor subclass whose bits cannot be read: shape only
                digests.append(None)
        # one transfer per device, not one per tensor (a GPU sync each)
        values: list[tuple[int, ...] | None] = [None] * len(digests)
        by_device: dict[torch.device, list[int]] = {}
        for i, d in enumerate(digests):
            if d is not None:
                by_device.setdefault(d.device, []).append(i)
        for indices in by_device.values():
            stacked = torch.stack([digests[i] for i in indices]).cpu().tolist()
            for i, row in zip(indices, stacked):
                values[i] = tuple(row)
        tensors = {name: (*m, v) for name, m, v in zip(names, meta, values)}
        return cls(tensors, {name: module.training for name, module in model.named_modules()})

    @property
    def size(self) -> int:
        """How many things are compared: parameters, buffers and modules."""
        return len(self.tensors) + len(self.modes)

    def changes(self, model: torch.nn.Module) -> list[str]:
        """What in `model` differs from this fingerprint, in the model's order: the
        names of changed parameters and buffers, then ``NAME (added)`` / ``NAME
        (removed)``, ``NAME (shape A -> B)`` and the like, and ``MODULE (training mode)``
        for a module whose training flag changed. Empty when the model is intact."""
        now = TargetFingerprint.take(model)
        out = []
        for name, (shape, dtype, device, value) in now.tensors.items():
            was = self.tensors.get(name)
            if was is None:
                out.append(f"{name} (added)")
            elif was[:3] != (shape, dtype, device):
                what = [f"{kind} {a} -> {b}" for kind, a, b in
                        zip(("shape", "dtype", "device"), was[:3], (shape, dtype, device))
                        if a != b]
                out.append(f"{name} ({', '.join(what)})")
            elif was[3] != value:
                out.append(name)
        out += [f"{name} (removed)" for name in self.tensors if name not in now.tensors]
        flipped: list[str] = []  # a module whose parent flipped too is not named again
        for name, training in now.modes.items():
            if self.modes.get(name, training) != training and not any(
                    name.startswith(f"{p}.") or not p for p in flipped):
                flipped.append(name)
        return out + [f"{name or 'the model'} (training mode)" for name in flipped]
