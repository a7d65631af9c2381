"""Exact mode at batch > 1 (--specdec-lossless exact --specdec-batch B): a sequence's
logits, and so its tokens, are bit-identical whether it was decoded alone at batch 1 or
in a batch with any other sequences (baseline and speculative, float32 and half
precision, rows finishing at different times, ragged acceptance); a forward that lets a
row see another row's mask is caught by the check."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import leaking_previous_row, tiny_model
from pytest_specdec.bench.lossless import LosslessError, check_lossless
from pytest_specdec.engine import batch, exact, loop
from pytest_specdec.engine.batch import generate_batch
from pytest_specdec.engine.exact import LINEAR_BLOCK, pinned_linear, row_invariant_attention
from pytest_specdec.engine.loop import GenerationRequest, generate
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.sampling import Sampler
from test_batch import TruthTree
from test_exact import Chains, Trees


def peaked(dtype: torch.dtype, seed: int = 3):
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():  # spread logits, as a trained model's, so ties are rare
        model.lm_head.weight.mul_(20)
    return wrap_model(model.to(dtype), name=f"tiny-{dtype}".replace("torch.", ""))


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def target(request):
    return peaked(request.param)


def ragged(temperature: float, n: int, seed: int = 0) -> list[GenerationRequest]:
    """n sequences with prompts of 1 to 13 tokens (a one-token prompt has nothing to
    prefill) and budgets from 2 to 30: rows finish at different times, and the last
    open row decodes alone."""
    rng = random.Random(seed)
    lengths = [1, 13, *(rng.randrange(2, 13) for _ in range(n - 2))][:n]
    budgets = [2, 30, *(rng.randrange(5, 25) for _ in range(n - 2))][:n]
    return [GenerationRequest(tuple(rng.randrange(1, 500) for _ in range(length)), budget,
                              Sampler(temperature, seed=100 * seed + i), group="g", sample=i)
            for i, (length, budget) in enumerate(zip(lengths, budgets))]


class Logits:
    """Every emitted position's logits, keyed by (sampler seed, position), as the batch-1
    step and the batched verification computed them."""

    def __init__(self, monkeypatch):
        self.seen: dict[tuple[int, int], list[torch.Tensor]] = {}
        real_step, real_verify = loop.speculative_step, batch._verify

        def step(target, sampler, cache, context, cached, draft, **kw):
            out = real_step(target, sampler, cache, context, cached, draft, **kw)
            self._add(sampler.seed, len(context), out.logits)
            return out

        def verify(row, f, draft, logits, hidden, top_k):
            out, path = real_verify(row, f, draft, logits, hidden, top_k)
            self._add(row.request.sampler.seed, len(row.context), out.logits)
            return out, path

        monkeypatch.setattr(loop, "speculative_step", step)
        monkeypatch.setattr(batch, "_verify", verify)

    def _add(self, seed: int, start: int, logits: torch.Tensor) -> None:
        for j, row in enumerate(logits):
            self.seen.setdefault((seed, start + j), []).append(row.float().clone())

    def take(self) -> dict[tuple[int, int], torch.Tensor]:
        out = {key: rows[-1] for key, rows in self.seen.items()}
        self.seen.clear()
        return out


def drafters_for(kind, target, requests):
    """Per request a drafter that knows its true continuation (batch-1 exact output)."""
    if kind is None:
        return None
    truth = [generate(target, r, exact=True).tokens for r in requests]
    if kind is TruthTree:
        return [TruthTree(t, seed=i) for i, t in enumerate(truth)]
    return [kind(t, r.prompt_ids) for t, r in zip(truth, requests)]


@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("kind", [None, Chains, Trees, TruthTree],
                         ids=["baseline", "chain", "tree", "tree-probes"])
def test_batched_exact_logits_equal_batch_1(target, kind, temperature, monkeypatch):
    logits = Logits(monkeypatch)
    for size in (2, 3, 4):
        requests = ragged(temperature, size, seed=size)
        alone_drafters = drafters_for(kind, target, requests)
        logits.take()
        alone = [generate(target, r, d, k=5, exact=True)
                 for r, d in zip(requests, alone_drafters or [None] * size)]
        reference = logits.take()
        batched = generate_batch(target, requests, drafters_for(kind, target, requests),
                                 k=5, drafter_name="truth", exact=True)
        got = logits.take()
        assert [g.tokens for g in batched] == [g.tokens for g in alone], size
        assert [g.stop for g in batched] == [g.stop for g in alone]
        assert set(got) == set(reference)
        differing = [key for key in reference if not torch.equal(got[key], reference[key])]
        assert differing == [], (size, differing[:5])
        # not vacuous: rows left the batch at different times, the last decoded alone
        # (rows=1: the probe path), and drafts were accepted at different lengths
        assert len({len(g.steps) for g in batched}) > 1
        assert any(s.rows == 1 for g in batched for s in g.steps)
        if kind is not None:
            assert sum(g.stats.accepted for g in batched) > 10
            assert any(len({g.steps[i].accepted for g in batched if len(g.steps) > i}) > 1
                       for i in range(4))
    assert target.model.config._attn_implementation != exact.ROW_INVARIANT_ATTENTION
    assert not any("forward" in vars(m) for m in target.model.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_batched_exact_on_sliding_window_targets(arch, dtype, monkeypatch):
    """Contexts past the window: each row's sliding layers see the keys its own
    positions allow, as at batch 1 (where the sliding cache itself drops them)."""
    from test_sliding import sliding_model

    target = wrap_model(sliding_model(arch, vocab_size=512).to(dtype), name=f"tiny-{arch}")
    logits = Logits(monkeypatch)
    requests = ragged(0.6, 3, seed=7)
    alone = [generate(target, r, exact=True).tokens for r in requests]
    reference = logits.take()
    assert [g.tokens for g in generate_batch(target, requests, exact=True)] == alone
    got = logits.take()
    assert all(torch.equal(got[key], reference[key]) for key in reference)
    trees = [TruthTree(t, seed=i) for i, t in enumerate(alone)]
    out = generate_batch(target, requests, trees, k=4, drafter_name="tree", exact=True)
    assert [g.tokens for g in out] == alone
    assert sum(g.stats.accepted for g in out) > 0
    got = logits.take()
    assert set(got) == set(reference)
    assert all(torch.equal(got[key], reference[key]) for key in reference)


def test_without_pinned_linears_float32_batches_round_differently(monkeypatch):
    """Why exact mode pins the linear layers: on this CPU, a float32 row of F.linear
    changes its bits with the forward's row count, so without the pinning a batched
    baseline's logits are not batch 1's. (Where a BLAS is row-count invariant this
    test has nothing to show and is skipped.)"""
    import contextlib

    target = peaked(torch.float32)
    x = torch.randn(24, 64)
    weight = target.model.model.layers[0].mlp.gate_proj.weight
    if all(torch.equal(F.linear(x[:n], weight)[:2], F.linear(x[:2], weight)) for n in range(2, 24)):
        pytest.skip("this BLAS gives a row the same bits at every row count")
    logits = Logits(monkeypatch)
    requests = ragged(0.0, 4, seed=4)
    for r in requests:
        generate(target, r, exact=True)
    reference = logits.take()
    monkeypatch.setattr(exact, "pinned_linears", lambda model: contextlib.nullcontext())
    generate_batch(target, requests, exact=True)
    got = logits.take()
    assert any(not torch.equal(got[key], reference[key]) for key in reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(128, 64), (64, 128), (512, 64), (49152, 576)])
def test_a_pinned_linear_row_is_the_same_for_every_row_count(dtype, shape):
    torch.manual_seed(0)
    layer = torch.nn.Linear(shape[1], shape[0], bias=shape[0] == 128).to(dtype)
    x = torch.randn(1, 41, shape[1]).to(dtype)
    with torch.inference_mode():
        reference = pinned_linear(layer, x[:, :1])[0, 0]
        for rows in (2, 3, LINEAR_BLOCK, LINEAR_BLOCK + 1, 17, 41):
            out = pinned_linear(layer, x[:, :rows])
            assert out.shape == (1, rows, shape[0])
            assert torch.equal(out[0, 0], reference), rows
        for place in range(17):  # at any place in a block, beside any other rows
            other = torch.randn(1, 17, shape[1]).to(dtype)
            other[0, place] = x[0, 0]
            assert torch.equal(pinned_linear(layer, other)[0, place], reference), place
        # and what it computes is the layer's own result
        torch.testing.assert_close(pinned_linear(layer, x).float(), layer(x).float(),
                                   rtol=2e-2, atol=2e-2)


def test_each_sequence_attends_through_its_own_mask_row():
    """Two sequences whose masks differ (left padding, a rejected column): each one's
    rows equal that sequence computed alone with only its own keys."""
    torch.manual_seed(1)
    q = torch.randn(2, 4, 3, 16).bfloat16()
    k, v = torch.randn(2, 2, 2, 10, 16).bfloat16()
    allowed = torch.ones(2, 3, 10, dtype=torch.bool).tril(7)
    allowed[0, :, :2] = False  # sequence 0: two pad columns
    allowed[1, :, 4] = False  # sequence 1: a rejected draft column
    mask = torch.zeros(2, 1, 3, 10, dtype=torch.bfloat16).masked_fill(~allowed[:, None], -3e38)
    both, _ = row_invariant_attention(None, q, k, v, mask)
    for s in range(2):
        keep = allowed[s, -1].nonzero().squeeze(1)  # the last row sees its row's keys
        alone, _ = row_invariant_attention(None, q[s:s + 1, :, 2:], k[s:s + 1][:, :, keep],
                                           v[s:s + 1][:, :, keep], None)
        assert torch.equal(both[s, 2], alone[0, 0])


@pytest.mark.parametrize("leak", ["row 0's mask", "off by one"])
def test_a_leak_between_sequences_is_caught(leak, monkeypatch):
    """A row-invariant attention that reads sequence 0's mask for every sequence, or a
    batch mask letting each row see the previous row's past: the batched outputs change
    and exact mode's equality check fails, naming the sequence."""
    target = peaked(torch.bfloat16)
    requests = ragged(0.0, 4, seed=5)
    keys = [(r.group, r.sample, r.round) for r in requests]
    baseline = dict(zip(keys, (generate(target, r, exact=True) for r in requests)))
    by_key = dict(zip(keys, requests))
    honest = dict(zip(keys, generate_batch(target, requests, exact=True)))
    check_lossless(target, baseline, [(by_key, honest)], exact_mode=True)
    if leak == "row 0's mask":
        real = exact.row_invariant_attention

        def first_rows_mask(module, query, key, value, attention_mask, **kw):
            if attention_mask is not None:
                attention_mask = attention_mask[:1].expand(query.shape[0], -1, -1, -1)
            return real(module, query, key, value, attention_mask, **kw)

        monkeypatch.setattr(exact, "row_invariant_attention", first_rows_mask)
    else:
        monkeypatch.setattr(batch, "_mask", leaking_previous_row(batch._mask))
    leaked = dict(zip(keys, generate_batch(target, requests, exact=True)))
    assert [leaked[key].tokens for key in keys] != [baseline[key].tokens for key in keys]
    with pytest.raises(LosslessError, match="output differs from plain decoding"):
        check_lossless(target, baseline, [(by_key, leaked)], exact_mode=True)


