"""Exact mode: forwards whose result for a row does not depend on the forward's shape.

In half precision, a k-token verify forward and a one-token decode forward round
differently (transformers#39421, vLLM#54506): attention kernels pick their blocking,
their GQA packing and their reduction order from the query length and the key length,
and matmul kernels from the row count, so the logits at one position differ by a few
tenths between the two paths and greedy can flip at a near-tie. Under
``--specdec-lossless exact`` every target forward of the decode loop (baseline and
speculative alike, at batch 1 and batched) pins all three:

- attention is computed one query row at a time, per sequence of the batch: row i of
  sequence b gathers exactly the keys its own mask row allows (its context and its tree
  ancestors, in position order; never a pad or another sequence's column) and runs the
  same small kernels on tensors whose shapes depend only on its position;
- the target's ``nn.Linear`` layers run in blocks of exactly :data:`LINEAR_BLOCK` rows
  (the last block padded with zeros): on this CPU (torch 2.13, MKL float32, oneDNN
  bf16/fp16) a row of ``F.linear`` changes its bits with the row count (float32 from 3
  or 16 rows on; bfloat16 for a 49152 x 576 output head from 28 or 33 rows on, by the
  weights), while within a call of a fixed row count a row's result depends neither on
  its place in the block nor on the other rows (tests/test_batch_exact.py);
- the model's norms, the forward's other reductions, run their own ``forward`` on blocks
  of exactly :data:`LINEAR_BLOCK` rows as well (:func:`pinned_norm`): a GPU's reduction
  kernel picks its blocking from the number of rows, so a norm over 7 rows may round a
  row differently than over 1. Pinned: per-row norms by class name (``*RMSNorm``,
  ``*LayerNorm``: Llama, Qwen, Gemma, torch's own ...) taking one input. On this CPU a
  row of these reductions was already row-invariant, and pinning leaves their bits as
  they were. A norm it cannot pin (another class, a second input such as a gate, a
  ``forward`` replaced on the instance) keeps its own kernels on the CPU and is refused
  on any other device.

A row at position p therefore sees bit-identical inputs and identical kernels whether it
was decoded alone, verified among k others, or batched with other sequences, and by
induction over the layers and positions its keys, values and logits are identical too.
What else runs per row (embeddings, RoPE and activations, element-wise; the sampler's
argmax, which does not round) was checked end to end (tiny models in float32, bfloat16 and
float16, the default model in bfloat16: every emitted logit bit-identical), not kernel
by kernel. Not pinned: a layer that is not a plain ``nn.Linear`` (a quantized or fused
one, GPT-2's Conv1D) or whose ``forward`` was already replaced on the instance
(accelerate's offloading hooks); a GPU's kernels were not measured. Attention sinks
(gpt-oss) are refused.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator

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


def _in_blocks(flat: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]
               ) -> torch.Tensor:
    """``compute`` on the rows of `flat` [n, ...] in blocks of exactly
    :data:`LINEAR_BLOCK` rows (the last block padded with zeros); the n rows of the
    results, concatenated."""
    n = flat.shape[0]
    if n % LINEAR_BLOCK:
        padded = flat.new_zeros(n + LINEAR_BLOCK - n % LINEAR_BLOCK, *flat.shape[1:])
        padded[:n] = flat
        flat = padded
    return torch.cat([compute(flat[j:j + LINEAR_BLOCK])
                      for j in range(0, flat.shape[0], LINEAR_BLOCK)])[:n]


def pinned_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` computed in matmuls of exactly :data:`LINEAR_BLOCK` rows (the rows of
    x [..., in] flattened, the last block padded with zeros), so that a row's result
    does not depend on how many rows the forward has."""
    weight, bias = module.weight, module.bias
    out = _in_blocks(x.reshape(-1, x.shape[-1]), lambda block: F.linear(block, weight, bias))
    return out.reshape(*x.shape[:-1], weight.shape[0])


@contextmanager
def pinned_linears(model: Any) -> Iterator[None]:
    """Inside the block, every plain ``nn.Linear`` of the model runs :func:`pinned_linear`
    (an instance attribute, deleted after: the target is shared by cases). A layer
    whose ``forward`` is already replaced on the instance (offloading hooks) is left
    alone."""
    patched = [m for m in model.modules()
               if type(m) is torch.nn.Linear and "forward" not in vars(m)]
    with _forwards_replaced(patched, pinned_linear):
        yield


