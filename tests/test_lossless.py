"""The losslessness check: exact equality in fp32, near-ties allowed only in half
precision (and refused under strict mode), clear messages on any divergence."""

from __future__ import annotations

import pytest
import torch

from pytest_specdec.engine import Generation
from pytest_specdec.lossless import (CONTEXT_TOKENS, LosslessError, check_lossless,
                                     first_divergence)
from pytest_specdec.metrics import SpecDecodingStats

TOKENS = [100 + i for i in range(20)]  # 100, 101, ..., 119
KEY = ("embedded-007", 2, 1)
OTHER = ("embedded-003", 0, 0)
TIE = 0.05


def generation(tokens, margins=None, stop="budget") -> Generation:
    margins = [1.0] * len(tokens) if margins is None else margins
    return Generation(tokens=list(tokens), stop=stop, stats=SpecDecodingStats(), margins=margins)


def changed_at(tokens, position, value=999):
    out = list(tokens)
    out[position] = value
    return out


def check(baseline, speculative, dtype=torch.float32, **kwargs):
    return check_lossless(baseline, speculative, dtype=dtype, tie_margin=TIE, **kwargs)


# --- exact outputs ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_equal_outputs_pass(dtype):
    baseline = {KEY: generation(TOKENS), OTHER: generation(TOKENS[:5])}
    speculative = {KEY: list(TOKENS), OTHER: tuple(TOKENS[:5])}
    verdict = check(baseline, speculative, dtype=dtype, strict=True)
    assert verdict.sequences == 2
    assert verdict.near_ties == []
    assert verdict.label == "exact"


def test_empty_runs_pass():
    verdict = check({}, {})
    assert (verdict.sequences, verdict.label) == (0, "exact")


def test_a_changed_token_fails_with_position_key_and_both_windows():
    baseline = {OTHER: generation(TOKENS[:3]), KEY: generation(TOKENS)}
    speculative = {OTHER: TOKENS[:3], KEY: changed_at(TOKENS, 7)}
    with pytest.raises(LosslessError) as info:
        check(baseline, speculative)
    message = str(info.value)
    assert "output differs from plain decoding" in message
    assert "problem 'embedded-007' sample 2 round 1, new token 7" in message
    # CONTEXT_TOKENS before the position, and one after
    assert f"baseline    ...{TOKENS[0:9]}" in message
    assert f"speculative ...{changed_at(TOKENS, 7)[0:9]}" in message
    assert "margin there: 1" in message


def test_lossless_error_is_an_assertion_error():
    assert issubclass(LosslessError, AssertionError)


def test_message_decodes_both_windows_when_a_decoder_is_given():
    baseline = {KEY: generation(TOKENS)}
    with pytest.raises(LosslessError) as info:
        check(baseline, {KEY: changed_at(TOKENS, 12)},
              decode=lambda ids: " ".join(f"t{i}" for i in ids))
    message = str(info.value)
    assert "new token 12" in message
    assert "baseline text    ...'t104 t105" in message and "t112 t113'" in message
    assert "speculative text ...'t104" in message and "t999 t113'" in message


# --- first_divergence ---------------------------------------------------------------------

DIVERGENCE_CASES = [
    # id, baseline, speculative, position, baseline window, speculative window
    ("equal", TOKENS, TOKENS, None, None, None),
    ("first-token", TOKENS, changed_at(TOKENS, 0), 0, (100, 101), (999, 101)),
    ("position-7", TOKENS, changed_at(TOKENS, 7), 7, tuple(TOKENS[0:9]),
     tuple(changed_at(TOKENS, 7)[0:9])),
    ("window-clipped-both-sides", TOKENS, changed_at(TOKENS, 19), 19, tuple(TOKENS[11:20]),
     tuple(changed_at(TOKENS, 19)[11:20])),
    ("speculative-shorter", TOKENS, TOKENS[:10], 10, tuple(TOKENS[2:12]), tuple(TOKENS[2:10])),
    ("speculative-longer", TOKENS[:10], TOKENS, 10, tuple(TOKENS[2:10]), tuple(TOKENS[2:12])),
    ("speculative-empty", TOKENS[:3], [], 0, (100, 101), ()),
    ("first-of-two-differences", TOKENS, changed_at(changed_at(TOKENS, 15), 4), 4,
     tuple(TOKENS[0:6]), (100, 101, 102, 103, 999, 105)),
]


@pytest.mark.parametrize("baseline, speculative, position, base_window, spec_window",
                         [c[1:] for c in DIVERGENCE_CASES], ids=[c[0] for c in DIVERGENCE_CASES])
