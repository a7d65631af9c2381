"""Coupled Gumbel sampling: noise keyed by (seed, position), exact sampling, greedy."""

from __future__ import annotations

import math

import pytest
import torch

from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.protocol import sampling
from pytest_specdec.protocol.sampling import Sampler, gumbel_noise
from test_memory import LiveTensors

EULER_GAMMA = 0.5772156649015329


# --- the noise ----------------------------------------------------------------------------

def test_same_seed_and_positions_give_identical_noise():
    positions = torch.arange(100, 164)
    first, second = gumbel_noise(3, positions, 512), gumbel_noise(3, positions.clone(), 512)
    assert first.shape == (64, 512)
    assert first.dtype == torch.float64
    assert torch.equal(first, second)


def test_noise_differs_across_seeds_positions_and_columns():
    positions = torch.arange(8)
    a, b = gumbel_noise(1, positions, 64), gumbel_noise(2, positions, 64)
    assert not torch.equal(a, b)
    # no two rows and no two columns repeat
    assert len({tuple(row) for row in a.tolist()}) == 8
    assert len({tuple(col) for col in a.T.tolist()}) == 64


@pytest.mark.parametrize("batch, index, alone", [
    ([5, 6, 7], 1, 6),
    ([5, 6, 7], 0, 5),
    ([7, 6, 5], 0, 7),
    ([0, 1000, 123456], 2, 123456),
])
def test_noise_is_a_function_of_position_not_of_the_batch(batch, index, alone):
    together = gumbel_noise(11, torch.tensor(batch), 512)
    single = gumbel_noise(11, torch.tensor([alone]), 512)
    assert torch.equal(together[index], single[0])


def test_noise_is_standard_gumbel():
    noise = gumbel_noise(0, torch.arange(400), 512)
    assert torch.isfinite(noise).all()
    # mean of standard Gumbel is the Euler-Mascheroni constant, variance pi^2 / 6
    assert noise.mean().item() == pytest.approx(EULER_GAMMA, abs=0.01)
    assert noise.var().item() == pytest.approx(math.pi ** 2 / 6, rel=0.02)


_MASK32 = 0xFFFFFFFF


def _reference_hash32(x):
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def reference_noise(seed, positions, vocab_size):
    """The noise as first defined: whole [rows, vocab] int64 and float64 temporaries."""
    device = positions.device
    seed_key = _reference_hash32(torch.tensor([seed & _MASK32], dtype=torch.int64, device=device))
    row_key = _reference_hash32(seed_key ^ _reference_hash32(positions.to(torch.int64) + 0x9E3779B9))
    cols = torch.arange(vocab_size, dtype=torch.int64, device=device)
    bits = _reference_hash32(row_key[:, None]
                             ^ _reference_hash32(cols * 0x27D4EB2F + 0x165667B1)[None, :])
    uniform = (bits.to(torch.float64) + 0.5) / 4294967296.0
    return -torch.log(-torch.log(uniform))


def same_bits(a, b):
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints[a.dtype]),
                                                                      b.view(ints[b.dtype]))


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 7, 2**40 + 3, -5])
@pytest.mark.parametrize("positions", [[0], [5, 6, 7], [123456, 3, 2**31 + 9, 17]],
                         ids=["one", "three", "four"])
@pytest.mark.parametrize("vocab_size", [1, 249, 250, 251, 1000, 4099])
def test_noise_in_chunks_is_the_reference_noise_bit_for_bit(monkeypatch, seed, positions,
                                                            vocab_size):
    # 1000 elements a chunk: 1000 // rows columns, so these vocabularies end in a partial one
    monkeypatch.setattr(sampling, "CHUNK_ELEMENTS", 1000)
    positions = torch.tensor(positions)
    expected = reference_noise(seed, positions, vocab_size)
    assert same_bits(gumbel_noise(seed, positions, vocab_size), expected)
    assert same_bits(gumbel_noise(seed, positions, vocab_size, dtype=torch.float32),
                     expected.to(torch.float32))


