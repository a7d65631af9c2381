"""The losslessness check: equality with plain decoding in float32 (and exact mode);
in half precision every token judged teacher-forced against the target given the
sequence's own prefix, near-ties measured in logit units, clear messages."""

from __future__ import annotations

import pytest
import torch

from pytest_specdec.bench import lossless
from pytest_specdec.bench.lossless import (CALIBRATION_FEEDS, CALIBRATION_TOKENS,
                                           CANDIDATE_WINDOW, CONTEXT_TOKENS, TIE_MARGIN_FACTOR,
                                           LosslessError, TieMargin, check_lossless,
                                           first_divergence, incremental_logits, judge_sequence,
                                           logit_gap, measure_tie_margin, resolve_tie_margin,
                                           teacher_forced_logits)
from pytest_specdec.bench.paradigms import MultiRound
from pytest_specdec.bench.problems import Problem
from pytest_specdec.bench.runner import DecodeSettings, run_paradigm
from pytest_specdec.engine import Generation, GenerationRequest, generate
from pytest_specdec.engine.metrics import SpecDecodingStats
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.sampling import Sampler
from conftest import tiny_model

TOKENS = [100 + i for i in range(20)]  # 100, 101, ..., 119
KEY = ("embedded-007", 2, 1)
OTHER = ("embedded-003", 0, 0)
PROMPT = (5, 17, 33, 9, 41, 17, 33, 9)


def changed_at(tokens, position, value=999):
    out = list(tokens)
    out[position] = value
    return out


def peaked_target(dtype: torch.dtype, scale: float = 60.0):
    """A tiny random Llama whose logits are spread (std of several logits), so that a
    wrong token is far from the target's choice, as on a trained model."""
    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return wrap_model(model.to(dtype), name=f"tiny-peaked-{dtype}")


@pytest.fixture(scope="module")
def bf16():
    return peaked_target(torch.bfloat16)


@pytest.fixture(scope="module")
def fp32():
    return peaked_target(torch.float32)


@pytest.fixture(scope="module")
def bf16_margin(bf16):
    """The near-tie margin measured on the bf16 target (what an auto check allows)."""
    return measure_tie_margin(bf16, PROMPT)


def plain(target, sampler=Sampler(), prompt=PROMPT, budget=24) -> tuple[GenerationRequest, Generation]:
    request = GenerationRequest(tuple(prompt), budget, sampler)
    return request, generate(target, request)


def with_tokens(generation: Generation, tokens) -> Generation:
    return Generation(tokens=list(tokens), stop=generation.stop, stats=SpecDecodingStats())


@torch.inference_mode()
def scores_at(target, request, tokens, position):
    """The sampler's scores and the logits for new token `position`, given the prefix."""
    ids = [*request.prompt_ids, *tokens[:position]]
    cache = target.new_cache()
    logits, _ = target.forward(ids, cache, keep_logits=1)
    t = torch.tensor([len(ids)])
    return request.sampler.scores(logits, t)[0], logits[0].float()


# --- first_divergence ---------------------------------------------------------------------

DIVERGENCE_CASES = [
    # id, reference, other, position, reference window, other window
    ("equal", TOKENS, TOKENS, None, None, None),
    ("first-token", TOKENS, changed_at(TOKENS, 0), 0, (100, 101), (999, 101)),
    ("position-7", TOKENS, changed_at(TOKENS, 7), 7, tuple(TOKENS[0:9]),
     tuple(changed_at(TOKENS, 7)[0:9])),
    ("window-clipped-both-sides", TOKENS, changed_at(TOKENS, 19), 19, tuple(TOKENS[11:20]),
     tuple(changed_at(TOKENS, 19)[11:20])),
    ("other-shorter", TOKENS, TOKENS[:10], 10, tuple(TOKENS[2:12]), tuple(TOKENS[2:10])),
    ("other-longer", TOKENS[:10], TOKENS, 10, tuple(TOKENS[2:10]), tuple(TOKENS[2:12])),
    ("other-empty", TOKENS[:3], [], 0, (100, 101), ()),
    ("first-of-two-differences", TOKENS, changed_at(changed_at(TOKENS, 15), 4), 4,
     tuple(TOKENS[0:6]), (100, 101, 102, 103, 999, 105)),
]


