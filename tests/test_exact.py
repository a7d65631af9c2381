"""Exact mode (--specdec-lossless exact): attention computed row by row, so that in
half precision speculative output equals plain decoding token for token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.engine.exact import (LINEAR_BLOCK, ROW_INVARIANT_ATTENTION, model_norms,
                                         pinned_norm, row_invariant, row_invariant_attention)
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.protocol.drafter import Draft, DrafterBase
from pytest_specdec.protocol.sampling import Sampler

PROMPT = (5, 17, 33, 9, 41, 17, 33, 9, 41, 17)


def attention_inputs(rows=5, length=12, heads=4, kv_heads=2, dim=16):
    torch.manual_seed(1)
    q = torch.randn(1, heads, rows, dim)
    k, v = torch.randn(2, 1, kv_heads, length, dim)
    return q, k, v


class Module:  # what an attention function reads from its module
    num_key_value_groups = 2
    sinks = None


@pytest.mark.parametrize("mask_kind", ["causal-none", "bool", "additive-tree"])
def test_row_invariant_attention_computes_attention(mask_kind):
    q, k, v = attention_inputs()
    allowed = torch.ones(5, 12, dtype=torch.bool).tril(7)
    if mask_kind == "additive-tree":  # row 3 may not see node 2 (a sibling), row 4 not 0
        allowed[3, 9] = False
        allowed[4, 0] = False
    mask = {"causal-none": None, "bool": allowed[None, None],
            "additive-tree": torch.zeros(1, 1, 5, 12).masked_fill(~allowed, -3e38)}[mask_kind]
    out, _ = row_invariant_attention(Module(), q, k, v, mask, scaling=0.25)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              attn_mask=allowed, scale=0.25)
    assert out.shape == (1, 5, 4, 16)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_a_row_does_not_depend_on_the_other_rows_or_the_keys_it_cannot_see():
    q, k, v = attention_inputs(rows=6, length=20)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    allowed = torch.ones(6, 20, dtype=torch.bool).tril(14)
    many, _ = row_invariant_attention(Module(), q, k, v, allowed[None, None])
    # row 2 (position 16) alone, with only the 17 keys it sees
    alone, _ = row_invariant_attention(Module(), q[:, :, 2:3], k[:, :, :17], v[:, :, :17], None)
    assert torch.equal(many[:, 2], alone[:, 0])


def test_attention_sinks_are_refused():
    q, k, v = attention_inputs()
    module = Module()
    module.sinks = torch.zeros(4)
    with pytest.raises(ValueError, match="attention sinks"):
        row_invariant_attention(module, q, k, v, None)


def test_the_model_gets_its_own_attention_back_even_after_an_error():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError):
        with row_invariant(model):
            assert model.config._attn_implementation == ROW_INVARIANT_ATTENTION
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before


class Chains(DrafterBase):
    """Drafts the baseline's own next tokens, with a wrong one every third step: chains
    of every length are verified, accepted in part and rolled back."""

    def __init__(self, truth, prompt=PROMPT):
        self.truth, self.calls, self.prompt_length = truth, 0, len(prompt)

    def propose(self, context, k):
        self.calls += 1
        done = len(context) - self.prompt_length
        draft = list(self.truth[done:done + k])
        if self.calls % 3 == 0 and draft:
            draft[-1] = (draft[-1] + 1) % 512
        return Draft(tuple(draft))


class Trees(Chains):
    """A wrong sibling first, then the right chain below a second root."""

    def propose(self, context, k):
        chain = super().propose(context, max(k - 1, 1)).tokens
        if not chain:
            return Draft()
        wrong = (chain[0] + 7) % 512
        return Draft((wrong, *chain), (-1, -1, *range(1, len(chain))))


def peaked_bf16(seed=3):
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():  # spread logits, as a trained model's, so ties are rare
        model.lm_head.weight.mul_(20)
    return wrap_model(model.to(torch.bfloat16), name="tiny-bf16")


@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("drafter", [Chains, Trees])
def test_exact_mode_speculative_equals_plain_decoding_in_bf16(drafter, temperature):
    target = peaked_bf16()
    request = GenerationRequest(PROMPT, 48, Sampler(temperature, seed=9))
    base = generate(target, request, exact=True)
    spec = generate(target, request, drafter(base.tokens), k=5, exact=True)
    assert spec.tokens == base.tokens
    assert spec.stats.mat > 1.5  # drafts were accepted: multi-row forwards were compared
    assert target.model.config._attn_implementation != ROW_INVARIANT_ATTENTION


def test_exact_mode_refuses_a_target_that_takes_no_mask():
    model = tiny_model("llama")
    model.config._attn_implementation = "flex_attention"
    target = wrap_model(model, name="tiny-flex")
    with pytest.raises(ValueError, match="--specdec-lossless exact needs .*tiny-flex"):
        generate(target, GenerationRequest(PROMPT, 4), exact=True)


def step_logits(target, prompt, truth, draft_length, exact):
    """Logits of the positions of `truth`, decoded one per forward (draft_length 0) or
    verified draft_length + 1 per forward, through the engine's step."""
    from pytest_specdec.engine import speculative_step

    cache, context, cached, rows = target.new_cache(), list(prompt), 0, []
    with torch.inference_mode():
        if exact:
            target.forward(context[:-1], cache, keep_logits=1)
            cached = len(context) - 1
        with row_invariant(target.model) if exact else torch.inference_mode():
            while len(context) - len(prompt) < len(truth):
                done = len(context) - len(prompt)
                draft = Draft(tuple(truth[done:done + draft_length]))
                step = speculative_step(target, Sampler(), cache, context, cached, draft,
                                        exact=exact)
                assert step.emitted[:len(truth) - done] == list(truth[done:done + len(step.emitted)])
                rows.append(step.logits.float())
                context += step.emitted
                cached = len(context) - 1
    return torch.cat(rows)[:len(truth)]


