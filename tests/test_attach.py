"""The protocol's model-drafter half: attach(TargetInfo), the read-only target parts,
the hidden states of chosen layers at every context position, the coupled sampler in
DraftRequest, and the drafter's time (observe and accept included)."""

from __future__ import annotations

import pytest
import torch

from pytest_specdec.bench.session import SpecdecSession
from pytest_specdec.engine import GenerationRequest, attach, generate
from pytest_specdec.engine.integrity import TargetChanged
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.drafter import Draft, DraftError, DrafterBase, TargetInfo
from pytest_specdec.protocol.sampling import Sampler
from conftest import tiny_model
from test_memory import LiveTensors

PROMPT = (1, 17, 42, 99, 250, 3, 77)


class Collector(DrafterBase):
    """Drafts the known truth (a chain, or a tree with a wrong sibling first) and
    keeps every hidden-state row it is given, by position."""

    def __init__(self, truth, *, layers=(), needs=frozenset({"hidden_states"}), tree=False):
        self.needs = frozenset(needs)
        self.hidden_layers = layers
        self.truth, self.tree = list(truth), tree
        self.rows: dict[int, torch.Tensor] = {}
        self.infos: list[TargetInfo] = []
        self.requests = []

    def attach(self, target):
        self.infos.append(target)

    def begin(self, request):
        self.requests.append(request)

    def propose(self, context, k):
        done = len(context) - len(PROMPT)
        chain = tuple(self.truth[done:done + min(k, 3)])
        if not self.tree or not chain:
            return Draft(chain)
        wrong = (chain[0] + 1) % 100
        return Draft((wrong, *chain), (-1, -1, *range(1, len(chain))))

    def observe(self, signals):
        start = signals.hidden_start
        for i, row in enumerate(signals.hidden_states):
            assert start + i not in self.rows, "a position was given twice"
            self.rows[start + i] = row.clone()


def reference_states(target, tokens, layers):
    with torch.no_grad():
        out = target.model(input_ids=torch.tensor([tokens]), output_hidden_states=True)
    return torch.cat([out.hidden_states[i][0] for i in layers], dim=-1)


@pytest.mark.parametrize("layers, resolved", [((), (2,)), ((1, -1), (1, 2)), ((0, 2, 1), (0, 2, 1))])
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
def test_hidden_states_cover_every_context_position_once(llama, layers, resolved, tree, exact):
    truth = generate(llama, GenerationRequest(PROMPT, 10)).tokens
    drafter = Collector(truth, layers=layers, tree=tree)
    out = generate(llama, GenerationRequest(PROMPT, 10), drafter, k=4, exact=exact)
    assert out.tokens == truth
    sequence = [*PROMPT, *out.tokens]
    # every position but the newest, each once, in order
    assert sorted(drafter.rows) == list(range(len(sequence) - 1))
    expected = reference_states(llama, sequence[:-1], resolved)
    got = torch.stack([drafter.rows[i] for i in range(len(sequence) - 1)])
    assert got.shape == (len(sequence) - 1, 64 * len(resolved))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_attach_runs_once_per_drafter_and_tells_the_target(llama):
    truth = generate(llama, GenerationRequest(PROMPT, 6)).tokens
    drafter = Collector(truth, needs={"embeddings", "output_head"})
    for _ in range(3):
        generate(llama, GenerationRequest(PROMPT, 6), drafter, k=4)
    assert len(drafter.infos) == 1
    info = drafter.infos[0]
    assert (info.vocab_size, info.hidden_size, info.num_layers) == (llama.vocab_size, 64, 2)
    assert info.dtype == torch.float32 and info.device == llama.device
    assert info.embeddings.data_ptr() == llama.model.get_input_embeddings().weight.data_ptr()
    assert info.output_head.shape == (llama.vocab_size, 64)
    plain = Collector(truth, needs=())
    generate(llama, GenerationRequest(PROMPT, 6), plain, k=4)
    assert plain.infos[0].embeddings is None and plain.infos[0].output_head is None