@pytest.mark.parametrize("reference, other, position, ref_window, other_window",
                         [c[1:] for c in DIVERGENCE_CASES], ids=[c[0] for c in DIVERGENCE_CASES])
def test_first_divergence(reference, other, position, ref_window, other_window):
    found = first_divergence(KEY, reference, other)
    if position is None:
        assert found is None
        return
    assert (found.key, found.position) == (KEY, position)
    assert (found.baseline, found.speculative) == (ref_window, other_window)
    assert CONTEXT_TOKENS == 8


# --- equality: float32 and exact mode -----------------------------------------------------

def test_float32_equal_outputs_pass_and_count_every_token(fp32):
    request, base = plain(fp32)
    verdict = check_lossless(fp32, {KEY: base}, [({KEY: request}, {KEY: base})] * 3)
    assert (verdict.method, verdict.label) == ("equality", "exact")
    # three identical rounds: the sequence is judged once
    assert (verdict.sequences, verdict.tokens, verdict.exact) == (1, 24, 24)
    assert verdict.summary()["first_departure"] is None


@pytest.mark.parametrize("exact_mode, target", [(False, "fp32"), (True, "bf16")])
def test_equality_fails_on_a_changed_token_naming_it(exact_mode, target, request):
    target = request.getfixturevalue(target)
    req, base = plain(target)
    changed = with_tokens(base, changed_at(base.tokens, 7, (base.tokens[7] + 1) % 512))
    with pytest.raises(LosslessError, match="output differs from plain decoding") as info:
        check_lossless(target, {KEY: base}, [({KEY: req}, {KEY: changed})],
                       exact_mode=exact_mode, decode=lambda ids: " ".join(f"t{i}" for i in ids))
    message = str(info.value)
    assert "problem 'embedded-007' sample 2 round 1, new token 7" in message
    assert f"baseline    ...{base.tokens[0:9]}" in message
    assert "baseline text    ...'t" in message


def test_missing_sequences_fail(fp32):
    request, base = plain(fp32)
    with pytest.raises(LosslessError, match="different sequences") as info:
        check_lossless(fp32, {KEY: base, OTHER: base}, [({KEY: request}, {KEY: base})])
    assert repr(OTHER) in str(info.value)


# --- teacher-forced: half precision -------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_half_precision_plain_decoding_passes_token_by_token(bf16, temperature):
    request, base = plain(bf16, Sampler(temperature, seed=11))
    verdict = check_lossless(bf16, {KEY: base}, [({KEY: request}, {KEY: base})])
    assert verdict.method == "teacher_forced"
    assert verdict.tokens == 24 == verdict.exact + len(verdict.near_ties)
    assert verdict.check_s > 0


def test_a_wrong_token_fails_at_its_position_with_both_tokens_and_the_margin(bf16, bf16_margin):
    request, base = plain(bf16)
    scores, _ = scores_at(bf16, request, base.tokens, 5)
    worst = int(scores.argmin())
    tokens = changed_at(base.tokens, 5, worst)
    allowed = f"outside the near-tie margin {bf16_margin.logits:g}"
    with pytest.raises(LosslessError, match=allowed) as info:
        check_lossless(bf16, {KEY: base}, [({KEY: request}, {KEY: with_tokens(base, tokens)})])
    message = str(info.value)
    assert f"new token 5: emitted {worst}" in message
    assert f"the target chose {base.tokens[5]}" in message
    margin = float(scores.max() - scores[worst])
    assert f"margin {margin:.3g} logits" in message


