"""Tree verification: the exact accepted path on hand-built trees, the cache keeping
only that path, probes scored and never accepted, output equal to the baseline on two
architectures at T=0 and T>0, and a clear error where a target cannot take a tree.
Sliding-window targets: tests/test_sliding.py."""

from __future__ import annotations

import random
from typing import Sequence

import pytest
import torch

from conftest import tiny_model
from pytest_specdec.engine import GenerationRequest, generate, speculative_step
from pytest_specdec.engine.target import Target, wrap_model
from pytest_specdec.protocol.drafter import Draft, DrafterBase
from pytest_specdec.protocol.sampling import Sampler

PROMPT = (1, 17, 42, 99, 250, 3, 77)
VOCAB = 512


def run(target: Target, drafter=None, *, k: int = 4, max_new_tokens: int = 40,
        temperature: float = 0.0, seed: int = 0) -> list[int]:
    request = GenerationRequest(PROMPT, max_new_tokens, Sampler(temperature, seed))
    return generate(target, request, drafter, k=k, drafter_name="tree").tokens


# --- hand-built trees: the exact path ----------------------------------------------------

# Tokens are written symbolically: "t<i>" is the baseline's i-th new token, "x"/"y" are
# tokens the target does not choose there. parents -1 = child of the last prompt token.
TREES = [
    # id, tokens, parents, expected path (node indices), emitted (symbolic)
    ("chain-as-tree", ("t0", "t1", "t2"), (-1, 0, 1), [0, 1, 2], ("t0", "t1", "t2", "t3")),
    ("second-sibling", ("x", "t0", "t1"), (-1, -1, 1), [1, 2], ("t0", "t1", "t2")),
    ("deep-right-branch", ("t0", "x", "t1", "t1"), (-1, -1, 1, 0), [0, 3], ("t0", "t1", "t2")),
    ("right-token-wrong-parent", ("x", "t1"), (-1, 0), [], ("t0",)),
    ("first-matching-sibling-wins", ("t0", "t0", "t1"), (-1, -1, 1), [0], ("t0", "t1")),
    ("nothing-right", ("x", "y"), (-1, -1), [], ("t0",)),
    ("wide-then-deep", ("x", "y", "t0", "x", "t1", "y", "t2"), (-1, -1, -1, 2, 2, 4, 4),
     [2, 4, 6], ("t0", "t1", "t2", "t3")),
    ("wrong-below-right", ("t0", "t1", "x"), (-1, 0, 1), [0, 1], ("t0", "t1", "t2")),
]


def _resolve(symbols: Sequence[str], truth: Sequence[int]) -> tuple[int, ...]:
    wrong = {"x": (truth[0] + 1) % VOCAB, "y": (truth[0] + 2) % VOCAB}
    # "x"/"y" must differ from every token the target could choose at depths 0..3
    while wrong["x"] in truth[:4] or wrong["y"] in truth[:4] or wrong["x"] == wrong["y"]:
        wrong = {"x": (wrong["x"] + 3) % VOCAB, "y": (wrong["y"] + 5) % VOCAB}
    return tuple(truth[int(s[1:])] if s.startswith("t") else wrong[s] for s in symbols)


@pytest.mark.parametrize("tokens, parents, path, emitted", [c[1:] for c in TREES],
                         ids=[c[0] for c in TREES])
def test_tree_accepts_exactly_the_expected_path(target, tokens, parents, path, emitted):
    truth = run(target, max_new_tokens=6)
    cache = target.new_cache()
    draft = Draft(_resolve(tokens, truth), parents)
    with torch.inference_mode():
        step = speculative_step(target, Sampler(), cache, list(PROMPT), 0, draft)
    assert step.emitted == list(_resolve(emitted, truth))
    assert [draft.tokens[i] for i in path] == step.emitted[:-1]
    # the cache holds the prompt and the accepted path, nothing else
    assert cache.get_seq_length() == len(PROMPT) + len(path)


def test_cache_after_a_branch_equals_a_fresh_prefill(target):
    """The accepted path was moved into place: continuing from the cache gives the
    logits a cache built from scratch over the same tokens gives."""
    truth = run(target, max_new_tokens=6)
    x = _resolve(("x",), truth)[0]
    cache = target.new_cache()
    with torch.inference_mode():
        step = speculative_step(target, Sampler(), cache, list(PROMPT), 0,
                                Draft((x, truth[0], x, truth[1]), (-1, -1, 1, 1)))
        assert step.emitted == truth[:3]
        context = [*PROMPT, *step.emitted]
        after_tree, _ = target.forward(context[-1:], cache)
        fresh, _ = target.forward(context, target.new_cache(), keep_logits=1)
    torch.testing.assert_close(after_tree[-1], fresh[-1], rtol=1e-4, atol=1e-4)


