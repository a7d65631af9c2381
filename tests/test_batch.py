"""The batched engine: every sequence of a batch gets what plain decoding gives it
alone (float32: token for token), whatever drafter serves it, with sequences that
accept different lengths and finish at different times; a batched forward that leaks
between rows is caught by the losslessness check."""

from __future__ import annotations

import random
import re
from typing import Sequence

import pytest
import torch

from conftest import leaking_previous_row, tiny_model
from pytest_specdec.bench.lossless import LosslessError, check_lossless
from pytest_specdec.engine import batch
from pytest_specdec.engine.batch import generate_batch
from pytest_specdec.engine.loop import GenerationRequest, generate
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.drafter import Draft, DraftRequest, draft_depth
from pytest_specdec.protocol.registry import load_registry
from pytest_specdec.protocol.sampling import Sampler

#: n-gram drafters (each with its ablations) made by the registry with no weights
NGRAM = ("pld", "pia", "sam", "suffix", "rest", "lookahead", "recycling")


@pytest.fixture(scope="module")
def small_vocab():
    # 64 tokens: a random model repeats itself, so n-gram drafters find drafts
    return wrap_model(tiny_model("llama", vocab_size=64), name="tiny-64")


def ragged_requests(temperature: float, *, n: int = 4, seed: int = 0) -> list[GenerationRequest]:
    """A group's samples: prompts sharing a prefix, of different lengths and budgets."""
    rng = random.Random(seed)
    shared = tuple(rng.randrange(1, 20) for _ in range(12))
    return [GenerationRequest(shared[: rng.randrange(3, 12)]
                              + tuple(rng.randrange(1, 20) for _ in range(rng.randrange(10))),
                              max_new_tokens=rng.randrange(8, 40),
                              sampler=Sampler(temperature, 100 + i), group="g", sample=i)
            for i in range(n)]


def plain(target, requests):
    return [generate(target, r).tokens for r in requests]


def ngram_specs():
    registry = load_registry()
    return [pytest.param(s.name, dict(s.options), id=s.label)
            for s in registry.default_specs(ablations=True) if s.name in NGRAM]


@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("name, options", ngram_specs())
def test_batched_ngram_drafters_equal_plain_decoding(small_vocab, name, options, temperature):
    registry = load_registry()
    requests = ragged_requests(temperature)
    made = [registry.get(name).create(**registry.get(name).convert_options(options))
            for _ in requests]
    out = generate_batch(small_vocab, requests, made, k=draft_depth(made[0]), drafter_name=name)
    assert [g.tokens for g in out] == plain(small_vocab, requests)
    assert [g.stop for g in out] == [generate(small_vocab, r).stop for r in requests]


def test_the_table_is_ragged_and_drafts_are_accepted(small_vocab):
    """The case above is not vacuous: at T=0 sequences stop at different lengths, and
    each step accepts different lengths in different rows."""
    registry = load_registry()
    requests = ragged_requests(0.0)
    out = generate_batch(small_vocab, requests, [registry.get("pld").create() for _ in requests],
                         k=4, drafter_name="pld")
    assert len({len(g.tokens) for g in out}) > 1
    assert sum(g.stats.accepted for g in out) > 10
    # at some step, rows accepted different lengths
    assert any(len({g.steps[i].accepted for g in out if len(g.steps) > i}) > 1 for i in range(8))


