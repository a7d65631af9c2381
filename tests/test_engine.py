"""The decode loop: baseline == naive decoding, speculative == baseline whatever the
drafter proposes, budget and EOS handling, statistics, and the drafter protocol guard."""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

import pytest
import torch

from pytest_specdec.engine import SIGNAL_TOP_K, Generation, GenerationRequest, TokenView, generate
from pytest_specdec.engine.target import Target
from pytest_specdec.protocol.drafter import (Draft, DraftError, DraftRequest, DrafterBase,
                                             TargetSignals)
from pytest_specdec.protocol.sampling import Sampler

PROMPT = (1, 17, 42, 99, 250, 3, 77)
VOCAB = 512


def run(target: Target, drafter=None, *, k: int = 0, max_new_tokens: int = 40,
        temperature: float = 0.0, seed: int = 0, prompt: Sequence[int] = PROMPT,
        name: str = "drafter") -> Generation:
    request = GenerationRequest(tuple(prompt), max_new_tokens, Sampler(temperature, seed))
    return generate(target, request, drafter, k=k, drafter_name=name)


def naive_greedy(target: Target, prompt: Sequence[int], n: int) -> list[int]:
    """Reference decoder: no cache, a full forward over the whole sequence every step."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = target.model(input_ids=torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            ids.append(token)
            out.append(token)
    return out


# --- scripted drafters --------------------------------------------------------------------

class Oracle(DrafterBase):
    """Proposes the true continuation (precomputed), up to k tokens."""

    def __init__(self, truth: Sequence[int], prompt_len: int = len(PROMPT)):
        self.truth, self.prompt_len = list(truth), prompt_len
        self.ks: list[int] = []

    def propose(self, context, k):
        self.ks.append(k)
        done = len(context) - self.prompt_len
        return Draft(tuple(self.truth[done:done + k]))


class Scripted(DrafterBase):
    """Step i proposes k tokens: the first right[i] are the true ones, the rest wrong."""

    def __init__(self, truth: Sequence[int], right: Callable[[int], int]):
        self.truth, self.right, self.step = list(truth), right, 0

    def propose(self, context, k):
        done = len(context) - len(PROMPT)
        true = self.truth[done:done + k]
        n = min(self.right(self.step), k)
        self.step += 1
        return Draft(tuple(true[:n]) + tuple((t + 1) % VOCAB for t in true[n:]))


class RandomTokens(DrafterBase):
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def propose(self, context, k):
        return Draft(tuple(self.rng.randrange(VOCAB) for _ in range(k)))


# --- baseline -----------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [PROMPT, (5,)], ids=["prompt7", "prompt1"])
def test_baseline_equals_naive_decoding(target, prompt):
    out = run(target, max_new_tokens=40, prompt=prompt)
    assert out.tokens == naive_greedy(target, prompt, 40)
    assert out.stop == "budget"


def test_baseline_stats(llama):
    out = run(llama, max_new_tokens=12)
    s = out.stats
    assert (s.steps, s.new_tokens, s.drafted, s.accepted) == (12, 12, 0, 0)
    assert (s.drafted_at, s.accepted_at) == ([], [])
    assert s.mat == 1.0
    assert s.acceptance_rate is None


def test_a_drafter_with_k_zero_is_never_asked_and_changes_nothing(llama):
    truth = run(llama, max_new_tokens=12).tokens
    oracle = Oracle(truth)
    out = run(llama, oracle, k=0, max_new_tokens=12)
    assert out.tokens == truth
    assert oracle.ks == []
    assert out.stats.steps == 12


@pytest.mark.parametrize("max_new_tokens, prompt, match", [
    (0, PROMPT, "max_new_tokens must be >= 1, got 0"),
    (-3, PROMPT, "got -3"),
    (5, (), "prompt is empty"),
])
def test_invalid_requests_raise(llama, max_new_tokens, prompt, match):
    with pytest.raises(ValueError, match=match):
        run(llama, max_new_tokens=max_new_tokens, prompt=prompt)


# --- losslessness with adversarial drafters -----------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_oracle_drafter_is_lossless_and_fast(target, temperature):
    truth = run(target, max_new_tokens=40, temperature=temperature, seed=3).tokens
    out = run(target, Oracle(truth), k=4, max_new_tokens=40, temperature=temperature, seed=3)
    assert out.tokens == truth
    assert out.stats.mat > 2
    # everything proposed is right: only the budget cap shortens drafts
    assert out.stats.accepted == out.stats.drafted == 32
    assert out.stats.steps == 8


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_random_drafter_is_lossless(target, temperature):
    truth = run(target, max_new_tokens=40, temperature=temperature, seed=3).tokens
    out = run(target, RandomTokens(), k=4, max_new_tokens=40, temperature=temperature, seed=3)
    assert out.tokens == truth
    assert out.stats.drafted >= 100
    assert out.stats.acceptance_rate < 0.05
    assert out.stats.mat < 1.2


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_half_right_drafter_is_lossless_with_exact_stats(target, temperature):
    truth = run(target, max_new_tokens=12, temperature=temperature, seed=3).tokens
    out = run(target, Scripted(truth, lambda step: 2), k=4, max_new_tokens=12,
              temperature=temperature, seed=3)
    assert out.tokens == truth
    # new 0 -> 3 -> 6 -> 9 with drafts of 4 (2 right); then room is 2: both right -> 12
    s = out.stats
    assert (s.steps, s.new_tokens, s.drafted, s.accepted) == (4, 12, 14, 8)
    assert s.drafted_at == [4, 4, 3, 3]
    assert s.accepted_at == [4, 4]
    assert s.mat == 3.0
    # the per-step records, one per target forward, in order
    assert [(r.drafted, r.accepted, r.emitted) for r in out.steps] == [
        (4, 2, 3), (4, 2, 3), (4, 2, 3), (2, 2, 3)]
    assert all(r.drafter_s >= 0 and r.target_s > 0 for r in out.steps)


def test_sampled_output_does_not_depend_on_the_drafter(llama):
    outputs = {name: run(llama, drafter, k=3, max_new_tokens=30, temperature=1.0, seed=11).tokens
               for name, drafter in [("none", None), ("random", RandomTokens(1))]}
    outputs["oracle"] = run(llama, Oracle(outputs["none"]), k=3, max_new_tokens=30,
                            temperature=1.0, seed=11).tokens
    assert outputs["none"] == outputs["random"] == outputs["oracle"]


# --- statistics ---------------------------------------------------------------------------

# right(step) -> the number of leading true tokens in that step's draft (k tokens drafted)
STATS_CASES = [
    # id, k, budget, right, steps, drafted, accepted, drafted_at, accepted_at
    ("all-wrong", 3, 6, lambda i: 0, 6, 12, 0, [5, 4, 3], []),
    ("all-right", 3, 10, lambda i: 3, 3, 7, 7, [3, 2, 2], [3, 2, 2]),
    ("ramp", 3, 12, lambda i: [0, 1, 2, 3][min(i, 3)], 5, 13, 7, [5, 4, 4], [4, 2, 1]),
    ("alternate", 2, 9, lambda i: 2 * (i % 2), 5, 8, 4, [4, 4], [2, 2]),
]


@pytest.mark.parametrize("k, budget, right, steps, drafted, accepted, drafted_at, accepted_at",
                         [c[1:] for c in STATS_CASES], ids=[c[0] for c in STATS_CASES])
def test_stats_of_a_scripted_drafter(llama, k, budget, right, steps, drafted, accepted,
                                     drafted_at, accepted_at):
    truth = run(llama, max_new_tokens=budget).tokens
    out = run(llama, Scripted(truth, right), k=k, max_new_tokens=budget)
    s = out.stats
    assert out.tokens == truth
    assert (s.steps, s.new_tokens, s.drafted, s.accepted) == (steps, budget, drafted, accepted)
    assert (s.drafted_at, s.accepted_at) == (drafted_at, accepted_at)
    assert s.mat == budget / steps
    assert s.new_tokens == s.steps + s.accepted


# --- budget and EOS -----------------------------------------------------------------------

def test_budget_is_exact_with_a_long_oracle_draft(llama):
    truth = run(llama, max_new_tokens=40).tokens
    oracle = Oracle(truth)
    out = run(llama, oracle, k=8, max_new_tokens=10)
    assert out.tokens == truth[:10]
    assert out.stop == "budget"
    # 8 accepted + bonus = 9, then no room for a draft: one plain step
    assert oracle.ks == [8]
    assert out.stats.steps == 2
    assert out.stats.new_tokens == 10


@pytest.mark.parametrize("budget, k, ks", [
    (10, 8, [8, 6, 3]),
    (7, 8, [6, 3]),
    (3, 8, [2]),
    (1, 8, []),
    (12, 2, [2, 2, 2, 2]),
])
def test_draft_is_capped_by_the_remaining_budget(llama, budget, k, ks):
    truth = run(llama, max_new_tokens=budget).tokens

    class TwoRight(Oracle):
        def propose(self, context, k):
            draft = super().propose(context, k)
            return Draft(draft.tokens[:2])

    drafter = TwoRight(truth)
    out = run(llama, drafter, k=k, max_new_tokens=budget)
    assert out.tokens == truth
    assert len(out.tokens) == budget
    assert drafter.ks == ks


def test_a_draft_past_the_budget_is_a_protocol_error(llama):
    greedy = Oracle([0] * 40)

    class IgnoresK(DrafterBase):
        def propose(self, context, k):
            return greedy.propose(context, 8)

    with pytest.raises(DraftError, match="at most k tokens") as info:
        run(llama, IgnoresK(), k=8, max_new_tokens=5, name="greedy-drafter")
    assert "proposed depth 8 with k=4" in str(info.value)


def _eos_case(target: Target, temperature: float) -> tuple[Target, list[int], int]:
    """A target whose EOS is the token the baseline emits at step >= 6 (first time seen)."""
    full = run(target, max_new_tokens=40, temperature=temperature, seed=5).tokens
    at = next(i for i in range(6, 40) if full[i] not in full[:i])
    return dataclasses.replace(target, eos_ids=frozenset({full[at]})), full, at


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_speculative_stops_exactly_at_eos(target, temperature, k):
    eos_target, full, at = _eos_case(target, temperature)
    baseline = run(eos_target, max_new_tokens=40, temperature=temperature, seed=5)
    assert baseline.tokens == full[:at + 1]
    assert baseline.stop == "eos"
    # the oracle knows the text past the EOS and proposes it
    out = run(eos_target, Oracle(full), k=k, max_new_tokens=40, temperature=temperature, seed=5)
    assert out.tokens == baseline.tokens
    assert out.stop == "eos"
    assert out.stats.new_tokens == at + 1


def test_eos_at_the_first_token(llama):
    first = run(llama, max_new_tokens=1).tokens[0]
    eos_target = dataclasses.replace(llama, eos_ids=frozenset({first}))
    out = run(eos_target, Oracle([first] * 10), k=4, max_new_tokens=10)
    assert (out.tokens, out.stop, out.stats.steps) == ([first], "eos", 1)


# --- the drafter life cycle and what drafters see -----------------------------------------

class Recorder(DrafterBase):
    def __init__(self, truth, needs=frozenset()):
        self.needs = frozenset(needs)
        self.truth, self.events = list(truth), []

    def begin(self, request):
        self.events.append(("begin", request))

    def propose(self, context, k):
        self.events.append(("propose", tuple(context)))
        done = len(context) - len(PROMPT)
        return Draft(tuple(self.truth[done:done + min(k, 2)]))

    def observe(self, signals):
        self.events.append(("observe", signals))

    def accept(self, tokens):
        self.events.append(("accept", tokens))

    def end(self):
        self.events.append(("end", None))


def test_life_cycle_and_live_context(llama):
    truth = run(llama, max_new_tokens=9).tokens
    drafter = Recorder(truth)
    request = GenerationRequest(PROMPT, 9, Sampler(), group="g1", sample=2, round=1)
    out = generate(llama, request, drafter, k=4)
    kinds = [kind for kind, _ in drafter.events]
    # 3 steps of 3 tokens each (2 accepted + bonus): no observe without needs
    assert kinds == ["begin"] + ["propose", "accept"] * 3 + ["end"]
    assert drafter.events[0][1] == DraftRequest(PROMPT, "g1", 2, 1)
    proposes = [payload for kind, payload in drafter.events if kind == "propose"]
    accepts = [payload for kind, payload in drafter.events if kind == "accept"]
    assert proposes == [PROMPT, PROMPT + tuple(truth[:3]), PROMPT + tuple(truth[:6])]
    assert accepts == [tuple(truth[0:3]), tuple(truth[3:6]), tuple(truth[6:9])]
    assert all(isinstance(a, tuple) for a in accepts)
    assert out.tokens == truth


def test_top_k_signals_arrive_before_each_accept(llama):
    truth = run(llama, max_new_tokens=9).tokens
    drafter = Recorder(truth, needs={"top_k"})
    run(llama, drafter, k=4, max_new_tokens=9)
    kinds = [kind for kind, _ in drafter.events]
    assert kinds == ["begin"] + ["propose", "observe", "accept"] * 3 + ["end"]
    for i, (kind, signals) in enumerate(drafter.events):
        if kind != "observe":
            continue
        context = drafter.events[i - 1][1]
        accepted = drafter.events[i + 1][1]
        assert isinstance(signals, TargetSignals)
        # one row after the last context token, one after each of the 2 draft tokens
        assert signals.top_k.shape == (3, SIGNAL_TOP_K) == (3, 8)
        assert signals.top_k_after == (context[-1], *accepted[:-1])
        assert signals.hidden_states is None and signals.probe_choices is None
        # at T=0 the target's top-1 is exactly what it emitted
        assert signals.top_k[:, 0].tolist() == list(accepted)


def test_hidden_state_signals(llama):
    truth = run(llama, max_new_tokens=6).tokens
    drafter = Recorder(truth, needs={"hidden_states"})
    run(llama, drafter, k=4, max_new_tokens=6)
    observed = [s for kind, s in drafter.events if kind == "observe"]
    # the first observe covers the 7 prompt positions and the 2 accepted tokens; the
    # next, the step's bonus token and 2 accepted ones (the newest token has no state)
    assert [tuple(s.hidden_states.shape) for s in observed] == [(9, 64), (3, 64)]
    assert [s.hidden_start for s in observed] == [0, 9]
    assert all(s.top_k is None for s in observed)


def test_signals_carry_no_autograd_graph(llama):
    truth = run(llama, max_new_tokens=6).tokens
    drafter = Recorder(truth, needs={"hidden_states"})
    run(llama, drafter, k=4, max_new_tokens=6)
    observed = [s for kind, s in drafter.events if kind == "observe"]
    assert not any(s.hidden_states.requires_grad for s in observed)


def test_token_view_is_read_only_and_live():
    tokens = [4, 5, 6, 7]
    view = TokenView(tokens)
    assert len(view) == 4 and view[0] == 4 and view[-1] == 7
    assert view[1:3] == (5, 6) and isinstance(view[1:3], tuple)
    assert view[::-1] == (7, 6, 5, 4) and isinstance(view[:], tuple)
    assert list(view) == tokens and 6 in view and view.index(6) == 2
    with pytest.raises(TypeError):
        view[0] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        del view[0]  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        view.append(8)  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        view.extend([8])  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        view.other = 1  # type: ignore[attr-defined]
    assert tokens == [4, 5, 6, 7]
    tokens.append(8)  # the engine's own appends show through
    assert len(view) == 5 and view[-1] == 8


def test_a_drafter_cannot_mutate_the_context(llama):
    class Mutator(DrafterBase):
        def propose(self, context, k):
            context.append(3)
            return Draft()

    with pytest.raises(DraftError, match="propose does not raise") as info:
        run(llama, Mutator(), k=2, max_new_tokens=4, name="mutator")
    assert "AttributeError" in str(info.value)
    assert info.value.drafter == "mutator"


# --- hostile drafters ---------------------------------------------------------------------

def _propose(fn):
    class Hostile(DrafterBase):
        def propose(self, context, k):
            return fn(k)
    return Hostile()


class RaisesInAccept(DrafterBase):
    def accept(self, tokens):
        raise RuntimeError("accept exploded")


class RaisesInBegin(DrafterBase):
    def begin(self, request):
        raise KeyError("no such group")


class RaisesInPropose(DrafterBase):
    def propose(self, context, k):
        raise RuntimeError("propose exploded")


class NeedsWithoutObserve:
    needs = frozenset({"top_k"})

    def begin(self, request): ...
    def propose(self, context, k): return Draft()
    def accept(self, tokens): ...
    def end(self): ...


HOSTILE = [
    # id, drafter, rule (substring), detail (substring)
    ("none", _propose(lambda k: None), "propose returns a Draft", "got NoneType"),
    ("list", _propose(lambda k: [1, 2]), "propose returns a Draft", "got list"),
    ("tuple", _propose(lambda k: (1, 2)), "propose returns a Draft", "got tuple"),
    ("list-tokens", _propose(lambda k: Draft([1, 2])), "Draft.tokens is a tuple of ints", "got list"),
    ("negative", _propose(lambda k: Draft((3, -1))), f"token ids in [0, {VOCAB})", "token 1 is -1"),
    ("vocab-size", _propose(lambda k: Draft((VOCAB,))), f"token ids in [0, {VOCAB})", "token 0 is 512"),
    ("float", _propose(lambda k: Draft((1.0,))), "token ids are ints", "token 0 is 1.0"),
    ("bool", _propose(lambda k: Draft((True,))), "token ids are ints", "token 0 is True"),
    ("tensor", _propose(lambda k: Draft((torch.tensor(3),))), "token ids are ints", "token 0 is"),
    ("too-long", _propose(lambda k: Draft((1,) * (k + 1))), "at most k tokens deep", "proposed depth 4 with k=3"),
    ("too-deep-tree", _propose(lambda k: Draft((1,) * (k + 1), parents=tuple(range(-1, k)))),
     "at most k tokens deep", "proposed depth 4 with k=3"),
    ("too-wide-tree", _propose(lambda k: Draft((1,) * 257, parents=(-1,) * 257)),
     "at most 256 draft nodes", "proposed 257"),
    ("probe-parents", _propose(lambda k: Draft((1,), probe_tokens=(2, 3), probe_parents=(-1, 1))),
     "probe parents come before children", "probe_parents[1] = 1"),
    ("probe-range", _propose(lambda k: Draft((), probe_tokens=(10**6,), probe_parents=(-1,))),
     "probe token ids are ints in", "probe token 0 is 1000000"),
    ("parents-len", _propose(lambda k: Draft((1, 2), parents=(-1,))), "one parent per token",
     "1 parents for 2 tokens"),
    ("parents-order", _propose(lambda k: Draft((1, 2), parents=(-1, 1))),
     "parents come before children", "parents[1] = 1"),
    ("raises-propose", RaisesInPropose(), "propose does not raise", "RuntimeError: propose exploded"),
    ("raises-accept", RaisesInAccept(), "accept does not raise", "RuntimeError: accept exploded"),
    ("raises-begin", RaisesInBegin(), "begin does not raise", "KeyError"),
    ("no-observe", NeedsWithoutObserve(), "observe does not raise", "AttributeError"),
]


@pytest.mark.parametrize("drafter, rule, detail", [h[1:] for h in HOSTILE],
                         ids=[h[0] for h in HOSTILE])
def test_hostile_drafter_raises_draft_error_naming_it(llama, drafter, rule, detail):
    with pytest.raises(DraftError) as info:
        run(llama, drafter, k=3, max_new_tokens=6, name="hostile-7")
    error = info.value
    assert error.drafter == "hostile-7"
    assert rule in error.rule
    message = str(error)
    assert "drafter 'hostile-7' broke the rule" in message
    assert rule in message and detail in message


def test_a_chain_given_with_parents_is_accepted(llama):
    truth = run(llama, max_new_tokens=8).tokens

    class ChainWithParents(Oracle):
        def propose(self, context, k):
            tokens = super().propose(context, k).tokens
            return Draft(tokens, parents=tuple(range(-1, len(tokens) - 1)))

    drafter = ChainWithParents(truth)
    out = run(llama, drafter, k=3, max_new_tokens=8)
    assert out.tokens == truth
    assert out.stats.accepted == 6
