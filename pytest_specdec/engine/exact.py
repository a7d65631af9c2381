"""Exact mode: forwards whose result for a row does not depend on the forward's shape.

In half precision, a k-token verify forward and a one-token decode forward round
differently (transformers#39421, vLLM#54506): attention kernels pick their blocking,
their GQA packing and their reduction order from the query length and the key length,
and matmul kernels from the row count, so the logits at one position differ by a few
tenths between the two paths and greedy can flip at a near-tie. Under
``--specdec-lossless exact`` every target forward of the decode loop (baseline and
speculative alike, at batch 1 and batched) pins both:

- attention is computed one query row at a time, per sequence of the batch: row i of
  sequence b gathers exactly the keys its own mask row allows (its context and its tree
  ancestors, in position order; never a pad or another sequence's column) and runs the
  same small kernels on tensors whose shapes depend only on its position;
- the target's ``nn.Linear`` layers run in blocks of exactly :data:`LINEAR_BLOCK` rows
  (the last block padded with zeros): on this CPU (torch 2.13, MKL float32, oneDNN
  bf16/fp16) a row of ``F.linear`` changes its bits with the row count (float32 from 3
  or 16 rows on; bfloat16 for a 49152 x 576 output head from 28 or 33 rows on, by the
  weights), while within a call of a fixed row count a row's result depends neither on
  its place in the block nor on the other rows (tests/test_batch_exact.py).

A row at position p therefore sees bit-identical inputs and identical kernels whether it
was decoded alone, verified among k others, or batched with other sequences, and by
induction over the layers and positions its keys, values and logits are identical too.
What else runs per row (embeddings, RoPE, norms, activations, the sampler) was checked
end to end (tiny models in float32, bfloat16 and float16, the default model in
bfloat16: every emitted logit bit-identical), not kernel by kernel. Not
pinned: a layer that is not a plain ``nn.Linear`` (a quantized or fused one, GPT-2's
Conv1D) or whose ``forward`` was already replaced on the instance (accelerate's
offloading hooks); a GPU's kernels (not measured). Attention sinks (gpt-oss) are refused.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F

#: The name exact mode registers its attention function under in transformers.
ROW_INVARIANT_ATTENTION = "specdec_row_invariant"
#: The row count of every matmul exact mode runs in the target's linear layers.
LINEAR_BLOCK = 8


def row_invariant_attention(module: Any, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None,
                            softcap: float | None = None, **kwargs: Any
                            ) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [b, H, M, D], key and value
    [b, Hkv, L, D], an additive (or bool) mask [b or 1, 1, M, L]; returns [b, M, H, D].

    Each query row of each sequence is computed alone, in float32, against the keys its
    own mask row allows, so the kernels' shapes are (1, H, 1, n) with n the number of
    keys the row sees, whatever the batch holds besides."""
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise ValueError("exact mode (--specdec-lossless exact) does not support attention "
                         "sinks; run this target with --specdec-lossless auto")
    b, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    if attention_mask is None:  # plain causal: the new rows are the last `rows` keys
        length = key.shape[2]
        allowed = torch.ones(1, rows, length, dtype=torch.bool, device=key.device).tril(length - rows)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[:, 0]
    else:
        allowed = attention_mask[:, 0] > torch.finfo(attention_mask.dtype).min / 2
    allowed = allowed[:, :, -key.shape[2]:]  # a mask wider than this layer's keys (sliding caches)
    out = query.new_empty(b, rows, heads, dim)
    for s in range(b):
        seen = allowed[s if allowed.shape[0] > 1 else 0]  # [M, L]: this sequence's own rows
        for i in range(rows):
            keep = seen[i].nonzero().squeeze(1)
            k = key[s:s + 1].index_select(2, keep).float()  # [1, Hkv, n, D]
            v = value[s:s + 1].index_select(2, keep).float()
            # the GQA group's query heads become rows of one matmul per key head: [1, Hkv, g, D]
            q = query[s:s + 1, :, i].float().contiguous().reshape(1, kv_heads, groups, dim)
            scores = q @ k.transpose(-1, -2) * scale
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            out[s, i] = (scores.softmax(dim=-1) @ v).reshape(heads, dim).to(query.dtype)
    return out, None


def pinned_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` computed in matmuls of exactly :data:`LINEAR_BLOCK` rows (the rows of
    x flattened, the last block padded with zeros), so that a row's result does not
    depend on how many rows the forward has."""
    weight, bias = module.weight, module.bias
    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    if n % LINEAR_BLOCK:
        padded = flat.new_zeros(n + LINEAR_BLOCK - n % LINEAR_BLOCK, flat.shape[1])
        padded[:n] = flat
        flat = padded
    out = torch.cat([F.linear(flat[j:j + LINEAR_BLOCK], weight, bias)
                     for j in range(0, flat.shape[0], LINEAR_BLOCK)])
    return out[:n].reshape(*x.shape[:-1], weight.shape[0])


@contextmanager
def pinned_linears(model: Any) -> Iterator[None]:
    """Inside the block, every plain ``nn.Linear`` of the model runs :func:`pinned_linear`
    (an instance attribute, deleted after: the target is shared by cases). A layer
    whose ``forward`` is already replaced on the instance (offloading hooks) is left
    alone."""
    patched = [m for m in model.modules()
               if type(m) is torch.nn.Linear and "forward" not in vars(m)]
    try:
        for m in patched:
            m.forward = functools.partial(pinned_linear, m)
        yield
    finally:
        for m in patched:
            vars(m).pop("forward", None)


def register() -> str:
    """Register the attention function with transformers (idempotent); its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ROW_INVARIANT_ATTENTION, row_invariant_attention)
    AttentionMaskInterface.register(ROW_INVARIANT_ATTENTION, sdpa_mask)
    return ROW_INVARIANT_ATTENTION


def _configs(model: Any) -> list[Any]:
    """The model's config and its sub-configs (a multimodal model's text config)."""
    config = model.config
    found = [config]
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            found.append(sub)
    return found


@contextmanager
def row_invariant(model: Any) -> Iterator[None]:
    """Run the model's attention through :func:`row_invariant_attention` and its linear
    layers through :func:`pinned_linear` inside the block, and restore its own after
    (the target is shared by cases)."""
    name = register()
    configs = _configs(model)
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        with pinned_linears(model):
            yield
    finally:
        for c, impl in zip(configs, before):
            c._attn_implementation = impl
