"""The peer as an independent reference: transformers' generate (plain and prompt
lookup) must produce our engine baseline's tokens, greedy at T=0 and with our coupled
Gumbel sampling (a LogitsProcessor) at T>0, and a difference must fail the peer case.

The tiny target's output head is scaled up so its distribution is peaked: its text
repeats, so prompt lookup gets drafts accepted (the verification forward chooses
several positions at once), while at T=0.6 the Gumbel noise still changes tokens.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from conftest import tiny_model
from pytest_specdec.bench import peer as peer_module
from pytest_specdec.bench.lossless import LosslessError
from pytest_specdec.bench.peer import (CoupledGumbel, PeerMismatch, check_peer, hf_method,
                                       pld_peer_settings)
from pytest_specdec.drafters.pld import PromptLookup
from pytest_specdec.engine import Generation, GenerationRequest, generate
from pytest_specdec.engine.metrics import SpecDecodingStats
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.drafter import DrafterBase
from pytest_specdec.protocol.sampling import Sampler
from pytest_specdec.reporting import peer_settings_lines

BUDGET = 48
HEAD_SCALE = 64
SEED = 1234


@pytest.fixture(scope="module")
def peaked():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    return wrap_model(model, name="tiny-peaked")


@pytest.fixture(scope="module")
def prompt() -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.randint(1, 500, (16,), generator=generator).tolist())


def request_at(prompt, temperature: float) -> GenerationRequest:
    return GenerationRequest(prompt, BUDGET, Sampler(temperature, SEED))


@pytest.fixture(scope="module")
def ours(peaked, prompt) -> dict[float, Generation]:
    """Our engine's baseline (no drafter) at T=0 and T=0.6."""
    return {t: generate(peaked, request_at(prompt, t), None, k=0) for t in (0.0, 0.6)}


@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("lookup", [0, 5], ids=["hf_generate", "hf_pld"])
def test_generate_gives_our_baseline_tokens(peaked, prompt, ours, temperature, lookup):
    peer = hf_method(peaked, prompt_lookup_tokens=lookup, max_ngram=3)(request_at(prompt, temperature))
    assert peer.tokens == ours[temperature].tokens
    assert len(peer.tokens) == BUDGET  # the tiny target's EOS never comes first here
    if lookup:
        # drafts were accepted: some verification forwards chose several positions
        assert peer.stats.steps < len(peer.tokens)
    else:
        assert peer.stats.steps == len(peer.tokens)


def test_the_noise_changes_the_tokens(ours):
    """Otherwise T=0.6 would test nothing beyond greedy."""
    assert ours[0.6].tokens != ours[0.0].tokens


def test_a_wrong_position_in_the_processor_is_caught(peaked, prompt, ours, monkeypatch):
    """Noise of the next position instead of this one: generate's tokens change."""

    class OffByOne(CoupledGumbel):
        def __call__(self, input_ids, scores):
            return super().__call__(input_ids[:, :-1], scores)

    monkeypatch.setattr(peer_module, "CoupledGumbel", OffByOne)
    peer = hf_method(peaked, prompt_lookup_tokens=5, max_ngram=3)(request_at(prompt, 0.6))
    with pytest.raises(PeerMismatch):
        check_peer({("p", 0, 0): ours[0.6]}, [{("p", 0, 0): peer}], peer="hf_pld",
                   dtype=torch.float32)


def test_coupled_gumbel_scores_are_the_samplers():
    """At input length t the processor scores position t exactly as our Sampler does."""
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    input_ids = torch.zeros(2, 37, dtype=torch.long)
    processed = CoupledGumbel(0.7, 99)(input_ids, logits)
    expected = Sampler(0.7, 99).scores(logits, torch.tensor([37, 37]))
    assert processed.dtype == torch.float32
    assert torch.equal(processed, expected)
    with pytest.raises(ValueError, match="temperature > 0, got 0"):
        CoupledGumbel(0.0, 1)


# --------------------------------------------------------------------------- check_peer


def gen(tokens) -> Generation:
    return Generation(tokens=list(tokens), stop="budget", stats=SpecDecodingStats())


BASELINE = {("q1", 0, 0): gen(range(10, 30)), ("q1", 0, 1): gen(range(40, 60))}


def corrupted(position: int) -> dict:
    tokens = list(range(40, 60))
    tokens[position] = 7
    return {("q1", 0, 0): gen(range(10, 30)), ("q1", 0, 1): gen(tokens)}


def test_check_peer_exact_over_every_round():
    verdict = check_peer(BASELINE, [BASELINE, BASELINE], peer="hf_generate", dtype=torch.float32)
    assert (verdict.label, verdict.divergence) == ("exact", None)


def test_check_peer_fails_in_fp32_naming_where_and_both_windows():
    with pytest.raises(PeerMismatch) as info:
        check_peer(BASELINE, [BASELINE, corrupted(12)], peer="hf_pld", dtype=torch.float32,
                   decode=lambda ids: "|".join(map(str, ids)))
    error = info.value
    assert isinstance(error, LosslessError)
    assert (error.peer, error.timed_round) == ("hf_pld", 2)
    assert (error.divergence.key, error.divergence.position) == (("q1", 0, 1), 12)
    message = str(error)
    assert "timed round 2: problem 'q1' sample 0 round 1, new token 12" in message
    assert "our baseline ...[44, 45, 46, 47, 48, 49, 50, 51, 52, 53]" in message
    assert "hf_pld       ...[44, 45, 46, 47, 48, 49, 50, 51, 7, 53]" in message
    assert "'44|45|46|47|48|49|50|51|7|53'" in message