def test_a_wrong_token_after_a_changed_prefix_is_judged_on_that_prefix(bf16):
    # tokens after a departure are judged given the departed prefix, not the baseline's
    request, base = plain(bf16)

    def runner_up(position):  # the best token other than plain decoding's, and its margin
        scores, _ = scores_at(bf16, request, base.tokens, position)
        token = next(int(t) for t in scores.topk(3).indices if int(t) != base.tokens[position])
        return token, float(scores.max() - scores[token])

    # flip where the runner-up is clearly behind (bf16 logits this spread are coarse)
    at, (token, margin) = max(((p, runner_up(p)) for p in range(2, 9)), key=lambda c: c[1][1])
    tokens = [*base.tokens[:at], token]
    # continue by plain decoding from the changed prefix: every later token is the target's
    rest = generate(bf16, GenerationRequest((*PROMPT, *tokens), 24 - len(tokens))).tokens
    departed = with_tokens(base, tokens + rest)
    verdict = check_lossless(bf16, {KEY: base}, [({KEY: request}, {KEY: departed})],
                             tie_margin=margin + 0.01)
    first, *later = verdict.near_ties
    assert (first.position, first.emitted, first.margin) == (at, token, pytest.approx(margin))
    assert verdict.departure.position == at and verdict.departed == 1
    # the continuation was decoded, not teacher-forced: at most rounding-sized near-ties
    rounding = max((t.margin for t in later), default=0.0)
    assert rounding < margin / 2
    # below the flip's margin the same token fails, and strict refuses even a near-tie
    with pytest.raises(LosslessError, match=f"new token {at}:"):
        check_lossless(bf16, {KEY: base}, [({KEY: request}, {KEY: departed})],
                       tie_margin=margin / 2)
    with pytest.raises(LosslessError, match="--specdec-strict"):
        check_lossless(bf16, {KEY: base}, [({KEY: request}, {KEY: departed})],
                       tie_margin=margin + 0.01, strict=True)


def test_margins_at_a_temperature_are_in_logit_units(bf16):
    # at T > 0 the choice is argmax(logits / T + G): the margin is T times the score gap,
    # i.e. the logit gap with the noise kept at the position's own value
    sampler = Sampler(0.6, seed=5)
    request, base = plain(bf16, sampler)
    scores, logits = scores_at(bf16, request, base.tokens, 4)
    chosen, other = int(scores.argmax()), int(scores.topk(2).indices[1])
    noise = scores - logits / 0.6
    expected = float((logits[chosen] - logits[other]) + 0.6 * (noise[chosen] - noise[other]))
    tokens = changed_at(base.tokens, 4, other)[:5]
    exact, ties = judge_sequence(bf16, request, tokens, KEY, tie_margin=1e9)
    assert exact == 4
    [tie] = ties
    assert (tie.position, tie.emitted, tie.chosen) == (4, other, chosen)
    assert tie.margin == pytest.approx(expected, rel=1e-4)
    assert tie.margin == pytest.approx(0.6 * float(scores[chosen] - scores[other]), rel=1e-4)


def test_long_sequences_are_judged_in_chunks_alike(bf16):
    request, base = plain(bf16, budget=40)
    whole = judge_sequence(bf16, request, base.tokens, KEY, tie_margin=1.5)
    chunked = judge_sequence(bf16, request, base.tokens, KEY, tie_margin=1.5, chunk=7)
    assert whole[0] + len(whole[1]) == chunked[0] + len(chunked[1]) == 40




# --- the near-tie margin: measured on the target, not assumed -----------------------------

@pytest.mark.parametrize("width, kind", CALIBRATION_FEEDS)
def test_each_calibration_feed_rows_choose_the_decoded_tokens(fp32, width, kind):
    # row i of every feed is the logits that choose token i (float32: no flips)
    tokens = generate(fp32, GenerationRequest(PROMPT, 20)).tokens
    rows = incremental_logits(fp32, PROMPT, tokens, width, kind)
    assert rows.argmax(dim=-1).tolist() == tokens
    [(first, forced)] = list(teacher_forced_logits(fp32, PROMPT, tokens))
    assert first == 0
    assert forced.argmax(dim=-1).tolist() == tokens
    torch.testing.assert_close(rows, forced, rtol=0, atol=1e-3)


def test_the_measured_bf16_margin_is_a_stated_multiple_of_the_largest_gap(bf16_margin):
    m = bf16_margin
    assert m.source == "measured" and m.positions == CALIBRATION_TOKENS
    assert 0 < m.max_gap < float("inf")
    assert m.logits == TIE_MARGIN_FACTOR * m.max_gap
    assert m.feeds == tuple(f"{kind} {width}" for width, kind in CALIBRATION_FEEDS)
    assert m.summary() == {"logits": round(m.logits, 4), "source": "measured",
                           "max_gap": round(m.max_gap, 6), "factor": TIE_MARGIN_FACTOR,
                           "window": CANDIDATE_WINDOW, "positions": CALIBRATION_TOKENS,
                           "feeds": list(m.feeds)}