def test_probes_are_scored_never_accepted(target):
    truth = run(target, max_new_tokens=6)
    cache = target.new_cache()
    draft = Draft((truth[0],), probe_tokens=(truth[0], truth[1], 7), probe_parents=(-1, 0, -1))
    with torch.inference_mode():
        step = speculative_step(target, Sampler(), cache, list(PROMPT), 0, draft)
    assert step.emitted == truth[:2]
    # a probe on the true path sees what the chain would: its choice is the next true token
    assert step.probe_choices[:2] == tuple(truth[1:3])
    assert len(step.probe_choices) == 3
    assert cache.get_seq_length() == len(PROMPT) + 1


def test_top_k_covers_the_root_and_every_draft_node(llama):
    truth = run(llama, max_new_tokens=6)
    x = _resolve(("x",), truth)[0]
    with torch.inference_mode():
        step = speculative_step(llama, Sampler(), llama.new_cache(), list(PROMPT), 0,
                                Draft((x, truth[0], truth[1]), (-1, -1, 1)), top_k=8)
    assert step.top_k.shape == (4, 8)
    # at T=0 the top-1 after the root and after each right node is the true next token
    assert step.top_k[0, 0] == truth[0]
    assert step.top_k[2:, 0].tolist() == truth[1:3]


# --- whole generations: output equals the baseline ---------------------------------------

class NoisyTree(DrafterBase):
    """A random tree around the true continuation: at each depth a few wrong siblings,
    the true token at a random place (or missing), plus random probes."""

    def __init__(self, truth: Sequence[int], seed: int, width: int = 3, probes: int = 4):
        self.truth, self.rng = list(truth), random.Random(seed)
        self.width, self.probes = width, probes

    def propose(self, context, k):
        done = len(context) - len(PROMPT)
        tokens: list[int] = []
        parents: list[int] = []
        parent = -1
        for depth in range(min(k, len(self.truth) - done)):
            true_at = self.rng.randrange(self.width + 1)  # == width: the truth is missing
            on_path = -1
            for j in range(self.width):
                token = self.truth[done + depth] if j == true_at else self.rng.randrange(VOCAB)
                tokens.append(token)
                parents.append(parent)
                if j == true_at:
                    on_path = len(tokens) - 1
            if on_path < 0:
                break
            parent = on_path
        probe_tokens = tuple(self.rng.randrange(VOCAB) for _ in range(self.probes))
        probe_parents = tuple(self.rng.randrange(-1, i) for i in range(self.probes))
        return Draft(tuple(tokens), tuple(parents), probe_tokens, probe_parents)


@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("seed", [0, 1])
def test_tree_output_equals_baseline(target, temperature, seed):
    truth = run(target, max_new_tokens=40, temperature=temperature, seed=seed)
    request = GenerationRequest(PROMPT, 40, Sampler(temperature, seed))
    out = generate(target, request, NoisyTree(truth, seed), k=4, drafter_name="noisy-tree")
    assert out.tokens == truth
    assert out.stats.mat > 1.3  # the tree really carried accepted tokens
    assert out.stats.drafted > out.stats.accepted  # and wrong siblings were verified
    assert len(out.stats.drafted_at) == 4  # per-position counts go by depth, not nodes


@pytest.mark.parametrize("arch", ["qwen3", "gemma"])
def test_tree_output_equals_baseline_on_more_families(arch):
    family = wrap_model(tiny_model(arch), name=f"tiny-{arch}")
    assert family.tree_support() == ""
    for temperature in (0.0, 0.6):
        truth = run(family, max_new_tokens=30, temperature=temperature, seed=2)
        out = run(family, NoisyTree(truth, 2), temperature=temperature, seed=2, max_new_tokens=30)
        assert out == truth


def test_tree_with_eager_attention_equals_baseline():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    eager = wrap_model(model, name="tiny-llama-eager")
    truth = run(eager, max_new_tokens=30, temperature=0.6, seed=3)
    assert eager.tree_support() == ""
    assert run(eager, NoisyTree(truth, 3), temperature=0.6, seed=3, max_new_tokens=30) == truth


def test_attention_without_custom_masks_is_named():
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    reason = wrap_model(model, name="fa2").tree_support()
    assert "'flash_attention_2' takes no custom mask" in reason
    assert "eager, sdpa" in reason