@pytest.mark.parametrize("exact", [False, True])
def test_default_model_bf16_verify_rows_equal_decode_rows_only_in_exact_mode(default_bf16, exact):
    # on a trained model in bf16, a verify forward's rows differ from one-token decoding
    # by tenths of a logit; exact mode makes them bit-identical
    target = default_bf16
    prompt = target.encode_prompt("Natalia sold clips to 48 of her friends in April, and then "
                                  "she sold half as many clips in May. How many clips did "
                                  "Natalia sell altogether in April and May?")
    truth = generate(target, GenerationRequest(tuple(prompt), 18), exact=exact).tokens
    assert len(truth) == 18
    decoded = step_logits(target, prompt, truth, 0, exact)
    verified = step_logits(target, prompt, truth, 5, exact)
    if exact:
        assert torch.equal(decoded, verified)
    else:
        assert (decoded - verified).abs().max() > 0.05


# --- norms: every reduction of the forward row-invariant ----------------------------------

def norm_of(kind: str) -> torch.nn.Module:
    """A norm as the models hold it, with random weights (a norm's own are ones/zeros)."""
    torch.manual_seed(2)
    norm = {"llama": lambda: tiny_model("llama").model.norm,
            "gemma": lambda: tiny_model("gemma").model.norm,
            "qwen3-q_norm": lambda: tiny_model("qwen3").model.layers[0].self_attn.q_norm,
            "layer_norm": lambda: torch.nn.LayerNorm(64),
            "torch_rms_norm": lambda: torch.nn.RMSNorm(64)}[kind]()
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.normal_()
    return norm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["llama", "gemma", "qwen3-q_norm", "layer_norm",
                                  "torch_rms_norm"])
def test_a_pinned_norm_row_is_the_same_for_every_row_count(kind, dtype):
    norm = norm_of(kind).to(dtype)
    width = norm.weight.shape[0]
    # q_norm normalizes each head of each token: rows are (token, head) pairs
    x = torch.randn(1, 33, 4, width) if kind == "qwen3-q_norm" else torch.randn(1, 33, width)
    x = (x * 3).to(dtype)
    with torch.no_grad():
        every = pinned_norm(norm, x)
        for rows in (1, 2, 7, 33):
            some = pinned_norm(norm, x[:, :rows])
            assert torch.equal(some, every[:, :rows]), rows
            # on this CPU, the bits of the norm's own forward (exact mode's outputs kept)
            assert torch.equal(some, norm(x[:, :rows])), rows


class RowCountNorm(torch.nn.Module):
    """A norm whose result depends on how many rows it is given, as a GPU reduction's
    blocking does: what pinning must hide."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.reshape(-1, x.shape[-1]).shape[0]


def test_a_pinned_norm_sees_blocks_of_a_fixed_row_count():
    norm = RowCountNorm()
    x = torch.randn(1, 11, 8)
    assert not torch.equal(norm(x[:, :3]), norm(x)[:, :3])
    for rows in (1, 3, 11):
        assert torch.equal(pinned_norm(norm, x[:, :rows]), x[:, :rows] * LINEAR_BLOCK)


class GatedRMSNorm(torch.nn.Module):
    """A norm exact mode does not know how to pin (two inputs)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return x


def test_row_invariant_pins_every_norm_and_restores_them():
    model = tiny_model("qwen3")
    pinned, other = model_norms(model)
    # per layer: input, post-attention, q and k norms; then the final norm
    assert len(pinned) == 4 * 2 + 1 and other == []
    with row_invariant(model):
        assert all("forward" in vars(m) for m in pinned)
    assert not any("forward" in vars(m) for m in pinned)


def test_a_norm_that_cannot_be_pinned_is_named_and_refused_off_the_cpu():
    model = tiny_model("llama")
    model.model.norm = GatedRMSNorm()
    hooked = model.model.layers[1].input_layernorm
    hooked.forward = lambda x: x  # replaced on the instance (an offloading hook)
    pinned, other = model_norms(model)
    assert other == ["model.layers.1.input_layernorm (LlamaRMSNorm)", "model.norm (GatedRMSNorm)"]
    with row_invariant(model):  # on the CPU: its own kernels, row-invariant here
        pass
    with pytest.raises(ValueError, match=r"cannot pin the norm layers model\.layers\.1\."
                                         r"input_layernorm \(LlamaRMSNorm\), model\.norm "
                                         r"\(GatedRMSNorm\).* on meta .*--specdec-lossless auto"):
        with row_invariant(model.to("meta")):
            pass
    assert model.config._attn_implementation != ROW_INVARIANT_ATTENTION


def test_pinnable_norms_are_not_refused_off_the_cpu():
    model = tiny_model("gemma").to("meta")
    with row_invariant(model):
        assert all("forward" in vars(m) for m in model_norms(model)[0])
