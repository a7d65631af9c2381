"""The compiled decode path (engine/compiled.py): the static cache's rollback and tree
path, the folded-GQA attention, every drafter kind token-equal to the eager path at
T=0 and T>0, the refusal of targets it cannot serve, and a session on it end to end.

The graphs are compiled with dynamo's ``eager`` backend (SPECDEC_COMPILE_BACKEND): the
same dynamo graphs, static cache and masks as inductor's, traced in seconds; inductor's
kernels run in the benchmark (benchmarks/decode_path.py) and the GPU check."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from test_tree import PROMPT, NoisyTree
from pytest_specdec.drafters.pld import PromptLookup
from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.engine import compiled, transfer
from pytest_specdec.engine.compiled import StaticKV, bucket, packed_gqa_attention, resolve_engine
from pytest_specdec.engine.target import TargetError, wrap_model
from pytest_specdec.protocol.sampling import Sampler


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    monkeypatch.setenv("SPECDEC_COMPILE_BACKEND", "eager")


@pytest.fixture(scope="module")
def pair():
    """One tiny model on both paths (the weights are shared)."""
    model = tiny_model("llama")
    return wrap_model(model, name="tiny-eager"), wrap_model(model, name="tiny", engine="compiled")


# --- the static cache ---------------------------------------------------------------

def _cache(length: int, capacity: int = 16) -> StaticKV:
    """A one-layer static cache whose slot i holds the value i (keys and values)."""
    cache = StaticKV()
    cache.grow(capacity, 1, 1, 1, torch.float32, torch.device("cpu"))
    for states in (cache.keys[0], cache.values[0]):
        states[0, 0, :, 0] = torch.arange(capacity, dtype=torch.float32)
    cache.length = length
    return cache


@pytest.mark.parametrize("base, path, fed, held", [
    (4, [], 3, [0, 1, 2, 3]),  # nothing accepted: the nodes are dropped
    (4, [0, 1], 3, [0, 1, 2, 3, 4, 5]),  # a chain prefix stays in place
    (4, [1], 3, [0, 1, 2, 3, 5]),  # a later sibling moves next to the context
    (4, [0, 2, 5], 6, [0, 1, 2, 3, 4, 6, 9]),
    (0, [2], 3, [2]),
])
def test_keep_path_moves_the_path_next_to_the_context(base, path, fed, held):
    cache = _cache(base + fed)
    cache.keep_path(base, path, fed)
    assert cache.length == len(held)
    for states in (cache.keys[0], cache.values[0]):
        assert states[0, 0, :len(held), 0].tolist() == held


def test_crop_is_a_length_change_and_names_a_bad_one():
    cache = _cache(10)
    before = cache.keys[0].clone()
    cache.crop(-3)
    assert cache.length == 7 and torch.equal(cache.keys[0], before)
    cache.crop(5)
    assert cache.length == 5
    with pytest.raises(ValueError, match="cannot crop to -9"):
        cache.crop(-9)
    with pytest.raises(RuntimeError, match="holds 5 positions; expected 3 context"):
        cache.keep_path(3, [0], 4)


def test_growing_keeps_the_held_slots():
    cache = _cache(5, capacity=8)
    cache.grow(32, 1, 1, 1, torch.float32, torch.device("cpu"))
    assert cache.capacity == 32 and cache.keys[0].shape[2] == 32
    assert cache.keys[0][0, 0, :5, 0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n, width", [(1, 1), (2, 2), (3, 4), (9, 16), (128, 128), (129, None)])
def test_width_buckets(n, width):
    assert bucket(n) == width


# --- the attention ------------------------------------------------------------------

@pytest.mark.parametrize("heads, kv_heads, q", [(4, 2, 1), (4, 2, 5), (6, 3, 7), (4, 4, 3), (8, 1, 2)])
def test_folded_gqa_attention_equals_repeated_heads(heads, kv_heads, q):
    torch.manual_seed(heads * 10 + q)
    query = torch.randn(1, heads, q, 8)
    key, value = torch.randn(1, kv_heads, 12, 8), torch.randn(1, kv_heads, 12, 8)
    allowed = torch.rand(q, 12) > 0.3
    allowed[:, 0] = True
    mask = torch.zeros(q, 12).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    groups = heads // kv_heads
    want = F.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1),
                                          value.repeat_interleave(groups, 1), attn_mask=mask)
    module = torch.nn.Module()
    got, _ = packed_gqa_attention(module, query, key, value, mask, scaling=8 ** -0.5)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-5)


# --- whole generations: token-equal to the eager path -------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_every_drafter_kind_equals_the_eager_path(pair, temperature):
    eager, target = pair
    request = GenerationRequest(PROMPT, 30, Sampler(temperature, 4))
    truth = generate(eager, request).tokens
    assert generate(target, request).tokens == truth
    assert generate(target, request, PromptLookup(), k=3, drafter_name="pld").tokens == truth
    tree = generate(target, request, NoisyTree(truth, 1), k=4, drafter_name="noisy-tree")
    assert tree.tokens == truth
    assert tree.stats.mat > 1.3  # trees were verified and paths kept
    assert isinstance(target.compiled.caches["sequence"], StaticKV)


def test_a_forward_past_the_widest_bucket_runs_eagerly_on_the_same_cache(pair):
    eager, target = pair
    prompt = tuple(range(3, 3 + 140))  # 140 tokens: wider than every graph
    request = GenerationRequest(prompt, 12, Sampler(0.0))
    compiles = len(target.compiled_forward().graphs)
    assert generate(target, request).tokens == generate(eager, request).tokens
    assert not any(key[1] > 128 for key in target.compiled.graphs)
    assert len(target.compiled.graphs) >= compiles


def test_hidden_states_are_those_of_the_eager_path(pair):
    eager, target = pair
    layers = (0, 1, 2)
    with torch.inference_mode():
        want_logits, want = eager.forward([5, 6, 7], eager.new_cache(), hidden_states=layers)
        cache = target.new_cache(64)
        logits, got = target.forward([5, 6, 7], cache, hidden_states=layers)
        _, last = target.forward([8], cache, hidden_states=True)
        _, last_eager = eager.forward([5, 6, 7, 8], eager.new_cache(), hidden_states=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last[-1], last_eager[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_eagle3_reads_its_layers_from_the_compiled_graphs(pair, tmp_path, temperature):
    from test_eagle3 import random_head
    from pytest_specdec.drafters.eagle3 import Eagle3
    from pytest_specdec.models.eagle3 import save_checkpoint

    eager, target = pair
    folder = save_checkpoint(random_head(), tmp_path / "head", layout="specforge")
    request = GenerationRequest(tuple(range(5, 25)), 24, Sampler(temperature, 3))
    plain = generate(eager, request).tokens
    drafter = Eagle3(model=str(folder), depth=3, top_k=4, total_tokens=16)
    assert generate(target, request).tokens == plain  # sizes the sequence cache
    late = target.compiled_forward().late_compiles
    spec = generate(target, request, drafter, k=4, drafter_name="eagle3")
    assert spec.tokens == plain
    assert max(s.drafted for s in spec.steps) == 15  # trees were verified
    layers = tuple(drafter.hidden_layers)
    # attaching compiled the graphs of its layers (only those leave the graph)
    assert any(key[3] == layers for key in target.compiled.graphs)
    assert target.compiled.late_compiles == late


@pytest.mark.parametrize("kind, budget", [("baseline", 2), ("chain", 2), ("tree", 4)])
def test_the_compiled_path_keeps_the_transfer_budget(pair, kind, budget):
    eager, target = pair
    request = GenerationRequest(PROMPT, 30, Sampler(0.6, 2))
    truth = generate(eager, request).tokens

    def drafter():
        return {"baseline": None, "chain": PromptLookup(), "tree": NoisyTree(truth, 1)}[kind]

    generate(target, request, drafter(), k=4)  # its graphs compiled
    before = transfer.count.snapshot()
    out = generate(target, request, drafter(), k=4)
    assert out.tokens == truth
    assert transfer.count.since(before).total <= budget * len(out.steps)


# --- what the path cannot serve ---------------------------------------------------------

def test_a_sliding_window_target_runs_eagerly_and_says_why():
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256)
    torch.manual_seed(0)
    target = wrap_model(transformers.Gemma3ForCausalLM(config).eval(), name="gemma3",
                        engine="compiled")
    assert target.path.startswith("eager (compiled refused: it has ['sliding_attention'] layers")
    request = GenerationRequest(PROMPT, 10, Sampler(0.0))
    plain = wrap_model(target.model, name="gemma3-eager")
    assert generate(target, request).tokens == generate(plain, request).tokens
    assert target.compiled is None  # nothing was compiled


def test_engine_names_are_checked():
    with pytest.raises(TargetError, match="engine 'fast' is not one of eager, compiled"):
        wrap_model(tiny_model("llama"), engine="fast")
    with pytest.raises(ValueError, match="engine 'jit' is not one of auto, eager, compiled"):
        resolve_engine("jit", torch.device("cpu"))
    assert resolve_engine("auto", torch.device("cuda")) == "compiled"
    assert resolve_engine("auto", torch.device("cpu")) == compiled.CPU_DEFAULT


# --- a session on the compiled path ---------------------------------------------------

def test_a_session_on_both_paths_compiles_before_timing_and_shows_them_apart(
        suite, tiny_model_dir, tmp_path):
    reports = tmp_path / "reports"
    result = suite.runpytest_subprocess(
        "-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
        "--specdec-problems", "1", "--specdec-max-new-tokens", "8", "--specdec-n", "2",
        "--specdec-paradigm", "best_of_n", "--specdec-drafter", "pld", "--specdec-no-peer",
        "--specdec-engine", "both", "--specdec-report-dir", str(reports),
        "--benchmark-disable", "-o", "log_cli=true", "--log-cli-level", "INFO", timeout=600)
    result.assert_outcomes(passed=4)
    # compiled while the session's estimate loads the target, before listing the cases
    result.stdout.fnmatch_lines(["*compiled path: graphs compiled or loaded in *",
                                 "*test_baseline?best_of_n-eager?*",
                                 "*test_baseline?best_of_n-compiled?*"])
    report = json.loads(next(reports.glob("*.json")).read_text())
    engines = sorted((r["drafter"], r["engine"]) for r in report["records"])
    assert engines == [("baseline", "compiled"), ("baseline", "eager"),
                       ("pld", "compiled"), ("pld", "eager")]
    markdown = next(reports.glob("*.md")).read_text()
    assert "best_of_n · eager" in markdown and "best_of_n · compiled" in markdown
    assert report["meta"]["decode path"] == "eager, compiled"
    assert report["meta"]["compilation"].endswith("s before any timed span; 0 compiled inside "
                                                  "a decode")
    assert os.environ.get("SPECDEC_COMPILE_BACKEND") == "eager"