def test_first_divergence(baseline, speculative, position, base_window, spec_window):
    margins = [float(i) for i in range(len(baseline))]
    found = first_divergence(KEY, generation(baseline, margins), speculative)
    if position is None:
        assert found is None
        return
    assert found.key == KEY
    assert found.position == position
    assert found.baseline == base_window
    assert found.speculative == spec_window
    # a margin only where both outputs have a token: an early end is never a near-tie
    both_have_a_token = position < min(len(baseline), len(speculative))
    assert found.margin == (float(position) if both_have_a_token else None)
    assert CONTEXT_TOKENS == 8


# --- lengths and keys ---------------------------------------------------------------------

@pytest.mark.parametrize("speculative", [TOKENS[:12], TOKENS + [120], []],
                         ids=["shorter", "longer", "empty"])
def test_length_mismatch_fails(speculative):
    with pytest.raises(LosslessError, match="output differs from plain decoding") as info:
        check({KEY: generation(TOKENS)}, {KEY: speculative})
    assert f"new token {min(len(speculative), len(TOKENS))}" in str(info.value)


@pytest.mark.parametrize("baseline_keys, speculative_keys, named", [
    ([KEY, OTHER], [KEY], OTHER),
    ([KEY], [KEY, OTHER], OTHER),
    ([KEY], [("embedded-007", 2, 0)], ("embedded-007", 2, 0)),
])
def test_missing_or_extra_sequences_fail(baseline_keys, speculative_keys, named):
    baseline = {key: generation(TOKENS) for key in baseline_keys}
    speculative = {key: list(TOKENS) for key in speculative_keys}
    with pytest.raises(LosslessError, match="different sequences") as info:
        check(baseline, speculative)
    assert repr(named) in str(info.value)


# --- near-ties ----------------------------------------------------------------------------

def near_tie_case(margin_at_7: float):
    margins = [1.0] * len(TOKENS)
    margins[7] = margin_at_7
    return {KEY: generation(TOKENS, margins)}, {KEY: changed_at(TOKENS, 7)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin", [0.0, 0.01, TIE])
def test_half_precision_near_tie_is_reported_not_raised(dtype, margin):
    baseline, speculative = near_tie_case(margin)
    verdict = check(baseline, speculative, dtype=dtype)
    assert verdict.sequences == 1
    assert verdict.label == "near_tie"
    [tie] = verdict.near_ties
    assert (tie.key, tie.position, tie.margin) == (KEY, 7, margin)
    assert tie.speculative[7] == 999


def test_only_the_near_tie_sequences_are_listed():
    baseline, speculative = near_tie_case(0.01)
    baseline[OTHER] = generation(TOKENS)
    speculative[OTHER] = list(TOKENS)
    verdict = check(baseline, speculative, dtype=torch.bfloat16)
    assert verdict.sequences == 2
    assert [t.key for t in verdict.near_ties] == [KEY]


def test_half_precision_near_tie_fails_under_strict():
    baseline, speculative = near_tie_case(0.01)
    with pytest.raises(LosslessError, match="near-tie in half precision") as info:
        check(baseline, speculative, dtype=torch.bfloat16, strict=True)
    assert "new token 7" in str(info.value)
    assert "--specdec-strict" in str(info.value)


def test_half_precision_wide_margin_fails():
    baseline, speculative = near_tie_case(TIE * 2)
    with pytest.raises(LosslessError, match="output differs from plain decoding") as info:
        check(baseline, speculative, dtype=torch.bfloat16)
    assert "new token 7" in str(info.value)
    assert "margin there: 0.1" in str(info.value)


def test_float32_near_tie_fails():
    baseline, speculative = near_tie_case(0.0)
    with pytest.raises(LosslessError, match="output differs from plain decoding") as info:
        check(baseline, speculative, dtype=torch.float32)
    assert "new token 7" in str(info.value)


def test_a_near_tie_in_one_sequence_does_not_hide_an_error_in_another():
    baseline, speculative = near_tie_case(0.0)
    baseline[OTHER] = generation(TOKENS)
    speculative[OTHER] = changed_at(TOKENS, 3)
    with pytest.raises(LosslessError, match="new token 3"):
        check(baseline, speculative, dtype=torch.bfloat16)


def test_longer_speculative_output_is_never_a_near_tie():
    # past the baseline's end there is no margin: always an error
    baseline = {KEY: generation(TOKENS, [0.0] * len(TOKENS), stop="eos")}
    with pytest.raises(LosslessError, match="output differs"):
        check(baseline, {KEY: TOKENS + [7]}, dtype=torch.bfloat16)


def test_truncated_speculative_output_is_never_a_near_tie():
    baseline = {KEY: generation(TOKENS, [0.0] * len(TOKENS))}
    with pytest.raises(LosslessError, match="output differs"):
        check(baseline, {KEY: TOKENS[:12]}, dtype=torch.bfloat16)
