"""Spans that mean the same on every device, and the host-sync budget.

Span boundaries: with a fake device whose synchronize is recorded, every clock read of
the decode loops (batch 1 and batched; baseline, chain and tree drafts) comes right
after a synchronize of the target's device, and every probe forward is waited for
before its time is read.

The budget: host<->device transfers per step, counted through
:mod:`pytest_specdec.engine.transfer`, stay within 2 for the baseline and chains and 4
for trees and for eagle3's propose, and do not change with the layer count, the draft
length or the tree's size. On a CPU nothing really waits, so the test also patches the
tensor methods that read a device tensor into Python (and ``torch.tensor`` and list
indexing in the package's own code) to catch a transfer that bypasses the helper.
"""

from __future__ import annotations

import contextlib
import random
import sys
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

from pytest_specdec.engine import batch as batch_loop, loop, timing, transfer
from pytest_specdec.engine.batch import generate_batch
from pytest_specdec.engine.guard import Guard
from pytest_specdec.engine.loop import GenerationRequest, generate
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.engine.verify import accepted_nodes, keep_path, slot_attention
from pytest_specdec.models.tree import grow, grow_on_device
from pytest_specdec.protocol.drafter import Draft, DrafterBase
from pytest_specdec.protocol.sampling import Sampler

PROMPT = (1, 17, 42, 99, 250, 3, 77)
VOCAB = 512
PACKAGE_ROOTS = tuple(str(Path(m.__file__).resolve().parent) for m in
                      (sys.modules["pytest_specdec"], sys.modules["pytest_specdec.drafters"]))