def test_the_margin_follows_the_heads_logit_scale(bf16_margin):
    # a constant cannot fit both: a head with logits 60x smaller rounds 60x finer
    flat = peaked_target(torch.bfloat16, scale=1.0)
    assert 0 < measure_tie_margin(flat, PROMPT).logits < bf16_margin.logits / 10


def test_gaps_are_taken_near_each_positions_top():
    forced = torch.tensor([[30.0, 29.0, 0.0, -20.0], [5.0, 4.5, 4.0, -9.5]])
    decoded = forced + torch.tensor([[0.25, -0.5, 2.0, 3.0], [0.0, 0.0, 0.75, 9.0]])
    # row 0: tokens within 14 of 30 (30, 29); row 1: within 14 of 5 (all but -9.5)
    assert logit_gap(decoded, forced) == 0.75
    assert logit_gap(decoded, forced, window=float("inf")) == 9.0
    assert CANDIDATE_WINDOW == 14.0


def test_a_known_teacher_forced_shift_gives_the_expected_margin():
    target = peaked_target(torch.float32)
    real = target.forward
    widest = max(width for width, _ in CALIBRATION_FEEDS)

    def shifted(token_ids, cache, **kwargs):  # the teacher-forced forward moves 2 top logits
        logits, hidden = real(token_ids, cache, **kwargs)
        if kwargs.get("keep_logits", 0) > widest:
            logits = logits.clone()
            logits[5, logits[5].argmax()] += 0.5
            logits[9, logits[9].topk(2).indices[1]] -= 0.25
        return logits, hidden

    target.forward = shifted
    m = measure_tie_margin(target, PROMPT)
    assert m.max_gap == pytest.approx(0.5, abs=1e-4)  # float32 rounding: ~1e-5
    assert m.logits == pytest.approx(TIE_MARGIN_FACTOR * 0.5, abs=1e-3)


def test_a_calibration_cut_short_by_an_eos_asks_for_a_given_margin():
    import dataclasses

    target = peaked_target(torch.bfloat16)
    first = generate(target, GenerationRequest(PROMPT, 1)).tokens[0]
    stops = dataclasses.replace(target, eos_ids=frozenset({first}))
    with pytest.raises(ValueError, match="'tiny-peaked-torch.bfloat16' stopped at an EOS after "
                                         "1 token.*--specdec-tie-margin"):
        measure_tie_margin(stops, PROMPT)


