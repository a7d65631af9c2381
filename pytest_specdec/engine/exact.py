"""Exact mode: attention whose result for a row does not depend on the forward's shape.

In half precision, a k-token verify forward and a one-token decode forward round
differently (transformers#39421, vLLM#54506): attention kernels pick their blocking,
their GQA packing and their reduction order from the query length and the key length,
so the logits at one position differ by a few tenths between the two paths and greedy
can flip at a near-tie. Under ``--specdec-lossless exact`` every target forward of the
decode loop (baseline and speculative alike) computes attention one query row at a
time: row i gathers exactly the keys it may attend to (its context and its tree
ancestors, in position order) and runs the same small kernels on tensors whose shapes
depend only on its position. A row at position p therefore sees bit-identical inputs
and identical kernels whether it was decoded alone or verified among k others, and by
induction over the layers and positions its keys, values and logits are identical too.

The linear layers are not replaced. On this CPU (torch 2.13, oneDNN bf16) a row of
``F.linear`` is the same for every row count from 2 up (tested in tests/test_exact.py),
but a lone row takes another (gemv) kernel that rounds differently, so exact mode never
runs a forward of one row: the engine adds a probe row to a plain decoding step. A GPU
GEMM library may pick different kernels for 2 rows and for 11, which exact mode does
not pin (not measured: no GPU was lent). Attention sinks (gpt-oss) are refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

#: The name exact mode registers its attention function under in transformers.
ROW_INVARIANT_ATTENTION = "specdec_row_invariant"


def row_invariant_attention(module: Any, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None,
                            softcap: float | None = None, **kwargs: Any
                            ) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [b, H, M, D], key and value
    [b, Hkv, L, D], an additive (or bool) mask [b, 1, M, L]; returns [b, M, H, D].

    Each query row is computed alone, in float32, against the keys its mask allows,
    so the kernels' shapes are (H, 1, n) with n the number of keys the row sees."""
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise ValueError("exact mode (--specdec-lossless exact) does not support attention "
                         "sinks; run this target with --specdec-lossless auto")
    b, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    if attention_mask is None:  # plain causal: the new rows are the last `rows` keys
        length = key.shape[2]
        allowed = torch.ones(rows, length, dtype=torch.bool, device=key.device).tril(length - rows)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[0, 0]
    else:
        allowed = attention_mask[0, 0] > torch.finfo(attention_mask.dtype).min / 2
    allowed = allowed[:, -key.shape[2]:]  # a mask wider than this layer's keys (sliding caches)
    out = query.new_empty(b, rows, heads, dim)
    for i in range(rows):
        keep = allowed[i].nonzero().squeeze(1)
        k = key.index_select(2, keep).float()  # [b, Hkv, n, D]
        v = value.index_select(2, keep).float()
        # the GQA group's query heads become rows of one matmul per key head: [b, Hkv, g, D]
        q = query[:, :, i].float().reshape(b, kv_heads, groups, dim)
        scores = q @ k.transpose(-1, -2) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        out[:, i] = (scores.softmax(dim=-1) @ v).reshape(b, heads, dim).to(query.dtype)
    return out, None


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
    """Run the model's attention through :func:`row_invariant_attention` inside the
    block, and restore its own implementation after (the target is shared by cases)."""
    name = register()
    configs = _configs(model)
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, impl in zip(configs, before):
            c._attn_implementation = impl
