"""The EAGLE-3 draft head: its configuration, module and KV cache.

Reference: SafeAILab/EAGLE (``eagle/model/cnets.py`` for inference,
``eagle/traineagle3/cnets.py`` for training); the same head as the vLLM ``speculators``
``Eagle3Speculator`` and SGLang SpecForge ``LlamaForCausalLMEagle3`` write it.

The head, per position i of the context (whose target state predicts token i + 1):

- ``fc`` fuses the target's low, middle and high hidden states at i (3 x target hidden
  -> hidden); while drafting, the head's own output at the parent takes its place;
- ONE decoder layer whose attention reads [input_layernorm(embed(token i + 1)) ;
  hidden_norm(state)] (2 x hidden wide) and adds its output to the state (the residual),
  then a normal MLP block;
- ``norm`` and ``lm_head`` over a reduced draft vocabulary: draft id j is target id
  ``j + d2t[j]``; ``t2d`` marks the target ids the draft vocabulary holds.

Token embeddings are the target's (lent read-only) unless the checkpoint carries its own.

Its checkpoint layouts are :mod:`.checkpoint`'s; its training,
:mod:`.training`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from pytest_specdec.engine.target import text_config


class CheckpointError(ValueError):
    """An EAGLE-3 checkpoint cannot be read, or does not fit the target; the message
    names the file, the value and what is accepted."""


def eagle_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's low, middle and high layers, (2, L // 2, L - 3) in output_hidden_states
    numbering (the state entering decoder layer i), clamped into [0, L] for tiny targets."""
    return tuple(min(max(i, 0), num_layers) for i in (2, num_layers // 2, num_layers - 3))


@dataclass
class Eagle3Config:
    """The head's shape. ``vocab_size`` is the target's; ``target_hidden_size`` is the
    width of each fused target state (None: ``hidden_size``); ``hidden_layers`` the target
    layers it reads (output_hidden_states numbering; None: :func:`eagle_layers`)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    draft_vocab_size: int
    head_dim: int | None = None
    target_hidden_size: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    norm_before_residual: bool = False
    own_embeddings: bool = False
    hidden_layers: tuple[int, ...] | None = None
    target: dict | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.target_hidden_size is None:
            self.target_hidden_size = self.hidden_size
        if self.hidden_layers is not None:
            self.hidden_layers = tuple(int(i) for i in self.hidden_layers)
        for name in ("hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "draft_vocab_size"):
            if int(getattr(self, name)) < 1:
                raise CheckpointError(f"{name} is {getattr(self, name)!r}; it must be >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(f"num_attention_heads {self.num_attention_heads} is not a "
                                  f"multiple of num_key_value_heads {self.num_key_value_heads}")
        if self.draft_vocab_size > self.vocab_size:
            raise CheckpointError(f"draft_vocab_size {self.draft_vocab_size} exceeds "
                                  f"vocab_size {self.vocab_size}")
        if self.hidden_act not in _ACTIVATIONS:
            raise CheckpointError(f"hidden_act {self.hidden_act!r} is not one of "
                                  f"{', '.join(_ACTIVATIONS)}")

    @classmethod
    def for_target(cls, target: Any, *, draft_vocab_size: int,
                   intermediate_size: int | None = None) -> "Eagle3Config":
        """A head shaped as one decoder layer of `target` (a pytest_specdec Target)."""
        config = target.model.config
        text = text_config(config)
        theta, scaling = _rope_of(text.to_dict())
        heads = int(text.num_attention_heads)
        return cls(hidden_size=int(text.hidden_size),
                   intermediate_size=int(intermediate_size or text.intermediate_size),
                   num_attention_heads=heads,
                   num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
                   head_dim=getattr(text, "head_dim", None) or int(text.hidden_size) // heads,
                   vocab_size=int(target.vocab_size), draft_vocab_size=int(draft_vocab_size),
                   rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)),
                   rope_theta=theta, rope_scaling=scaling,
                   hidden_act=str(getattr(text, "hidden_act", "silu")),
                   hidden_layers=eagle_layers(int(text.num_hidden_layers)))


def _rope_of(config: Mapping[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a config dict, old (rope_theta / rope_scaling) or
    transformers 5 (rope_parameters) style."""
    params = config.get("rope_parameters") or {}
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = config.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    return theta, (None if kind == "default" else dict(scaling))


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh":
                lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def _inverse_frequencies(config: Eagle3Config) -> torch.Tensor:
    """RoPE inverse frequencies: default, ``linear`` and ``llama3`` scaling (the
    published EAGLE-3 heads use these); another type is a clear error."""
    dim = int(config.head_dim)
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv / factor).float()
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = ((original / wavelen - low) / (high - low)) if high != low else torch.zeros_like(inv)
        scaled = torch.where(wavelen > original / low, inv / factor, inv)
        middle = (wavelen <= original / low) & (wavelen >= original / high)
        blended = (1 - smooth) * inv / factor + smooth * inv
        return torch.where(middle, blended, scaled).float()
    raise CheckpointError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Eagle3Attention(nn.Module):
    """Llama attention whose q/k/v read 2 x hidden inputs."""

    def __init__(self, c: Eagle3Config):
        super().__init__()
        d = int(c.head_dim)
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, d
        self.q_proj = nn.Linear(2 * c.hidden_size, self.heads * d, bias=c.attention_bias)
        self.k_proj = nn.Linear(2 * c.hidden_size, self.kv_heads * d, bias=c.attention_bias)
        self.v_proj = nn.Linear(2 * c.hidden_size, self.kv_heads * d, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.heads * d, c.hidden_size, bias=c.attention_bias)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, 2h] -> q [B, H, T, d], k and v [B, KVH, T, d], RoPE applied."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return _rope(q, cos, sin), _rope(k, cos, sin), v


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Eagle3MLP(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act = _ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Eagle3Layer(nn.Module):
    """The head's one decoder layer (keys ``midlayer.*``)."""

    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.norm_before_residual = c.norm_before_residual
        self.self_attn = Eagle3Attention(c)
        self.mlp = Eagle3MLP(c)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def attention_input(self, embeds: torch.Tensor, state: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """([input_layernorm(embeds) ; hidden_norm(state)], the residual)."""
        normed = self.hidden_norm(state)
        residual = normed if self.norm_before_residual else state
        return torch.cat((self.input_layernorm(embeds), normed), dim=-1), residual

    def finish(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attended [B, T, H * d] (heads merged) -> the layer's output."""
        x = residual + self.self_attn.o_proj(attended)
        return x + self.mlp(self.post_attention_layernorm(x))


class HeadCache:
    """The head's keys and values over positions [0, length), plus room to grow; rolling
    back is a length change (:meth:`crop`)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v [1, KVH, n, d] at the end; returns all keys and values so far."""
        n = k.shape[-2]
        if self.keys is None or self.length + n > self.keys.shape[-2]:
            size = max(64, 2 * (self.length + n))
            keys = k.new_empty(*k.shape[:-2], size, k.shape[-1])
            values = v.new_empty(*v.shape[:-2], size, v.shape[-1])
            if self.keys is not None and self.length:
                keys[..., :self.length, :] = self.keys[..., :self.length, :]
                values[..., :self.length, :] = self.values[..., :self.length, :]
            self.keys, self.values = keys, values
        self.keys[..., self.length:self.length + n, :] = k
        self.values[..., self.length:self.length + n, :] = v
        self.length += n
        return self.keys[..., :self.length, :], self.values[..., :self.length, :]

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a head cache of {self.length} positions to {length}")
        self.length = length


class Eagle3Head(nn.Module):
    """The EAGLE-3 draft head (see the module docstring). ``embeddings``: the target's
    input embedding weight [vocab, hidden], used read-only unless the config says the
    head has its own (``own_embeddings``)."""

    def __init__(self, config: Eagle3Config, embeddings: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size) if c.own_embeddings else None
        if self.embed_tokens is not None:
            self.embed_tokens.weight.requires_grad_(False)
        self.lent_embeddings = embeddings
        self.fc = nn.Linear(3 * int(c.target_hidden_size), c.hidden_size, bias=False)
        self.midlayer = Eagle3Layer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(c.vocab_size, dtype=torch.bool)
                             if c.draft_vocab_size == c.vocab_size
                             else torch.zeros(c.vocab_size, dtype=torch.bool))
        # a plain attribute, not a buffer: kept in float32 whatever dtype the head takes
        self.inv_freq = _inverse_frequencies(c)

    # -- vocabulary -------------------------------------------------------------------
    def set_vocabulary(self, target_ids: Iterable[int]) -> None:
        """Make the draft vocabulary these target ids (sorted, as the reference does)."""
        ids = sorted(set(int(i) for i in target_ids))
        if len(ids) != self.config.draft_vocab_size:
            raise ValueError(f"{len(ids)} distinct ids for a draft vocabulary of "
                             f"{self.config.draft_vocab_size}")
        if ids and not 0 <= ids[0] <= ids[-1] < self.config.vocab_size:
            raise ValueError(f"target ids must be in [0, {self.config.vocab_size})")
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.d2t.device)
        self.d2t.copy_(ids_t - torch.arange(len(ids), device=self.d2t.device))
        self.t2d.zero_()
        self.t2d[ids_t] = True

    def target_ids(self) -> torch.Tensor:
        """[draft_vocab] the target id of each draft id."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    # -- pieces -----------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.embed_tokens is not None else self.lent_embeddings
        if weight is None:
            raise RuntimeError("the head has no token embeddings: lend it the target's "
                               "(Eagle3Head(config, embeddings=...)) or load its own")
        rows = F.embedding(tokens.to(weight.device), weight)
        return rows.to(device=self.fc.weight.device, dtype=self.fc.weight.dtype)

    def fuse(self, target_states: torch.Tensor) -> torch.Tensor:
        """[..., 3 * target_hidden] -> [..., hidden]."""
        return self.fc(target_states.to(self.fc.weight.dtype))

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., T, d] for integer positions [..., T]."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.fc.weight.dtype
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of the layer's outputs."""
        return self.lm_head(self.norm(out))

    # -- inference --------------------------------------------------------------------
    def step(self, state: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
             cache: HeadCache, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Run n new positions after what `cache` holds: state [n, hidden] (fused target
        states, or the head's own outputs), tokens [n] (target ids), positions [n].
        `visible` [n, cache.length + n] bool says which keys each row sees (None: all the
        cache and the new rows causally). Appends their keys/values; returns outputs [n, hidden]."""
        layer = self.midlayer
        x, residual = layer.attention_input(self.embed(tokens)[None], state[None])
        cos, sin = self.rotary(positions)
        q, k, v = layer.self_attn.qkv(x, cos[None, None], sin[None, None])
        past = cache.length
        keys, values = cache.append(k, v)
        n = tokens.shape[0]
        if visible is None:
            visible = torch.ones(n, past + n, dtype=torch.bool, device=q.device)
            visible[:, past:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible.to(q.device),
                                                  enable_gqa=True)
        attended = attended.transpose(1, 2).reshape(1, n, -1)
        return layer.finish(attended, residual)[0]

    # -- training: the training-time test ---------------------------------------------
    def unrolled(self, target_states: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, steps: int,
                 active: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The reference's training-time test: draft-vocabulary logits for each of
        `steps` steps. Step j at position i reads token i + 1 + j and (j = 0) the fused
        target states at i, else its own step j - 1 output at i; it predicts token
        i + 2 + j, at RoPE position i + j, and attends to step 0's keys at positions <= i
        (the real context) and to steps 1..j at i itself (its draft ancestors), as a node
        at depth j + 1 of a draft tree does.

        `active` [B, A] (positions, each row's increasing) computes the steps only there:
        step 0's keys and values cover every position (the context), but its queries,
        MLP and logits, and every later step, only the active positions, which is all a
        loss needs when the prompt's positions carry none. The logits are [B, A, Vd]
        (A = T with `active` None: every position)."""
        b, t = input_ids.shape
        layer, attn = self.midlayer, self.midlayer.self_attn
        device = input_ids.device
        base = torch.arange(t, device=device)
        if active is None:
            active = base.expand(b, t)
        active = active.to(device)
        rows = torch.arange(b, device=device)[:, None]
        width = active.shape[1]
        heads, kv_heads, d = attn.heads, attn.kv_heads, attn.head_dim
        groups = heads // kv_heads
        scale = 1.0 / math.sqrt(d)

        def shifted(by: int, at: torch.Tensor) -> torch.Tensor:
            """Token at + by of each row (0 past the end)."""
            where = at + by
            return torch.where(where < t, input_ids[rows, where.clamp(max=t - 1)],
                               torch.zeros_like(where))

        # step 0 over every position: the context's keys and values
        state = self.fuse(target_states)
        x, residual = layer.attention_input(self.embed(shifted(1, base.expand(b, t))), state)
        cos, sin = self.rotary(base)
        k0 = _rope(attn.k_proj(x).view(b, t, kv_heads, d).transpose(1, 2), cos, sin)
        v0 = attn.v_proj(x).view(b, t, kv_heads, d).transpose(1, 2)
        k0 = k0.repeat_interleave(groups, dim=1)  # [B, H, T, d]
        v0 = v0.repeat_interleave(groups, dim=1)
        context = (base[None, None, :] <= active[:, :, None]) \
            & attention_mask.to(device).bool()[:, None, :]  # [B, A, T]
        context = context[:, None]  # [B, 1, A, T]
        x, residual = x[rows, active], residual[rows, active]
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        outputs = []
        for j in range(steps):
            if j:
                x, residual = layer.attention_input(self.embed(shifted(1 + j, active)), state)
            cos, sin = self.rotary(active + j)  # [B, A, d]
            cos, sin = cos[:, None], sin[:, None]
            q = _rope(attn.q_proj(x).view(b, width, heads, d).transpose(1, 2), cos, sin)
            if j:
                k = _rope(attn.k_proj(x).view(b, width, kv_heads, d).transpose(1, 2), cos, sin)
                v = attn.v_proj(x).view(b, width, kv_heads, d).transpose(1, 2)
                keys.append(k.repeat_interleave(groups, dim=1))
                values.append(v.repeat_interleave(groups, dim=1))
            scores = [(q @ k0.transpose(-1, -2) * scale).masked_fill(~context, float("-inf"))]
            scores += [((q * kk).sum(-1) * scale)[..., None] for kk in keys]
            weights = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)
            out = weights[..., :t] @ v0
            for i, vv in enumerate(values):
                out = out + weights[..., t + i, None] * vv
            out = out.transpose(1, 2).reshape(b, width, -1)
            state = layer.finish(out, residual)
            outputs.append(self.logits(state))
        return outputs