class ForkedChain:
    """A third-party drafter written to the protocol alone (no base class): it drafts a
    wrong token, then the continuation it remembers, as a two-branch tree."""

    max_depth = 3

    def begin(self, request: DraftRequest) -> None:
        self.seen: list[int] = list(request.prompt_ids)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        last = context[-1]
        after = [self.seen[i + 1] for i in range(len(self.seen) - 1) if self.seen[i] == last]
        if not after:
            return Draft()
        guess = after[-1]
        chain = [guess]
        while len(chain) < k:
            nxt = [self.seen[i + 1] for i in range(len(self.seen) - 1) if self.seen[i] == chain[-1]]
            if not nxt:
                break
            chain.append(nxt[-1])
        # a wrong first sibling (never the guess), then the remembered chain
        wrong = (guess + 1) % 64
        return Draft((wrong, *chain), (-1, -1, *range(1, len(chain))))

    def accept(self, tokens: Sequence[int]) -> None:
        self.seen.extend(tokens)

    def end(self) -> None:
        pass


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_a_third_party_tree_drafter_batched(small_vocab, temperature):
    requests = ragged_requests(temperature, seed=1)
    out = generate_batch(small_vocab, requests, [ForkedChain() for _ in requests], k=3,
                         drafter_name="forked")
    assert [g.tokens for g in out] == plain(small_vocab, requests)
    if temperature == 0.0:
        assert sum(g.stats.accepted for g in out) > 0


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_eagle3_batched(tmp_path, tiny_target, temperature):
    from pytest_specdec.drafters.eagle3 import Eagle3
    from pytest_specdec.models.eagle3 import save_checkpoint
    from test_eagle3 import random_head

    folder = save_checkpoint(random_head(), tmp_path / "head")
    requests = [GenerationRequest(tuple(range(5 + i, 25 + 2 * i)), 12 + 5 * i,
                                  Sampler(temperature, seed=3 + i), group="p", sample=i)
                for i in range(3)]
    drafters = [Eagle3(model=str(folder), depth=3, top_k=4, total_tokens=16) for _ in requests]
    out = generate_batch(tiny_target, requests, drafters, k=4, drafter_name="eagle3")
    assert [g.tokens for g in out] == plain(tiny_target, requests)
    assert max(s.drafted for g in out for s in g.steps) == 15


def test_sps_batched(tmp_path, tiny_target):
    from pytest_specdec.drafters.sps import SpeculativeSampling
    from pytest_specdec.models.draft_lm import save_draft_model

    folder = save_draft_model(tiny_model("llama", seed=1), None, tmp_path / "draft", tiny_target)
    requests = [GenerationRequest(tuple(range(3, 14 + 3 * i)), 10 + 7 * i, Sampler(0.6, i),
                                  group="p", sample=i) for i in range(3)]
    drafters = [SpeculativeSampling(model=str(folder)) for _ in requests]
    out = generate_batch(tiny_target, requests, drafters, k=4, drafter_name="sps")
    assert [g.tokens for g in out] == plain(tiny_target, requests)


class TruthTree:
    """A random tree around a sequence's true continuation: at each depth a wrong
    sibling before or after the true token (or the truth missing), then a probe."""

    def __init__(self, truth: Sequence[int], seed: int):
        self.truth, self.rng = list(truth), random.Random(seed)

    def begin(self, request: DraftRequest) -> None:
        self.prompt = len(request.prompt_ids)

    def propose(self, context: Sequence[int], k: int) -> Draft:
        done = len(context) - self.prompt
        tokens: list[int] = []
        parents: list[int] = []
        parent = -1
        for depth in range(min(k, len(self.truth) - done)):
            order = self.rng.sample([self.truth[done + depth], self.rng.randrange(32)], 2)
            if self.rng.random() < 0.2:
                order[order.index(self.truth[done + depth])] = self.rng.randrange(32)
            for token in order:
                tokens.append(token)
                parents.append(parent)
            if self.truth[done + depth] not in order:
                break
            parent = len(tokens) - 2 + order.index(self.truth[done + depth])
        return Draft(tuple(tokens), tuple(parents), (self.rng.randrange(32),), (-1,))

    def accept(self, tokens: Sequence[int]) -> None:
        pass

    def end(self) -> None:
        pass


@pytest.mark.parametrize("arch", ["gemma3", "mistral", "gpt_oss", "qwen2"])
def test_sliding_window_targets_batched(arch):
    """Contexts several windows long: a sliding layer's keys are masked by position
    (the shared cache keeps every column), as the model's own sliding masks do; a
    tree drafter's branches past the window too."""
    from test_sliding import target_of

    target = target_of(arch)
    requests = [GenerationRequest(tuple(range(1, 8 + i)), 14 + 4 * i, Sampler(0.6 * (i % 2), i),
                                  group="w", sample=i) for i in range(3)]
    truth = plain(target, requests)
    assert [g.tokens for g in generate_batch(target, requests)] == truth
    trees = [TruthTree(t, seed=i) for i, t in enumerate(truth)]
    out = generate_batch(target, requests, trees, k=4, drafter_name="noisy-tree")
    assert [g.tokens for g in out] == truth
    assert sum(g.stats.accepted for g in out) > 0