def test_float32_and_exact_mode_check_equality_without_measuring(fp32, bf16, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("measured where equality is checked")

    monkeypatch.setattr(lossless, "measure_tie_margin", refuse)
    equality = TieMargin(0.0, "equality")
    assert resolve_tie_margin(None, fp32, PROMPT) == equality
    assert resolve_tie_margin(None, bf16, PROMPT, exact_mode=True) == equality
    request, base = plain(fp32)
    verdict = check_lossless(fp32, {KEY: base}, [({KEY: request}, {KEY: base})])
    assert verdict.tie_margin is None and "tie_margin" not in verdict.summary()


def test_a_departure_beyond_the_measured_margin_fails_naming_the_token(bf16, bf16_margin):
    request, base = plain(bf16)
    scores, _ = scores_at(bf16, request, base.tokens, 6)
    # the closest runner-up whose margin is beyond the measured margin
    margins = (scores.max() - scores).masked_fill(scores.max() - scores <= bf16_margin.logits,
                                                  float("inf"))
    token = int(margins.argmin())
    departed = with_tokens(base, changed_at(base.tokens, 6, token)[:7])
    with pytest.raises(LosslessError, match=f"new token 6: emitted {token}, the target chose "
                                            f"{base.tokens[6]}") as info:
        check_lossless(bf16, {KEY: base}, [({KEY: request}, {KEY: departed})])
    assert f"outside the near-tie margin {bf16_margin.logits:g}" in str(info.value)
    assert f"margin {float(margins[token]):.3g} logits" in str(info.value)


def test_the_given_margin_overrides_the_measurement(bf16, monkeypatch):
    monkeypatch.setattr(lossless, "measure_tie_margin", lambda *a, **k: pytest.fail("measured"))
    request, base = plain(bf16)
    verdict = check_lossless(bf16, {KEY: base}, [({KEY: request}, {KEY: base})], tie_margin=0.3)
    assert verdict.tie_margin == TieMargin(0.3, "given")
    assert verdict.summary()["tie_margin"] == {"logits": 0.3, "source": "given"}


@pytest.mark.parametrize("given", [None, 0.4])
def test_a_session_measures_the_margin_once_per_target(tmp_path, monkeypatch, given):
    from conftest import small_config
    from pytest_specdec.bench.session import SpecdecSession

    target = peaked_target(torch.bfloat16)
    target.encode_prompt = lambda text: list(PROMPT)
    calls = []
    real = lossless.measure_tie_margin
    monkeypatch.setattr(lossless, "measure_tie_margin",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    config = small_config(tmp_path, dtype="bfloat16", tie_margin=given)
    session = SpecdecSession(config, None, [Problem(key="p1", question="q", answer="1")],
                             lambda: target)
    first = session.tie_margin()
    assert session.tie_margin() is first
    if given is None:
        assert first.source == "measured" and len(calls) == 1
        assert calls[0][0] is target and list(calls[0][1]) == list(PROMPT)
    else:
        assert first == TieMargin(0.4, "given") and calls == []


def test_the_record_and_report_carry_the_measured_margin(suite, tiny_model_dir, tmp_path):
    """bfloat16, default margin: every teacher-forced case records the session's one
    measured margin; the report's losslessness table shows it."""
    import json

    reports = tmp_path / "reports"
    result = suite.runpytest_subprocess(
        "-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
        "--specdec-dtype", "bfloat16", "--specdec-problems", "1",
        "--specdec-max-new-tokens", "8", "--specdec-n", "2", "--specdec-drafter", "pld",
        "--specdec-drafter", "sam",
        "--specdec-paradigm", "best_of_n", "--specdec-no-peer",
        "--specdec-report-dir", str(reports), timeout=300)
    result.assert_outcomes(passed=3)
    (name,) = [p for p in reports.iterdir() if p.suffix == ".json"]
    records = json.loads(name.read_text(encoding="utf-8"))["records"]
    margins = [r["tie_margin"] for r in records if r["role"] == "speculative"]
    assert len(margins) == 2 and margins[0] == margins[1]
    assert margins[0]["source"] == "measured" and margins[0]["positions"] > 0
    assert margins[0]["logits"] == pytest.approx(TIE_MARGIN_FACTOR * margins[0]["max_gap"],
                                                 abs=1e-3)
    assert margins[0]["logits"] > 0
    markdown = [p.read_text(encoding="utf-8") for p in reports.iterdir() if p.suffix == ".md"]
    assert markdown and all("margin allowed" in text for text in markdown)


# --- a corrupted verification is caught at its first bad token ---------------------------

class RepeatLast:
    """Always drafts: every step goes through a multi-token verify forward."""

    needs = frozenset()

    def begin(self, request): pass
    def propose(self, context, k):
        from pytest_specdec.protocol.drafter import Draft
        return Draft(tuple(context[-1:]) * k)
    def accept(self, tokens): pass
    def end(self): pass


#: A position error large enough to matter on the default model. A shift of a few
#: positions moves its logits by less than the bf16 near-tie margin (measured: +3 gives
#: departures at margins 0.1-0.5), which no margin-based check can tell from rounding;
#: exact mode (equality) catches those too.
OFFSET = 64


def corrupt_forward(monkeypatch, kind: str):
    """Break verification the way an engine bug would: positions shifted, or the
    first context position masked out, in every multi-token forward after prefill."""
    from pytest_specdec.engine.target import Target

    original = Target.forward

    def forward(self, token_ids, cache, **kwargs):
        held = cache.get_seq_length()
        if held and len(token_ids) > 1:
            if kind == "position-offset":
                kwargs["positions"] = [held + OFFSET + i for i in range(len(token_ids))]
            else:  # a dropped mask entry: no row may see the first context token
                attend = torch.ones(len(token_ids), held + len(token_ids), dtype=torch.bool)
                attend[:, held:] = attend[:, held:].tril()
                attend[:, 0] = False
                kwargs["attend"] = attend
                kwargs.setdefault("positions", list(range(held, held + len(token_ids))))
        return original(self, token_ids, cache, **kwargs)

    monkeypatch.setattr(Target, "forward", forward)


@pytest.fixture(scope="module")
def default_bf16_margin(default_bf16):
    """The margin measured on the default model in bfloat16 (once: it costs seconds)."""
    prompt = default_bf16.encode_prompt("What is 12 times 7? Answer briefly.")
    return prompt, measure_tie_margin(default_bf16, prompt)


@pytest.mark.parametrize("kind", ["position-offset", "dropped-mask-entry"])
def test_a_corrupted_verification_fails_at_the_first_bad_token(default_bf16, default_bf16_margin,
                                                              monkeypatch, kind):
    target = default_bf16
    prompt, margin = default_bf16_margin
    request, base = plain(target, prompt=prompt, budget=16)
    corrupt_forward(monkeypatch, kind)
    bad = generate(target, request, RepeatLast(), k=4)
    monkeypatch.undo()
    first = first_divergence(KEY, base.tokens, bad.tokens)
    assert first is not None, "the corruption must change the output"
    with pytest.raises(LosslessError, match="outside the near-tie margin") as info:
        check_lossless(target, {KEY: base}, [({KEY: request}, {KEY: bad})], tie_margin=margin)
    # everything before the first departure is the target's own: that is where it fails
    assert f"new token {first.position}:" in str(info.value)


# --- multi-round: a near-tie in round 1 does not fail round 2 -----------------------------

def test_multi_round_with_a_round_one_near_tie_passes_in_round_two(bf16):
    problem = Problem(key="p1", question="q", answer="1")
    paradigm = MultiRound(rounds=2)
    settings = DecodeSettings(temperature=0.0, seed=0, max_new_tokens=12)
    prompts = {"q": [5, 17, 33, 9]}

    class Tok:  # the runner's text <-> ids, enough for a paradigm on a tiny target
        def encode_prompt(self, text):
            return prompts.setdefault(text, [7 + sum(map(ord, text)) % 400, 19, 3])

    bf16_with_text = bf16
    bf16_with_text.encode_prompt = Tok().encode_prompt
    bf16_with_text.decode = lambda ids: " ".join(map(str, ids))
    try:
        base = run_paradigm(bf16, paradigm, [problem],
                            lambda r: generate(bf16, r), settings)

        def flip_round_one(request):
            # plain decoding, but round 1's token 2 is the runner-up (a near-tie flip)
            out = generate(bf16, request)
            if request.round != 0:
                return out
            scores, _ = scores_at(bf16, request, out.tokens, 2)
            top2 = scores.topk(2)
            flip_margin.append(float(top2.values[0] - top2.values[1]))
            flipped = [*out.tokens[:2], int(top2.indices[1])]
            rest = generate(bf16, GenerationRequest((*request.prompt_ids, *flipped),
                                                    12 - 3)).tokens
            return with_tokens(out, flipped + rest)

        flip_margin: list[float] = []

        spec = run_paradigm(bf16, paradigm, [problem], flip_round_one, settings)
    finally:
        del bf16.encode_prompt, bf16.decode
    assert spec.requests[("p1", 0, 1)].prompt_ids != base.requests[("p1", 0, 1)].prompt_ids
    # the measured bfloat16 margin, or the flip's own if it is wider
    margin = max(measure_tie_margin(bf16, PROMPT).logits, flip_margin[0] + 0.01)
    verdict = check_lossless(bf16, base.outputs, [(spec.requests, spec.outputs)],
                             tie_margin=margin)
    assert (verdict.near_ties[0].key, verdict.near_ties[0].position) == (("p1", 0, 0), 2)
    assert verdict.departed == 2  # both rounds differ from plain decoding's
    assert verdict.sequences == 2 and verdict.tokens == 24
