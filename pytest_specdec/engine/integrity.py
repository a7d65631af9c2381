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

The digest (:func:`digest`) reads a tensor's bits as integers of its element size (words)
in row-major order and sums, with wrap-around mod 2^64 (exact, so independent of the
reduction's order, threads or device), a keyed non-linear mix of each word: the word,
sign-extended to 64 bits, is xored with its position's key, multiplied by its key
block's odd multiplier, its high half xored into its low half, and squared. The keys are
a Weyl sequence (seed + i x the golden ratio, mod 2^64) put through splitmix64's
finalizer: a table of one key block (2^20 positions) per device, and one multiplier per
block; the seed is a per-process secret. Every step is integer arithmetic, so a device
gives the same numbers as any other.

What it guarantees: equal bits give equal digests (a clone, a contiguous copy, a view
of another dtype of the same element size). A change of any kind (one bit, a sign flip
of a whole tensor, a row or column, swapped rows, columns or elements, changes built to
cancel in linear sums) changes each changed word's term by an amount that looks random
without the secret, so the changes cancel only by a 64-bit coincidence (about 2^-62: the
square leaves its lowest bits less random). A linear digest is not enough: a sign flip
adds 2^31 to an fp32 word, and an even number of them per row and column cancels in any
sum of rows and columns. What it does not stop: code that reads the secret from this
module (as it could replace the check itself); the fingerprint is there so that a
drafter's write, deliberate or not, fails that drafter's case and no other.

The version counter is not used: a write through ``.data`` leaves it alone, and a
tensor set back to its bits is intact.

Cost: six elementwise int64 passes per word (five for 8-byte words), over a scratch
buffer of one pass's words (a fraction of a key block on a CPU, several blocks on an
accelerator; never a 64-bit copy of a whole big tensor), so several times the cost of
one read of the weights; ``benchmarks/fingerprint_cost.py`` measures it against the
linear sums it replaced.
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass, field
from typing import Iterator

import torch

from pytest_specdec.protocol.drafter import DraftError

#: The rule a case breaks when the target is not what it was when loaded.
TARGET_INTACT = "the target is left unchanged"
#: Names shown in a TargetChanged message before "and N more".
SHOWN = 5

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


_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: Words per key block: the position keys repeat every block, each block has its own
#: multiplier. Part of the digest's definition: every device uses the same.
KEY_BLOCK = 1 << 20
#: Words per elementwise pass (the scratch buffer): a fraction of a block on a CPU,
#: where a pass runs from cache, several blocks on an accelerator, where each pass is a
#: kernel launch per step.
PASS_WORDS = {"cpu": 1 << 18}
PASS_WORDS_DEFAULT = 16 * KEY_BLOCK

_MASK64 = (1 << 64) - 1
_WEYL = 0x9E3779B97F4A7C15  # an odd increment: the golden ratio in 64 bits
#: A per-process secret the keys derive from: no code written beforehand can aim a
#: change at them.
_SECRET = secrets.randbits(64)
_POSITION_SEED = _SECRET
_BLOCK_SEED = _SECRET ^ 0xB10C_5EED


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores (torch scalars are signed)."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def _mix_int(z: int) -> int:
    """splitmix64's finalizer on a Python int: a bijection of 64-bit patterns."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """The same finalizer on int64 (products wrap; a masked shift is a logical one)."""
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = (z ^ ((z >> shift) & ((1 << (64 - shift)) - 1))) * _signed(factor)
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _weyl_keys(seed: int, count: int, device: torch.device) -> torch.Tensor:
    """[count] int64: mix(seed + i * WEYL) for i = 0..count-1."""
    index = torch.arange(count, dtype=torch.int64, device=device)
    return _mix(index * _signed(_WEYL) + _signed(seed))


def block_multiplier(block: int) -> int:
    """The odd multiplier of key block `block` (as a signed int64)."""
    return _signed(_mix_int(_BLOCK_SEED + block * _WEYL) | 1)


#: device -> (position keys [KEY_BLOCK], block multipliers [n]), made there once
_KEYS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _keys(device: torch.device, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The position keys of a block, and the multipliers of blocks 0..`blocks`-1, on
    `device` (integer ops: the same numbers on every device, and block_multiplier's)."""
    keys, multipliers = _KEYS.get(device, (None, None))
    if keys is None or multipliers.numel() < blocks:
        # normal tensors even when first asked for in inference mode (they are reused)
        with torch.inference_mode(False), torch.no_grad():
            if keys is None:
                keys = _weyl_keys(_POSITION_SEED, KEY_BLOCK, device)
            count = max(blocks, 64, 2 * (multipliers.numel() if multipliers is not None else 0))
            multipliers = _weyl_keys(_BLOCK_SEED, count, device) | 1
        _KEYS[device] = (keys, multipliers)
    return keys, multipliers