def test_exact_mode_batched_end_to_end(suite, tiny_model_dir, tmp_path):
    """--specdec-lossless exact --specdec-batch 1,2 in bfloat16: every case at both sizes,
    judged by equality, every batch-2 output the batch-1 baseline's."""
    reports = tmp_path / "reports"
    result = suite.runpytest_subprocess(
        "-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
        "--specdec-dtype", "bfloat16", "--specdec-lossless", "exact",
        "--specdec-problems", "2", "--specdec-max-new-tokens", "8", "--specdec-n", "2",
        "--specdec-drafter", "pld", "--specdec-paradigm", "best_of_n", "--specdec-no-peer",
        "--specdec-batch", "1,2", "--specdec-report-dir", str(reports), "-v", timeout=300)
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_speculative?pld-best_of_n-b2? PASSED*"])
    (name,) = [p for p in reports.iterdir() if p.suffix == ".json"]
    records = json.loads(name.read_text(encoding="utf-8"))["records"]
    assert sorted((r["drafter"], r["batch"]) for r in records) == [
        ("baseline", 1), ("baseline", 2), ("pld", 1), ("pld", 2)]
    plain = next(r for r in records if (r["drafter"], r["batch"]) == ("baseline", 1))
    for r in records:
        assert r["output_sha256"] == plain["output_sha256"]
        if r is not plain:
            assert r["lossless"] == "exact" and r["tokens_near_tie"] == 0