def test_the_request_carries_the_coupled_sampler(llama):
    drafter = Collector((), needs=())
    sampler = Sampler(0.6, 1234)
    generate(llama, GenerationRequest(PROMPT, 4, sampler), drafter, k=4)
    assert drafter.requests[0].sampler == sampler


class Writer(Collector):
    def __init__(self, when, how):
        super().__init__((), needs={"embeddings"})
        self.when, self.how = when, how

    def attach(self, target):
        self.weight = target.embeddings

    def accept(self, tokens):
        if self.when == "accept":
            self.how(self.weight)

    def end(self):
        if self.when == "end":
            self.how(self.weight)


def reloading_session(loads: list) -> SpecdecSession:
    """A session on a fresh tiny target, reloaded (appended to `loads`) after a case
    that changed it, as a run's session reloads its target."""

    def load():
        loads.append(wrap_model(tiny_model("llama"), name="tiny-llama"))
        return loads[-1]

    return SpecdecSession(config=None, registry=None, problems=[], load_target=load)


@pytest.mark.parametrize("when, how", [
    ("accept", lambda w: w.add_(1.0)),
    ("accept", lambda w: w[3].fill_(1.0)),
    ("end", lambda w: w.data.mul_(2.0)),  # no version bump: caught by the checksum
], ids=["in-place", "through-a-view", "through-data"])
def test_writing_to_a_lent_tensor_fails_its_case_and_the_next_case_sees_an_intact_target(
        when, how):
    loads: list = []
    s = reloading_session(loads)
    clean = generate(s.target, GenerationRequest(PROMPT, 8)).tokens
    written = s.target.model
    with pytest.raises(DraftError) as caught:
        generate(s.target, GenerationRequest(PROMPT, 8), Writer(when, how), k=4)
    assert caught.value.rule == "the target's tensors are read-only"
    assert "embeddings" in caught.value.detail
    # nothing was copied to set it back: the session's check after the case finds the
    # write, fails the case and drops the target
    with pytest.raises(TargetChanged) as changed:
        s.check_target_intact("writer on multi_round")
    assert changed.value.changes == ("model.embed_tokens.weight",)
    assert s.target.model is not written and len(loads) == 2
    assert generate(s.target, GenerationRequest(PROMPT, 8)).tokens == clean
    s.check_target_intact("pld on multi_round")


def test_attaching_several_drafter_instances_copies_no_lent_tensor(tiny_target):
    lent = [tiny_target.model.get_input_embeddings().weight,
            tiny_target.model.get_output_embeddings().weight]
    drafters = [Collector((), needs={"embeddings", "output_head"}) for _ in range(4)]
    with LiveTensors() as live:
        for drafter in drafters:
            attach(tiny_target, drafter, "collector")
    # what the attachments keep is their fingerprints (a copy per instance kept 4 of each)
    assert live.bytes < min(t.numel() * t.element_size() for t in lent) // 8
    for drafter in drafters:
        info = drafter.infos[0]
        assert info.embeddings.data_ptr() == lent[0].data_ptr()
        assert info.output_head.data_ptr() == lent[1].data_ptr()


@pytest.mark.parametrize("layers", [(3,), (-4,), ("1",), 2, (True,)])
def test_bad_hidden_layers_fail_the_drafter(llama, layers):
    drafter = Collector((), layers=layers)
    with pytest.raises(DraftError, match=r"hidden_layers is a tuple of layer indices in \[-3, 2\]"):
        attach(llama, drafter, "bad")


def test_attach_that_raises_fails_the_case_naming_the_drafter(llama):
    class Broken(DrafterBase):
        def attach(self, target):
            raise FileNotFoundError("no weights at /nowhere")

    with pytest.raises(DraftError) as caught:
        generate(llama, GenerationRequest(PROMPT, 4), Broken(), k=4, drafter_name="broken")
    assert caught.value.drafter == "broken" and caught.value.rule == "attach does not raise"
    assert "/nowhere" in caught.value.detail