def _words(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s bits (any shape) as integers of its element size (8-byte words for
    longer elements, bytes for odd sizes), at least 1-D: a view, except for those longer
    or odd sizes."""
    t = tensor.detach()
    if t.dim() == 0:
        t = t.reshape(1)
    size = t.element_size()
    ints = _INTS.get(size, torch.int64 if size % 8 == 0 else torch.int8)
    if t.dtype == ints:
        return t
    return t.view(ints) if size == ints.itemsize else t.contiguous().view(ints)


def _flat_range(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Words `start`..`end`-1 of `t` (integers, any shape and strides) in row-major
    order, [end - start] and contiguous: a view when `t` is contiguous, else a copy of
    about those words only (never of the whole tensor)."""
    if t.is_contiguous():
        return t.reshape(-1)[start:end]
    if t.dim() == 1:
        return t[start:end].contiguous()
    row = t[0].numel()
    first, last = start // row, -(-end // row)
    if row >= end - start:  # rows as long as the range: take what is needed of each
        return torch.cat([_flat_range(t[r], max(start - r * row, 0), min(end - r * row, row))
                          for r in range(first, last)])
    return t[first:last].reshape(-1)[start - first * row:end - first * row]


def _passes(total: int, per_pass: int) -> Iterator[tuple[int, int, int]]:
    """(first word, rows, words per row) of each pass over `total` words: a row is a whole
    key block or part of one (never two), `per_pass` words at most."""
    start = 0
    while start < total:
        block_end = min((start // KEY_BLOCK + 1) * KEY_BLOCK, total)
        if per_pass <= KEY_BLOCK or start % KEY_BLOCK or block_end - start < KEY_BLOCK:
            n = min(per_pass, block_end - start)
            yield start, 1, n
            start += n
        else:  # whole blocks, as rows
            rows = min(per_pass // KEY_BLOCK, (total - start) // KEY_BLOCK)
            yield start, rows, KEY_BLOCK
            start += rows * KEY_BLOCK


def _pass_sum(words: torch.Tensor, keys: torch.Tensor, multipliers: torch.Tensor | int,
              scratch: torch.Tensor) -> torch.Tensor:
    """The wrap-around sum of each word's keyed mix, as a 0-d int64.

    words: [rows, n] integers of any width (a narrower word is sign-extended)
    keys: [n] int64, the position keys of the words' columns
    multipliers: [rows, 1] int64, odd, one per row (or one int for a single row)
    scratch: [rows, n] int64, overwritten"""
    if words.dtype == torch.int64:
        torch.bitwise_xor(words, keys, out=scratch)
    else:  # widen first: a mixed-width xor takes a slow path on a CPU
        scratch.copy_(words)
        scratch.bitwise_xor_(keys)
    scratch.mul_(multipliers)
    # z ^= z >>> 32 (the high half xored into the low one): a product's carries only
    # move up, this brings the high bits down, so each bit now depends on every bit of
    # the word and its key; the square then makes the sum non-linear in every bit
    halves = scratch.view(torch.int32).view(*scratch.shape, 2)
    low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
    halves[..., low].bitwise_xor_(halves[..., high])
    scratch.mul_(scratch)
    return scratch.sum()


def digest(tensor: torch.Tensor) -> torch.Tensor:
    """One int64 number on `tensor`'s device, [1] (`tensor`: any shape, dtype and
    strides): the wrap-around sum over its words (its bits as integers of its element
    size, in row-major order) of a keyed non-linear mix of each word with its position.
    Equal bits give equal digests (a non-contiguous view and its contiguous copy too);
    see the module's docstring for what a change does to it. No host sync: the caller
    reads the number when it needs it."""
    words = _words(tensor)
    total = words.numel()
    if total == 0:
        return torch.zeros(1, dtype=torch.int64, device=tensor.device)
    per_pass = PASS_WORDS.get(words.device.type, PASS_WORDS_DEFAULT)
    keys, multipliers = _keys(words.device, -(-total // KEY_BLOCK))
    scratch = torch.empty(min(per_pass, total), dtype=torch.int64, device=words.device)
    sums = []
    for start, rows, n in _passes(total, per_pass):
        block, offset = divmod(start, KEY_BLOCK)
        sums.append(_pass_sum(
            _flat_range(words, start, start + rows * n).view(rows, n),
            keys[offset:offset + n],
            block_multiplier(block) if rows == 1 else multipliers[block:block + rows, None],
            scratch[:rows * n].view(rows, n)))
    return (torch.stack(sums).sum() if len(sums) > 1 else sums[0]).reshape(1)


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