def test_one_instance_serves_one_open_sequence(small_vocab):
    shared = ForkedChain()  # no concurrent_sequences declared (tests/test_batch_concurrent.py)
    requests = ragged_requests(0.0, n=2)
    with pytest.raises(ValueError, match="the same drafter instance serves two requests"):
        generate_batch(small_vocab, requests, [shared, shared], k=4)


def test_bad_batches_are_refused_clearly(small_vocab):
    with pytest.raises(ValueError, match="at least one request"):
        generate_batch(small_vocab, [])
    with pytest.raises(ValueError, match="2 drafters for 1 requests"):
        generate_batch(small_vocab, ragged_requests(0.0, n=1), [None, None])


def test_a_mask_leaking_between_rows_is_caught(small_vocab, monkeypatch):
    """A batched forward whose mask lets each row see the previous row's past (an
    off-by-one between sequences) changes tokens, and the check names the sequence."""
    requests = ragged_requests(0.0)
    keys = [(r.group, r.sample, r.round) for r in requests]
    baseline = dict(zip(keys, (generate(small_vocab, r) for r in requests)))
    honest = dict(zip(keys, generate_batch(small_vocab, requests)))
    check_lossless(small_vocab, baseline, [(dict(zip(keys, requests)), honest)])
    monkeypatch.setattr(batch, "_mask", leaking_previous_row(batch._mask))
    leaked = dict(zip(keys, generate_batch(small_vocab, requests)))
    with pytest.raises(LosslessError, match="output differs from plain decoding"):
        check_lossless(small_vocab, baseline, [(dict(zip(keys, requests)), leaked)])


# --------------------------------------------------------------------------- the suites

def test_the_batch_axis_end_to_end(suite, tiny_model_dir, tmp_path):
    """--specdec-batch 1,2: every case at both sizes (peers at batch 1), ids and records
    carrying the size, every batched sequence judged against plain decoding alone, and
    the report's side-by-side view."""
    import json

    reports = tmp_path / "reports"
    result = suite.runpytest_subprocess(
        "-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
        "--specdec-problems", "2", "--specdec-max-new-tokens", "8", "--specdec-n", "2",
        "--specdec-drafter", "pld", "--specdec-batch", "1,2", "--specdec-report-dir",
        str(reports), "-v", timeout=300)
    result.assert_outcomes(passed=10)
    result.stdout.fnmatch_lines(["*test_baseline?multi_round-b2? PASSED*",
                                 "*test_speculative?pld-best_of_n-b2? PASSED*",
                                 "*test_hf_peer?hf_generate-best_of_n-b1? PASSED*"])
    (name,) = [p for p in reports.iterdir() if p.suffix == ".json"]
    records = json.loads(name.read_text(encoding="utf-8"))["records"]
    assert sorted((r["drafter"], r["paradigm"], r["batch"]) for r in records) == sorted(
        [(d, p, b) for d in ("baseline", "pld") for p in ("multi_round", "best_of_n")
         for b in (1, 2)] + [("hf_generate", p, 1) for p in ("multi_round", "best_of_n")])
    by = {(r["drafter"], r["paradigm"], r["batch"]): r for r in records}
    for (drafter, paradigm, b), r in by.items():
        assert r["lossless"] in ("exact", "near_tie")
        # the same sequences, the same tokens, whatever the batch
        assert r["output_sha256"] == by[("baseline", paradigm, 1)]["output_sha256"]
    markdown = next(p for p in reports.iterdir() if p.suffix == ".md").read_text()
    assert "## Batch sizes" in markdown
    assert re.search(r"\| batch 1 +\| batch 2 +\|", markdown)
    assert "best_of_n T=0.6 · batch 2" in markdown  # the summary names every size but 1
    html = next(p for p in reports.iterdir() if p.suffix == ".html").read_text()
    assert 'id="batches"' in html


def test_batch_option_errors(suite, tiny_model_dir):
    for value, message in (("0", "expected comma-separated batch sizes in ?1, 1024?, e.g. 1,4; got ?0?"),
                           ("1,x", "got 'x' in '1,x'")):
        result = suite.runpytest_subprocess("--specdec-target", str(tiny_model_dir),
                                            "--specdec-batch", value, "--collect-only")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"*{message}*"])
    # exact mode runs batched too (tests/test_batch_exact.py)
    result = suite.runpytest_subprocess("--specdec-target", str(tiny_model_dir), "--specdec-batch",
                                        "1,4", "--specdec-lossless", "exact", "--collect-only")
    assert result.ret == pytest.ExitCode.OK