def test_default_model_bf16_batch_of_4_rows_are_batch_1s(default_bf16, monkeypatch):
    """A trained model in bfloat16, 4 sequences with 9-token chains (40 rows through the
    49152-wide output head, where oneDNN rounds a row differently than at 10 rows):
    every emitted position's logits are batch 1's, bit for bit. (Measured without the
    pinned linear layers: all 56 differ, by up to 1.2 logits.)"""
    target = default_bf16
    questions = ["What is 12 times 7?", "Name three primes.", "Why is the sky blue?",
                 "Natalia sold clips to 48 of her friends in April. How many?"]
    requests = [GenerationRequest(tuple(target.encode_prompt(q)), 14, Sampler(0.0, seed=i))
                for i, q in enumerate(questions)]
    truth = [generate(target, r, exact=True).tokens for r in requests]
    logits = Logits(monkeypatch)
    alone = [generate(target, r, Chains(t, r.prompt_ids), k=9, exact=True).tokens
             for r, t in zip(requests, truth)]
    reference = logits.take()
    out = generate_batch(target, requests, [Chains(t, r.prompt_ids) for r, t in zip(requests, truth)],
                         k=9, drafter_name="chains", exact=True)
    got = logits.take()
    assert [g.tokens for g in out] == alone == truth
    assert max(s.drafted for g in out for s in g.steps) == 9
    assert set(got) == set(reference)
    assert all(torch.equal(got[key], reference[key]) for key in reference)