@contextmanager
def _forwards_replaced(modules: list[Any], function: Any) -> Iterator[None]:
    """Each module's ``forward`` replaced by ``function(module, ...)`` inside the block
    (an instance attribute, deleted after: the target is shared by cases)."""
    try:
        for m in modules:
            m.forward = functools.partial(function, m)
        yield
    finally:
        for m in modules:
            vars(m).pop("forward", None)


#: The class-name endings of the norms exact mode pins: per-row norms over a row's
#: trailing dimensions (torch's ``LayerNorm`` and ``RMSNorm``, transformers' ``*RMSNorm``
#: and ``*LayerNorm`` of Llama, Qwen, Gemma, Mistral, OLMo, Cohere ...), taking one input.
PINNED_NORM_SUFFIXES = ("RMSNorm", "LayerNorm")


def _normalized_dims(module: torch.nn.Module) -> int:
    """How many trailing dimensions of its input a norm normalizes over (a row)."""
    shape = getattr(module, "normalized_shape", None)
    return len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1


def pinned_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a per-row norm, its own forward run on blocks of exactly
    :data:`LINEAR_BLOCK` rows (x [..., *row] flattened to rows, the last block padded
    with zeros, which normalize to zeros), so that the shapes its reductions see, and
    so a row's result, do not depend on how many rows the forward has."""
    dims = _normalized_dims(module)
    lead, row = x.shape[:-dims], x.shape[-dims:]
    forward = type(module).forward
    out = _in_blocks(x.reshape(-1, *row), lambda block: forward(module, block))
    return out.reshape(*lead, *out.shape[1:])


def _takes_one_input(module: torch.nn.Module) -> bool:
    parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
    return len(parameters) == 1 and parameters[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def model_norms(model: Any) -> tuple[list[torch.nn.Module], list[str]]:
    """The model's norm modules (a class name containing "Norm"): those exact mode pins
    (a per-row norm by :data:`PINNED_NORM_SUFFIXES`, taking one input, whose
    ``forward`` is not already replaced on the instance), and the others, each named
    "path (class)"."""
    pinned, other = [], []
    for path, m in model.named_modules():
        kind = type(m).__name__
        if "Norm" not in kind:
            continue
        if kind.endswith(PINNED_NORM_SUFFIXES) and _takes_one_input(m) and "forward" not in vars(m):
            pinned.append(m)
        else:
            other.append(f"{path or '<model>'} ({kind})")
    return pinned, other


@contextmanager
def pinned_norms(model: Any) -> Iterator[None]:
    """Inside the block, the model's per-row norms run :func:`pinned_norm` (an instance
    attribute, deleted after). A norm exact mode cannot pin (:func:`model_norms`) is
    refused unless every parameter is on the CPU: a CUDA reduction's blocking depends on
    the row count, while this CPU's reductions of a row were checked row-invariant end to
    end, so there such a norm keeps its own kernels."""
    pinned, other = model_norms(model)
    devices = sorted({p.device.type for p in model.parameters()} - {"cpu"})
    if other and devices:
        raise ValueError(f"exact mode (--specdec-lossless exact) cannot pin the norm layers "
                         f"{', '.join(other[:4])}{' ...' if len(other) > 4 else ''} to a "
                         f"row-invariant computation (it pins per-row *RMSNorm and *LayerNorm "
                         f"modules taking one input), and on {', '.join(devices)} a "
                         f"reduction's result for a row depends on the forward's row count; "
                         f"run this target with --specdec-lossless auto")
    with _forwards_replaced(pinned, pinned_norm):
        yield


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
    """Run the model's attention through :func:`row_invariant_attention`, its linear
    layers through :func:`pinned_linear` and its norms through :func:`pinned_norm` inside
    the block, and restore its own after (the target is shared by cases)."""
    name = register()
    configs = _configs(model)
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        with pinned_linears(model), pinned_norms(model):
            yield
    finally:
        for c, impl in zip(configs, before):
            c._attn_implementation = impl