def test_check_peer_labels_a_half_precision_difference():
    verdict = check_peer(BASELINE, [corrupted(3)], peer="hf_generate", dtype=torch.bfloat16)
    assert verdict.label == "differs"
    assert verdict.timed_round == 1
    assert verdict.description.splitlines()[0] == "problem 'q1' sample 0 round 1, new token 3"


def test_check_peer_a_shorter_output_is_a_divergence():
    short = {("q1", 0, 0): gen(range(10, 30)), ("q1", 0, 1): gen(range(40, 55))}
    with pytest.raises(PeerMismatch, match="new token 15"):
        check_peer(BASELINE, [short], peer="hf_generate", dtype=torch.float32)


def test_check_peer_other_sequences():
    with pytest.raises(LosslessError, match=r"other sequences .*\('q1', 0, 1\)"):
        check_peer(BASELINE, [{("q1", 0, 0): gen(range(10, 30))}], peer="hf_generate",
                   dtype=torch.float32)


# --------------------------------------------------------------------------- settings


class DeepLookup:
    max_depth = 7

    def __init__(self, max_ngram: int = 4):
        self.max_ngram = max_ngram


@pytest.mark.parametrize("factory, k, expected", [
    (DeepLookup, None, (7, 4)),
    (DeepLookup, 3, (3, 4)),  # --specdec-k overrides every drafter, pld and hf_pld alike
    # nothing registered as pld: our drafters/pld.py is copied
    (None, None, (PromptLookup.max_depth, inspect.signature(PromptLookup).parameters["max_ngram"].default)),
    (DrafterBase, None, "declares no integer default for max_ngram"),
])
def test_pld_peer_settings(factory, k, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            pld_peer_settings(factory, k)
        return
    settings = pld_peer_settings(factory, k)
    assert (settings.prompt_lookup_num_tokens, settings.max_matching_ngram_size) == expected


def test_pld_peer_settings_follow_our_pld_drafter():
    settings = pld_peer_settings(PromptLookup, None)
    assert settings.prompt_lookup_num_tokens == PromptLookup.max_depth
    assert settings.max_matching_ngram_size == PromptLookup().max_ngram


def test_report_shows_peer_settings_and_divergences():
    common = dict(role="peer", paradigm="best_of_n", temperature=0.6, dtype="bfloat16")
    records = [
        {**common, "drafter": "hf_pld", "lossless": "differs",
         "peer_settings": {"prompt_lookup_num_tokens": 10, "max_matching_ngram_size": 3,
                           "sampling": "coupled"},
         "peer_divergence": "problem 'q1' sample 2 round 0, new token 5\n  our baseline ..."},
        {**common, "drafter": "hf_generate", "lossless": "exact",
         "peer_settings": {"prompt_lookup_num_tokens": 0, "sampling": "coupled"}},
        {**common, "role": "baseline", "drafter": "baseline", "lossless": "exact"},
    ]
    assert peer_settings_lines(records) == [
        "- hf_generate settings: prompt_lookup_num_tokens 0, sampling coupled",
        "- hf_pld settings: prompt_lookup_num_tokens 10, max_matching_ngram_size 3, sampling coupled",
        "- hf_pld, best_of_n T=0.6: differs from our baseline (bfloat16) first at "
        "problem 'q1' sample 2 round 0, new token 5",
    ]


# --------------------------------------------------------------------------- the suite


CORRUPTING_CONFTEST = '''
import pytest_specdec.bench.session as session

_hf_method = session.hf_method


def corrupting_hf_method(target, **options):
    run = _hf_method(target, **options)

    def corrupted(request):
        generation = run(request)
        generation.tokens[2] = (generation.tokens[2] + 1) % 100
        return generation

    return corrupted


session.hf_method = corrupting_hf_method
'''


def test_suite_fails_the_peer_case_when_generate_differs(suite, tiny_model_dir):
    """test_hf_peer fails, naming the position, when generate's tokens are not ours."""
    suite.makeconftest(CORRUPTING_CONFTEST)
    result = suite.runpytest_subprocess(
        "-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
        "--specdec-problems", "1", "--specdec-max-new-tokens", "6",
        "--specdec-paradigm", "multi_round", "--specdec-rounds", "1",
        "--specdec-drafter", "pld", "--specdec-peer", "hf_generate,hf_pld", "-k", "test_hf_peer",
        "--benchmark-disable", timeout=300)
    result.assert_outcomes(failed=2)
    output = result.stdout.str()
    assert "PeerMismatch" in output
    for peer in ("hf_generate", "hf_pld"):
        assert f"FAILED test_cases.py::test_hf_peer[{peer}-multi_round]" in output
        assert f"{peer} (transformers generate) differs from our baseline in fp32" in output
    assert "round 0, new token 2" in output


@pytest.mark.parametrize("option, value", [("repetition_penalty", 1.5), ("no_repeat_ngram_size", 2)])
def test_the_models_generation_config_cannot_change_the_scores(peaked, prompt, ours, monkeypatch,
                                                                option, value):
    """A hub model's generation_config may set a repetition penalty: generate would then
    decode other text than our engine, so the peer resets it."""
    monkeypatch.setattr(peaked.model.generation_config, option, value)
    run = hf_method(peaked, prompt_lookup_tokens=5, max_ngram=3)
    assert run(request_at(prompt, 0.0)).tokens == ours[0.0].tokens
    monkeypatch.setattr(peer_module, "neutral_options", lambda model: {})
    unguarded = hf_method(peaked, prompt_lookup_tokens=5, max_ngram=3)
    assert unguarded(request_at(prompt, 0.0)).tokens != ours[0.0].tokens