def tiny_target(layers: int = 2):
    """A random Llama of `layers` layers (conftest's tiny model, deeper on demand)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=VOCAB - 1, bos_token_id=0, pad_token_id=0)
    return wrap_model(transformers.LlamaForCausalLM(config).eval(), name=f"tiny-{layers}")


class Oracle(DrafterBase):
    """Drafts from the plain output `truth` (prompt then new tokens): a chain of
    `length` tokens whose last is wrong, or a tree of `nodes` nodes, two children per
    node (parent of i: i // 2 - 1), whose second children carry the right token, so
    the accepted path (1, 5, 13, ...) has to be moved into place in the cache."""

    def __init__(self, truth: Sequence[int], *, length: int = 0, nodes: int = 0):
        self.truth, self.length, self.nodes = list(truth), length, nodes

    def _right(self, position: int) -> int:
        return self.truth[position] if position < len(self.truth) else 0

    def propose(self, context: Sequence[int], k: int) -> Draft:
        at = len(context)
        if self.length:
            n = min(self.length, k)
            tokens = [self._right(at + i) for i in range(n)]
            tokens[-1] = (tokens[-1] + 1) % VOCAB
            return Draft(tuple(tokens))
        parents = [i // 2 - 1 for i in range(self.nodes)]
        depth = [0] * self.nodes
        for i, p in enumerate(parents):
            depth[i] = 1 if p < 0 else depth[p] + 1
        keep = [i for i in range(self.nodes) if depth[i] <= k]
        tokens = [self._right(at + depth[i] - 1) if i % 2 else (self._right(at + depth[i] - 1) + 1) % VOCAB
                  for i in keep]
        return Draft(tuple(tokens), tuple(parents[i] for i in keep))


# -- catching transfers that bypass the helper --------------------------------------------

READS = ("tolist", "item", "cpu", "__bool__", "__int__", "__float__", "__index__", "numpy")


class Bypasses:
    """Reads of tensors into Python, ``torch.tensor`` calls and list-indexed tensors
    made outside :mod:`pytest_specdec.engine.transfer`; the last two only from the
    package's own code (where a CUDA tensor would be copied from the host)."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.inside = 0
        self.armed = True  # False: not watching (a drafter loading its weights)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._read(getattr(torch.Tensor, name), name))
        monkeypatch.setattr(torch, "tensor", self._made(torch.tensor))
        monkeypatch.setattr(torch.Tensor, "__getitem__", self._indexed(torch.Tensor.__getitem__))
        for name in ("to_host", "to_device"):
            monkeypatch.setattr(transfer, name, self._helper(getattr(transfer, name)))
        # a sequence's set-up and end are no step: a drafter loads its weights in
        # attach, and the guard checksums what it lent at attach and at end
        for module in (loop, batch_loop):
            monkeypatch.setattr(module, "attach", self._unwatched(module.attach))
        call = Guard.call
        monkeypatch.setattr(Guard, "call", lambda guard, method, *args: self._unwatched(call)(
            guard, method, *args) if method in ("begin", "open", "end") else call(guard, method, *args))

    @contextlib.contextmanager
    def paused(self):
        armed, self.armed = self.armed, False
        try:
            yield
        finally:
            self.armed = armed

    def _unwatched(self, real):
        def unwatched(*args, **kwargs):
            with self.paused():
                return real(*args, **kwargs)
        return unwatched

    def _helper(self, real):
        def helper(*args, **kwargs):
            self.inside += 1
            try:
                return real(*args, **kwargs)
            finally:
                self.inside -= 1
        return helper

    def _read(self, real, name):
        def read(tensor, *args, **kwargs):
            if self.armed and not self.inside and tensor.numel():
                self.found.append(f"Tensor.{name} at {_caller()}")
            return real(tensor, *args, **kwargs)
        return read

    def _made(self, real):
        def made(*args, **kwargs):
            if self.armed and not self.inside and _called_from_package():
                self.found.append(f"torch.tensor at {_caller()}")
            return real(*args, **kwargs)
        return made

    def _indexed(self, real):
        def indexed(tensor, index):
            items = index if isinstance(index, tuple) else (index,)
            if self.armed and any(isinstance(i, list) for i in items) and _called_from_package():
                self.found.append(f"list index at {_caller()}")
            return real(tensor, index)
        return indexed


def _caller() -> str:
    frame = sys._getframe(2)
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


def _called_from_package() -> bool:
    frame = sys._getframe(2)
    return str(Path(frame.f_code.co_filename).resolve()).startswith(PACKAGE_ROOTS)


@pytest.fixture
def bypasses(monkeypatch: pytest.MonkeyPatch) -> Bypasses:
    watch = Bypasses()
    watch.install(monkeypatch)
    return watch


class PerStep:
    """Transfers per step, cut at the loops' ``on_tokens`` call (once per step, after
    its spans); the first step's count includes the sequence's set-up."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self._mark = transfer.count.snapshot()

    def __call__(self, emitted: int) -> None:
        self.counts.append(transfer.count.since(self._mark).total)
        self._mark = transfer.count.snapshot()


def per_step(target, drafter_for=None, *, batch: int = 1, k: int = 12, temperature: float = 0.0,
             budgets: Sequence[int] = (9, 12, 16)) -> list[int]:
    """The transfers of each step of a decode at batch 1 (`batch` 1) or of a batch of
    `batch` sequences whose budgets differ (rows finish at different steps)."""
    requests = [GenerationRequest(PROMPT[: 4 + b], budgets[b % len(budgets)],
                                  Sampler(temperature, seed=b)) for b in range(batch)]
    truths = [PROMPT[: 4 + b] + tuple(generate(target, r).tokens) for b, r in enumerate(requests)]
    steps = PerStep()
    if batch == 1:
        drafter = drafter_for(truths[0]) if drafter_for else None
        generate(target, requests[0], drafter, k=k, drafter_name="oracle", on_tokens=steps)
    else:
        drafters = [drafter_for(t) if drafter_for else None for t in truths]
        generate_batch(target, requests, drafters, k=k, drafter_name="oracle", on_tokens=steps)
    return steps.counts


# -- the budget ---------------------------------------------------------------------------

KINDS = {  # kind: (drafter factory, budget per step)
    "baseline": (None, 2),
    "chain": (lambda truth: Oracle(truth, length=3), 2),
    "tree": (lambda truth: Oracle(truth, nodes=5), 4),
}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_step_stays_within_its_transfer_budget(bypasses, kind, temperature, batch):
    factory, budget = KINDS[kind]
    counts = per_step(tiny_target(), factory, batch=batch, temperature=temperature)
    assert len(counts) > 2
    assert max(counts) <= budget, counts
    assert bypasses.found == []


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind, small, large", [
    ("layers", dict(layers=2), dict(layers=4)),
    ("chain", dict(length=3), dict(length=10)),
    ("tree", dict(nodes=5), dict(nodes=40)),
])
def test_transfers_do_not_grow_with_layers_draft_length_or_tree_size(bypasses, kind, small,
                                                                     large, batch):
    def counts(options: dict) -> set[int]:
        layers = options.get("layers", 2)
        drafter = {"length": options.get("length", 0), "nodes": options.get("nodes", 0)}
        factory = (lambda truth: Oracle(truth, **drafter)) if any(drafter.values()) else \
            (lambda truth: Oracle(truth, nodes=9))
        return set(per_step(tiny_target(layers), factory, batch=batch))

    assert counts(small) == counts(large)
    assert bypasses.found == []


def eagle3_drafter(tmp_path: Path, **options):
    from test_eagle3 import random_head

    from pytest_specdec.drafters.eagle3 import Eagle3
    from pytest_specdec.models.eagle3 import save_checkpoint

    folder = save_checkpoint(random_head(), tmp_path / "head", layout="speculators")
    return Eagle3(model=str(folder), **options)


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_eagle3_propose_and_its_tree_verification_stay_within_budget(tmp_path, bypasses,
                                                                     temperature):
    def spans(**options) -> tuple[set[int], set[int]]:
        with bypasses.paused():  # a random head saved and loaded
            drafter = eagle3_drafter(tmp_path, **options)
        proposing: dict[int, int] = {}  # step -> transfers in its propose
        propose = drafter.propose
        steps = PerStep()

        def counted(context, k):
            before = transfer.count.snapshot()
            try:
                return propose(context, k)
            finally:
                proposing[len(steps.counts)] = transfer.count.since(before).total

        drafter.propose = counted
        request = GenerationRequest(PROMPT, 16, Sampler(temperature, seed=3))
        generate(tiny_target(), request, drafter, k=8, drafter_name="eagle3", on_tokens=steps)
        verifying = [total - proposing.get(step, 0) for step, total in enumerate(steps.counts)]
        return set(proposing.values()), set(verifying)

    small = spans(depth=1, top_k=2, total_tokens=3)
    large = spans(depth=7, top_k=10, total_tokens=60)
    assert max(small[0]) <= 4 and max(small[1]) <= 4
    assert small == large
    assert bypasses.found == []


def test_the_bypass_watch_catches_a_read_outside_the_helper(bypasses):
    class Reader(DrafterBase):
        def propose(self, context, k):
            torch.ones(2).sum().item()  # a device read that skips the helper
            return Draft()

    generate(tiny_target(), GenerationRequest(PROMPT, 3), Reader(), k=2)
    assert any(found.startswith("Tensor.item at test_sync.py") for found in bypasses.found)


# -- span boundaries ----------------------------------------------------------------------

class FakeDevice:
    """Records synchronizes and clock reads in order; the clock ticks 1 ms a read."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def synchronize(self, device) -> None:
        self.events.append(("sync", torch.device(device)))

    def clock(self) -> float:
        self.events.append(("clock", None))
        return 1e-3 * sum(1 for kind, _ in self.events if kind == "clock")


@pytest.fixture
def fake_device(monkeypatch: pytest.MonkeyPatch) -> FakeDevice:
    fake = FakeDevice()
    monkeypatch.setattr(timing, "synchronize", fake.synchronize)
    monkeypatch.setattr(timing, "clock", fake.clock)
    return fake


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_span_boundary_synchronizes_before_reading_the_clock(fake_device, kind, batch):
    target = tiny_target()
    factory = KINDS[kind][0]
    requests = [GenerationRequest(PROMPT[: 4 + b], 8 + 3 * b) for b in range(batch)]
    truths = [r.prompt_ids + tuple(generate(target, r).tokens) for r in requests]
    fake_device.events.clear()
    steps = PerStep()
    if batch == 1:
        generate(target, requests[0], factory(truths[0]) if factory else None, k=6,
                 on_tokens=steps)
        # the start, t0..t3 of every step, the end
        assert sum(kind == "clock" for kind, _ in fake_device.events) == 2 + 4 * len(steps.counts)
    else:
        generate_batch(target, requests, [factory(t) if factory else None for t in truths],
                       k=6, on_tokens=steps)
    events = fake_device.events
    clocks = [i for i, (kind, _) in enumerate(events) if kind == "clock"]
    assert len(clocks) >= 4 * len(steps.counts)
    for i in clocks:
        assert i > 0 and events[i - 1] == ("sync", target.device), events[max(i - 3, 0): i + 1]


def test_each_probe_forward_is_waited_for_before_its_time_is_read(fake_device, monkeypatch):
    target = tiny_target()
    probe = timing.Probe(target, PROMPT)
    forward = target.forward

    def recorded(*args, **kwargs):
        fake_device.events.append(("forward", None))
        return forward(*args, **kwargs)

    monkeypatch.setattr(target, "forward", recorded)
    fake_device.events.clear()
    probe.reading()
    events = fake_device.events
    forwards = [i for i, (kind, _) in enumerate(events) if kind == "forward"]
    assert len(forwards) == timing.PROBE_FORWARDS + timing.WIDE_PROBE_FORWARDS
    for i in forwards:
        assert events[i - 2: i] == [("sync", target.device), ("clock", None)]
        assert events[i + 1: i + 3] == [("sync", target.device), ("clock", None)]


def test_boundary_waits_for_the_device_then_reads_the_clock(fake_device):
    assert timing.boundary("cpu") == pytest.approx(1e-3)
    assert fake_device.events == [("sync", torch.device("cpu")), ("clock", None)]
    timing.synchronize_device("cpu")  # the real one: nothing to wait for on the CPU


# -- the pieces the budget rests on -------------------------------------------------------

def reference_attention(pad: int, uncached: int, parents: Sequence[int]) -> torch.Tensor:
    """The new slots' attention of one row, node by node: pads see themselves, context
    slots the context up to themselves, nodes the context, their ancestors and
    themselves."""
    width = pad + uncached + len(parents)
    allowed = torch.zeros(width, width, dtype=torch.bool)
    for i in range(pad):
        allowed[i, i] = True
    for i in range(pad, pad + uncached):
        allowed[i, pad: i + 1] = True
    for n, p in enumerate(parents):
        row = pad + uncached + n
        allowed[row, pad: pad + uncached] = True
        allowed[row, row] = True
        while p >= 0:
            allowed[row, pad + uncached + p] = True
            p = parents[p]
    return allowed


def random_parents(rng: random.Random, nodes: int) -> list[int]:
    return [rng.randrange(-1, i) for i in range(nodes)]


def test_the_device_built_tree_attention_is_the_node_by_node_one():
    rng = random.Random(7)
    rows = [(rng.randrange(0, 4), rng.randrange(1, 5), random_parents(rng, rng.randrange(0, 12)))
            for _ in range(6)]
    width = max(pad + unc + len(parents) for pad, unc, parents in rows)
    rows = [(width - unc - len(parents), unc, parents) for _, unc, parents in rows]
    parent_slot = torch.tensor([[-1] * (pad + unc) + [p if p < 0 else pad + unc + p for p in parents]
                                for pad, unc, parents in rows])
    start = torch.tensor([pad for pad, _, _ in rows])
    first = torch.tensor([pad + unc for pad, unc, _ in rows])
    depths = [d for _, _, parents in rows for d in _depths(parents)]
    got = slot_attention(start, first, parent_slot, max(depths, default=0))
    for b, (pad, unc, parents) in enumerate(rows):
        assert torch.equal(got[b], reference_attention(pad, unc, parents)), b


def _depths(parents: Sequence[int]) -> list[int]:
    depth: list[int] = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    return depth


def host_path(tokens, parents, choices) -> list[int]:
    path, here = [], -1
    while True:
        here = next((i for i in range(here + 1, len(tokens))
                     if parents[i] == here and tokens[i] == choices[here + 1]), -1)
        if here < 0:
            return path
        path.append(here)


def test_the_path_found_on_the_device_is_the_host_walks():
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randrange(0, 14)
        parents = random_parents(rng, n)
        tokens = [rng.randrange(3) for _ in range(n)]
        choices = [rng.randrange(3) for _ in range(n + 1)]
        lineage = reference_attention(0, 0, parents)
        on_path = accepted_nodes(torch.tensor(tokens, dtype=torch.long),
                                 torch.tensor(parents, dtype=torch.long),
                                 torch.tensor(choices, dtype=torch.long), lineage)
        assert [i for i in range(n) if on_path[i]] == host_path(tokens, parents, choices)


def test_the_tree_grown_on_the_device_is_the_host_grown_one():
    rng = random.Random(5)
    children = 6
    # log-probabilities on a coarse grid, so that ties occur and must go the same way
    draw = torch.Generator().manual_seed(5)  # torch's global generator left as it was
    logp = -torch.randint(0, 6, (VOCAB, children), generator=draw).double().div(4) \
        .sort(dim=1).values.flip(1).float()
    kids = torch.randint(0, VOCAB, (VOCAB, children), generator=draw)

    def host_expand(frontier, tree):
        return [list(zip(kids[tree.tokens[n]].tolist(), logp[tree.tokens[n]].tolist()))
                for n in frontier]

    def device_expand(frontier):
        return kids[frontier.tokens], logp[frontier.tokens]

    for _ in range(20):
        first = rng.randrange(VOCAB)
        top_k, levels = rng.randrange(1, 5), rng.randrange(0, 6)
        want = grow(list(zip(kids[first].tolist(), logp[first].tolist())), host_expand,
                    top_k=top_k, levels=levels)
        got = grow_on_device(kids[first], logp[first], device_expand, top_k=top_k, levels=levels)
        assert got == want


def test_a_cache_with_its_own_keep_path_keeps_it_itself():
    class OwnCache:
        def __init__(self):
            self.calls = []

        def keep_path(self, base, path, fed, *, index=None):
            self.calls.append((base, path, fed, index))

    cache = OwnCache()
    keep_path(cache, 7, [1, 3], 5)
    index = torch.tensor([1, 3])
    keep_path(cache, 7, [1, 3], 5, index=index)
    assert cache.calls == [(7, [1, 3], 5, None), (7, [1, 3], 5, index)]


def test_the_helper_counts_each_copy_and_read_once():
    before = transfer.count.snapshot()
    ids, positions = transfer.pack_to_device([[1, 2, 3], [7]], "cpu")
    assert ids.tolist() == [1, 2, 3] and positions.tolist() == [7]
    assert transfer.to_device(ids, "cpu") is ids  # already there: no copy
    assert transfer.to_host(ids) == [1, 2, 3]
    assert transfer.count.since(before) == transfer.TransferCount(to_host=1, to_device=1)

