"""What only a GPU shows: bf16 on CUDA kernels. Skipped (with that reason) without CUDA;
`make gpu-check` runs them on a GPU machine (benchmarks/gpu/check.sh)."""

from __future__ import annotations

import pytest
import torch

from pytest_specdec.bench.lossless import check_lossless
from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.sampling import Sampler
from test_exact import Chains, Trees, step_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: run `make gpu-check` on a GPU machine")

PROMPT = tuple(range(100, 164))
KEY = ("gpu", 0, 0)


@pytest.fixture(scope="module")
def gpu_target():
    """A random-init Qwen3 of realistic width (8 of Qwen3-8B's 36 layers), bf16 on CUDA,
    its output head sharpened so that ties are as rare as on a trained model."""
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=32000, hidden_size=4096, intermediate_size=12288, num_hidden_layers=8,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=4096, eos_token_id=31999, bos_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(8)
    return wrap_model(model, name="random-qwen3-8l")


@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("drafter", [Chains, Trees])
def test_bf16_teacher_forced_check_passes_on_cuda(gpu_target, drafter, temperature):
    request = GenerationRequest(PROMPT, 128, Sampler(temperature, seed=3))
    base = generate(gpu_target, request)
    spec = generate(gpu_target, request, drafter(base.tokens, PROMPT), k=6)
    verdict = check_lossless(gpu_target, {KEY: base}, [({KEY: request}, {KEY: spec})])
    print(f"\n{drafter.__name__} T={temperature}: {verdict.summary()}")
    assert verdict.tokens == len(spec.tokens)


@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("drafter", [Chains, Trees])
def test_exact_mode_on_cuda(gpu_target, drafter, temperature):
    # whether cuBLAS gives a row the same result for 2 and for 7 rows decides this
    request = GenerationRequest(PROMPT, 128, Sampler(temperature, seed=3))
    base = generate(gpu_target, request, exact=True)
    spec = generate(gpu_target, request, drafter(base.tokens, PROMPT), k=6, exact=True)
    assert spec.tokens == base.tokens


def test_exact_mode_rows_bit_identical_on_cuda(gpu_target):
    truth = generate(gpu_target, GenerationRequest(PROMPT, 24), exact=True).tokens
    decoded = step_logits(gpu_target, PROMPT, truth, 0, True)
    verified = step_logits(gpu_target, PROMPT, truth, 5, True)
    print(f"\nmax |decode - verify| in exact mode: {(decoded - verified).abs().max():.3g}")
    assert torch.equal(decoded, verified)