def test_float32_noise_builds_no_64_bit_temporary_of_its_size(monkeypatch):
    monkeypatch.setattr(sampling, "CHUNK_ELEMENTS", 4096)
    positions, vocab_size = torch.arange(5), 10007
    with LiveTensors() as live:
        noise = gumbel_noise(3, positions, vocab_size, dtype=torch.float32)
    assert noise.dtype == torch.float32
    assert live.largest[torch.float32] == 5 * vocab_size * 4  # the output
    # 64-bit temporaries span one chunk: 4096 // 5 columns of the 5 rows
    assert max(live.largest[torch.int64], live.largest[torch.float64]) == 4096 // 5 * 5 * 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_noise_in_another_dtype_is_refused_naming_it(dtype):
    with pytest.raises(ValueError, match=rf"dtype {dtype} is not one of torch.float32, "
                                         r"torch.float64"):
        gumbel_noise(0, torch.arange(2), 8, dtype=dtype)


# --- the sampler --------------------------------------------------------------------------

def test_same_seed_gives_identical_choices_and_different_seeds_differ():
    # flat-ish logits at T=1: the noise decides
    logits = torch.linspace(0.0, 0.1, 512).expand(64, 512)
    positions = torch.arange(64)
    a = Sampler(1.0, seed=1).choose(logits, positions)
    again = Sampler(1.0, seed=1).choose(logits, positions)
    b = Sampler(1.0, seed=2).choose(logits, positions)
    assert torch.equal(a, again)
    assert (a != b).sum().item() >= 60


def test_choice_at_a_position_does_not_depend_on_the_batch():
    sampler = Sampler(0.8, seed=5)
    logits = torch.randn(6, 512, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(40, 46)
    together = sampler.choose(logits, positions).tolist()
    one_by_one = [sampler.choose(logits[i:i + 1], positions[i:i + 1]).item() for i in range(6)]
    assert together == one_by_one


def test_sampler_is_an_exact_sampler_of_the_tempered_softmax():
    temperature, n = 0.7, 20000
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0])
    choices = Sampler(temperature, seed=123).choose(logits.expand(n, 4), torch.arange(n))
    freq = torch.bincount(choices, minlength=4).double() / n
    expected = torch.softmax(logits.double() / temperature, dim=-1)
    assert (freq - expected).abs().max().item() < 0.015, (freq.tolist(), expected.tolist())
    # chi-square with 3 degrees of freedom: 16.27 is the 0.1% critical value
    chi2 = (((freq - expected) * n) ** 2 / (expected * n)).sum().item()
    assert chi2 < 16.27


def test_scores_are_tempered_logits_plus_the_noise():
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([4, 9, 2])
    scores = Sampler(0.5, seed=9).scores(logits, positions)
    expected = logits / 0.5 + gumbel_noise(9, positions, 16).float()
    assert scores.dtype == torch.float32
    assert torch.equal(scores, expected)


def test_zero_temperature_is_argmax_whatever_the_seed_and_position():
    logits = torch.randn(32, 512, generator=torch.Generator().manual_seed(2))
    expected = logits.argmax(dim=-1)
    for seed in (0, 1, 99):
        sampler = Sampler(0.0, seed=seed)
        assert torch.equal(sampler.choose(logits, torch.arange(32) * 7 + seed), expected)
        assert torch.equal(sampler.scores(logits, torch.arange(32)), logits)


def test_default_sampler_is_greedy():
    assert Sampler().temperature == 0.0


def test_half_precision_logits_are_scored_in_float32():
    logits = torch.randn(2, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    assert Sampler(0.0).scores(logits, torch.arange(2)).dtype == torch.float32
    assert Sampler(1.0).scores(logits, torch.arange(2)).dtype == torch.float32


@pytest.mark.parametrize("temperature", [-0.5, -1e-9, float("nan")])
def test_invalid_temperature_raises_naming_the_value(temperature):
    with pytest.raises(ValueError, match="temperature") as info:
        Sampler(temperature)
    assert repr(temperature) in str(info.value)


# --- through the engine -------------------------------------------------------------------

PROMPT = (1, 17, 42, 99, 250)


def test_coupled_sampling_through_generate(tiny_target):
    def run(seed: int) -> list[int]:
        request = GenerationRequest(PROMPT, 24, Sampler(1.0, seed))
        return generate(tiny_target, request).tokens

    first, again, other = run(7), run(7), run(8)
    assert len(first) == 24
    assert first == again
    assert sum(a != b for a, b in zip(first, other)) >= 12


def test_sampled_output_differs_from_greedy(tiny_target):
    greedy = generate(tiny_target, GenerationRequest(PROMPT, 24)).tokens
    sampled = generate(tiny_target, GenerationRequest(PROMPT, 24, Sampler(1.0, 7))).tokens
    assert greedy != sampled