def test_observe_and_accept_count_as_drafter_time(llama):
    import time

    class Slow(Collector):
        def accept(self, tokens):
            time.sleep(0.01)

    out = generate(llama, GenerationRequest(PROMPT, 4), Slow((), needs=()), k=4)
    assert all(step.drafter_s >= 0.01 for step in out.steps)


class AttachWriter(Collector):
    """Keeps a lent tensor in attach and writes to it there, before any sequence."""

    def __init__(self, lent, how):
        super().__init__((), needs={lent})
        self.lent, self.how = lent, how

    def attach(self, target):
        self.weight = getattr(target, self.lent)
        with torch.no_grad():
            self.how(self.weight)


@pytest.mark.parametrize("lent, how", [
    ("output_head", lambda w: w.mul_(0.5)),
    ("embeddings", lambda w: w[3].fill_(1.0)),
    ("output_head", lambda w: w.data.zero_()),  # no version bump: caught by the digest
], ids=["in-place", "through-a-view", "through-data"])
def test_writing_to_a_lent_tensor_in_attach_fails_the_case_and_the_target_is_reloaded(
        lent, how):
    loads: list = []
    s = reloading_session(loads)
    clean = generate(s.target, GenerationRequest(PROMPT, 8)).tokens
    with pytest.raises(DraftError) as caught:
        generate(s.target, GenerationRequest(PROMPT, 8), AttachWriter(lent, how), k=4,
                 drafter_name="writer")
    assert caught.value.drafter == "writer"
    assert caught.value.rule == "the target's tensors are read-only"
    assert caught.value.detail == f"attach wrote to the target's {lent}"
    with pytest.raises(TargetChanged) as changed:
        s.check_target_intact("writer on multi_round")
    assert changed.value.changes == ({"embeddings": "model.embed_tokens.weight",
                                      "output_head": "lm_head.weight"}[lent],)
    # a drafter run after it sees the intact target: the output it has without the writer
    fresh = tiny_model("llama")
    probe = Collector(clean, needs={"embeddings", "output_head"})
    assert generate(s.target, GenerationRequest(PROMPT, 8), probe, k=4).tokens == clean
    assert torch.equal(probe.infos[0].output_head, fresh.get_output_embeddings().weight)
    assert torch.equal(probe.infos[0].embeddings, fresh.get_input_embeddings().weight)


def test_a_lent_tensor_written_by_a_call_that_raises_is_caught(tiny_target):
    class WritesThenRaises(Collector):
        def __init__(self):
            super().__init__((), needs={"embeddings"})

        def attach(self, target):
            target.embeddings.data.add_(1.0)
            raise RuntimeError("no weights")

    with pytest.raises(DraftError) as caught:
        generate(tiny_target, GenerationRequest(PROMPT, 4), WritesThenRaises(), k=4)
    assert caught.value.rule == "the target's tensors are read-only"
    assert caught.value.detail == ("attach wrote to the target's embeddings "
                                   "(RuntimeError: no weights)")


class Unhashable(Collector):
    """A drafter that cannot be a dict key (``__eq__`` without ``__hash__``, as a
    dataclass has): attached once all the same, by identity."""

    __hash__ = None

    def __eq__(self, other):
        return isinstance(other, Unhashable)


def test_attachments_are_the_targets_held_by_identity(llama):
    from pytest_specdec.engine.target import wrap_model
    from conftest import tiny_model

    truth = generate(llama, GenerationRequest(PROMPT, 6)).tokens
    first, second = Unhashable(truth, needs=()), Unhashable(truth, needs=())
    for _ in range(3):
        generate(llama, GenerationRequest(PROMPT, 6), first, k=4)
    generate(llama, GenerationRequest(PROMPT, 6), second, k=4)
    assert len(first.infos) == 1 and len(second.infos) == 1  # equal, yet two drafters
    assert attach(llama, first) is llama.attached.get(first)
    other = wrap_model(tiny_model("llama"), name="tiny-llama-2")
    generate(other, GenerationRequest(PROMPT, 6), first, k=4)
    assert len(first.infos) == 2  # another target: attached to it too
