"""The EAGLE-3 draft head: its configuration, module, KV cache, checkpoint formats and
training (the "training-time test").

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

Checkpoint layouts read (:func:`load_checkpoint`, detected from config.json and keys):

- ``safeailab``: the SafeAILab release: a Llama-style config.json with
  ``draft_vocab_size`` (architectures ``LlamaForCausalLMEagle3``), weights
  ``fc.weight``, ``midlayer.*``, ``norm.weight``, ``lm_head.weight``, ``d2t``, ``t2d``
  in pytorch_model.bin (read with ``torch.load(weights_only=True)``) or
  model.safetensors; the layers are EAGLE's fixed (2, L // 2, L - 3).
- ``specforge``: SGLang SpecForge, the same keys (usually with ``embed_tokens.weight``)
  in model.safetensors; config.json's ``eagle_config.eagle_aux_hidden_state_layer_ids``
  name decoder layers whose OUTPUT is read (SGLang adds 1 to each).
- ``speculators``: vLLM speculators: config.json with ``speculators_model_type``
  ``eagle3``, the layer's settings in ``transformer_layer_config``, ``draft_vocab_size``,
  ``norm_before_residual``, ``target_hidden_size`` and
  ``eagle_aux_hidden_state_layer_ids`` (vLLM reads the state ENTERING each named layer,
  i.e. output_hidden_states numbering as is); keys ``layers.0.*`` for ``midlayer.*``.

:func:`save_checkpoint` writes any of the three; this project's own weights are written
in the ``specforge`` layout (model.safetensors, no embeddings: they are the target's)
with two extra config keys, ``hidden_layers`` (output_hidden_states numbering, read
first) and ``target`` (the target they fit, see
:func:`pytest_specdec.models.training.target_signature`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

LAYOUTS = ("safeailab", "specforge", "speculators")
#: the reference's training-time test length (steps the head is unrolled on its own outputs)
TTT_STEPS = 7


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
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") \
            else config
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


# -- checkpoints ----------------------------------------------------------------------

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json: an EAGLE-3 checkpoint is a folder "
                              f"with config.json and one of {', '.join(_WEIGHT_FILES)}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds {type(config).__name__}, not a JSON object")
    return config


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a checkpoint folder and the file it came from: safetensors
    first (one file or an index of shards), else pytorch_model.bin read with
    ``torch.load(weights_only=True)`` (no pickled code runs)."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors")), "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            weights.update(load_file(str(folder / shard)))
        return weights, index.name
    if (folder / "pytorch_model.bin").is_file():
        try:
            weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{folder / 'pytorch_model.bin'} cannot be read with "
                                  f"torch.load(weights_only=True): {exc}") from exc
        if not isinstance(weights, dict):
            raise CheckpointError(f"{folder / 'pytorch_model.bin'} holds "
                                  f"{type(weights).__name__}, not a state dict")
        return weights, "pytorch_model.bin"
    raise CheckpointError(f"{folder} has none of {', '.join(_WEIGHT_FILES)}")


def detect_layout(config: Mapping[str, Any], keys: Iterable[str] = ()) -> str:
    """Which of :data:`LAYOUTS` a checkpoint is written in."""
    keys = set(keys)
    if "speculators_model_type" in config or "transformer_layer_config" in config \
            or any(k.startswith("layers.0.") for k in keys):
        return "speculators"
    if "eagle_config" in config:
        return "specforge"
    return "safeailab"


def config_from_dict(raw: Mapping[str, Any], layout: str, *, own_embeddings: bool,
                     source: str = "config.json") -> Eagle3Config:
    """An :class:`Eagle3Config` from a checkpoint's config.json in `layout`."""
    layer = raw.get("transformer_layer_config", raw) if layout == "speculators" else raw
    if not isinstance(layer, Mapping):
        raise CheckpointError(f"{source}: transformer_layer_config is not an object")
    missing = [k for k in ("hidden_size", "num_attention_heads", "vocab_size") if k not in layer]
    if missing:
        raise CheckpointError(f"{source} ({layout} layout) lacks {', '.join(missing)}")
    theta, scaling = _rope_of(layer)
    layers: tuple[int, ...] | None = None
    if raw.get("hidden_layers"):  # this project's own key: output_hidden_states numbering
        layers = tuple(int(i) for i in raw["hidden_layers"])
    elif raw.get("eagle_aux_hidden_state_layer_ids"):  # vLLM: the state entering layer i
        layers = tuple(int(i) for i in raw["eagle_aux_hidden_state_layer_ids"])
    elif isinstance(raw.get("eagle_config"), Mapping) and \
            raw["eagle_config"].get("eagle_aux_hidden_state_layer_ids"):
        # SGLang: the output of decoder layer i, i.e. output_hidden_states index i + 1
        layers = tuple(int(i) + 1 for i in raw["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
    heads = int(layer["num_attention_heads"])
    vocab = int(layer["vocab_size"])
    return Eagle3Config(
        hidden_size=int(layer["hidden_size"]),
        intermediate_size=int(layer.get("intermediate_size") or 4 * int(layer["hidden_size"])),
        num_attention_heads=heads,
        num_key_value_heads=int(layer.get("num_key_value_heads") or heads),
        head_dim=layer.get("head_dim"),
        vocab_size=vocab,
        draft_vocab_size=int(raw.get("draft_vocab_size") or layer.get("draft_vocab_size") or vocab),
        target_hidden_size=raw.get("target_hidden_size") or layer.get("target_hidden_size"),
        rms_norm_eps=float(layer.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling,
        hidden_act=str(layer.get("hidden_act", "silu")),
        attention_bias=bool(layer.get("attention_bias", False)),
        norm_before_residual=bool(raw.get("norm_before_residual", False)),
        own_embeddings=own_embeddings, hidden_layers=layers,
        target=raw.get("target") if isinstance(raw.get("target"), dict) else None)


def _canonical_keys(weights: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in weights.items():
        if key.startswith("verifier."):
            continue  # speculators may keep a reference to its verifier
        name = key[len("model."):] if key.startswith("model.") else key
        if layout == "speculators" and name.startswith("layers.0."):
            name = "midlayer." + name[len("layers.0."):]
        out[name] = value
    return out


def load_checkpoint(folder: str | Path, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32,
                    embeddings: torch.Tensor | None = None) -> tuple[Eagle3Head, str]:
    """Load an EAGLE-3 head from a checkpoint folder in any of :data:`LAYOUTS`; returns
    (head, layout). Missing or unexpected keys and mismatched shapes are errors naming
    them. `embeddings` (the target's) serve a checkpoint without its own."""
    folder = Path(folder)
    config_raw = _read_config(folder)
    raw_weights, filename = read_weights(folder)
    layout = detect_layout(config_raw, raw_weights)
    weights = _canonical_keys(raw_weights, layout)
    own = "embed_tokens.weight" in weights
    config = config_from_dict(config_raw, layout, own_embeddings=own,
                              source=str(folder / "config.json"))
    if config.vocab_size == config.draft_vocab_size:
        # the reference drops the mapping when the vocabularies are equal
        weights.setdefault("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        weights.setdefault("t2d", torch.ones(config.vocab_size, dtype=torch.bool))
    with torch.device("meta"):
        shell = Eagle3Head(config)
    expected = shell.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    where = f"{folder / filename} ({layout} layout)"
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}")
    if unexpected:
        raise CheckpointError(f"{where} has keys an EAGLE-3 head does not: "
                              f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    for key, tensor in expected.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: {key} has shape {tuple(weights[key].shape)}, "
                                  f"config.json implies {tuple(tensor.shape)}")
    head = Eagle3Head(config, embeddings=embeddings)
    state = {k: (v.to(torch.long) if k == "d2t" else v.to(torch.bool) if k == "t2d" else v)
             for k, v in weights.items()}
    head.load_state_dict(state)
    head.to(device=device, dtype=dtype)
    head.d2t.data = head.d2t.to(torch.long)  # .to(dtype) leaves integer buffers alone
    head.eval().requires_grad_(False)
    return head, layout


def check_fits(head: Eagle3Head, info: Any, where: str) -> None:
    """Raise CheckpointError unless the head fits the target `info` (a TargetInfo):
    the same vocabulary and hidden size, layers inside the target, embeddings available."""
    c = head.config
    if c.vocab_size != info.vocab_size:
        raise CheckpointError(f"{where}: vocab_size {c.vocab_size} does not fit target "
                              f"{info.name!r}, whose vocabulary has {info.vocab_size} ids")
    if c.target_hidden_size != info.hidden_size:
        raise CheckpointError(f"{where}: it fuses states {c.target_hidden_size} wide; target "
                              f"{info.name!r} has hidden_size {info.hidden_size}")
    if not c.own_embeddings and c.hidden_size != info.hidden_size:
        raise CheckpointError(f"{where}: no embed_tokens.weight of its own, and its hidden_size "
                              f"{c.hidden_size} differs from the target's {info.hidden_size}")
    for layer in c.hidden_layers or ():
        if not 0 <= layer <= info.num_layers:
            raise CheckpointError(f"{where}: layer {layer} is not in [0, {info.num_layers}] "
                                  f"(target {info.name!r} has {info.num_layers} layers)")
    if c.target and c.target.get("name") not in (None, info.name) and \
            c.target.get("num_layers") != info.num_layers:
        raise CheckpointError(f"{where}: written for target {c.target!r}, not {info.name!r} "
                              f"with {info.num_layers} layers")


def save_checkpoint(head: Eagle3Head, folder: str | Path, *, layout: str = "specforge",
                    target: Mapping[str, Any] | None = None, bin_file: bool = False) -> Path:
    """Write `head` to `folder` in `layout` (one of :data:`LAYOUTS`): config.json and
    model.safetensors (pytorch_model.bin with `bin_file`). `target` (a
    :func:`~pytest_specdec.models.training.target_signature`) is written as config.json's
    ``"target"``. Embeddings are written only when the head has its own."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = head.config
    layer_config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "num_hidden_layers": 1, "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "hidden_act": c.hidden_act,
        "attention_bias": c.attention_bias, "tie_word_embeddings": False,
        "torch_dtype": str(head.fc.weight.dtype).removeprefix("torch."),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    layers = list(c.hidden_layers) if c.hidden_layers is not None else None
    if layout == "speculators":
        config: dict[str, Any] = {
            "speculators_model_type": "eagle3", "architectures": ["Eagle3Speculator"],
            "transformer_layer_config": {k: v for k, v in layer_config.items()
                                         if k != "architectures"},
            "draft_vocab_size": c.draft_vocab_size,
            "norm_before_residual": c.norm_before_residual,
            "target_hidden_size": c.target_hidden_size,
            "eagle_aux_hidden_state_layer_ids": layers,
            "speculators_config": {"algorithm": "eagle3",
                                   "verifier": {"name_or_path": (target or {}).get("name")}},
        }
        state = {("layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k): v
                 for k, v in state.items()}
    else:
        config = dict(layer_config, draft_vocab_size=c.draft_vocab_size)
        if c.target_hidden_size != c.hidden_size:
            config["target_hidden_size"] = c.target_hidden_size
        if layout == "specforge" and layers is not None:
            config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in layers],
                                      "use_aux_hidden_state": True}
    if layout != "safeailab" and layers is not None:
        config["hidden_layers"] = layers
    if target is not None:
        config["target"] = dict(target)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if bin_file:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"))
    return folder


# -- training -------------------------------------------------------------------------

def draft_vocabulary(data: Any, vocab_size: int, size: int) -> list[int]:
    """The reference's draft vocabulary: the `size` target ids most frequent among the
    training data's generated tokens (then its prompt tokens, then the lowest ids, when
    the data hold fewer), sorted."""
    size = min(int(size), vocab_size)
    generated: Counter[int] = Counter()
    prompts: Counter[int] = Counter()
    for seq, n in zip(data.sequences, data.prompt_lengths):
        generated.update(seq[n:])
        prompts.update(seq[:n])
    chosen: list[int] = []
    seen: set[int] = set()
    for counter in (generated, prompts):
        for token, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(chosen) >= size:
                break
            if 0 <= token < vocab_size and token not in seen:
                chosen.append(token)
                seen.add(token)
    token = 0
    while len(chosen) < size:
        if token not in seen:
            chosen.append(token)
            seen.add(token)
        token += 1
    return sorted(chosen)


def active_positions(loss_mask: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions a training-time test of `steps` steps needs per row, from
    `steps` before its first loss position to the one before its last (step j at i
    reads the loss at i + 1 + j), as consecutive runs left-aligned in [B, A] (A: the
    longest run), and [B, A] bool: inside the row's run (the rest repeat its last
    position and carry no loss)."""
    b, t = loss_mask.shape
    device = loss_mask.device
    position = torch.arange(t, device=device).expand(b, t)
    has = loss_mask.any(-1)
    first = torch.where(loss_mask, position, t).min(-1).values
    last = torch.where(loss_mask, position, -1).max(-1).values
    start = (first - steps).clamp(min=0)
    end = torch.where(has, last, start + 1)  # exclusive: the last loss needs i <= last - 1
    width = max(int((end - start).max()), 1)
    slots = start[:, None] + torch.arange(width, device=device)[None]
    live = slots < end[:, None]
    return torch.minimum(slots, (end[:, None] - 1).clamp(min=0)), live


@dataclass
class Eagle3Trainable:
    """EAGLE-3's side of :class:`pytest_specdec.models.training.Trainable`."""

    head: Eagle3Head
    output_head: torch.Tensor  # the target's lm_head weight rows of the draft vocabulary
    signature: dict
    steps: int = TTT_STEPS
    step_weight: float = 0.8
    #: the target's whole lm_head weight, to find its argmax (None: the vocabularies agree)
    full_output_head: torch.Tensor | None = None
    kind: str = "eagle3"

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return tuple(self.head.config.hidden_layers or ())

    @property
    def module(self) -> nn.Module:
        return self.head

    @property
    def weights_module(self) -> nn.Module:
        """What the drafter loads (the head): training.json's weights digest is its."""
        return self.head

    def step_losses(self, batch: Any) -> list[torch.Tensor]:
        """Per training-time-test step: soft cross-entropy of the head's draft-vocabulary
        distribution against the target's, restricted to the draft vocabulary and
        renormalised, at positions whose next-next token the target generated and whose
        target choice the draft vocabulary holds (the reference's position mask).

        Only the positions a loss can reach are unrolled (:func:`active_positions`:
        from `steps` before each row's first generated token to its end); the prompt's
        positions before them give step 0's keys and values only."""
        head = self.head
        device = head.fc.weight.device
        ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device)
        loss_mask = batch.loss_mask.to(device)
        b, t = ids.shape
        active, live = active_positions(loss_mask, self.steps)
        width = active.shape[1]
        rows = torch.arange(b, device=device)[:, None]
        # the target's side at the window of positions the steps' predictions land on
        window = active[:, :1] + torch.arange(width + self.steps, device=device)[None]
        inside = window < t
        window = window.clamp(max=t - 1)
        with torch.no_grad():
            final = batch.final_hidden.to(device)[rows, window].float()
            target_p = torch.softmax(final @ self.output_head.to(device).float().T, dim=-1)
            choice = getattr(batch, "target_choice", None)
            in_vocab = self._target_choice_in_vocab(
                final, None if choice is None else choice.to(device)[rows, window])
            usable = loss_mask[rows, window] & in_vocab & inside
        outputs = head.unrolled(batch.hidden.to(device), ids, mask, self.steps, active=active)
        losses = []
        for j, logits in enumerate(outputs):
            # step j at i predicts the target's distribution at i + 1 + j; window slot
            # q + 1 + j is position active[q] + 1 + j (active is consecutive per row)
            at = slice(1 + j, 1 + j + width)
            valid = live & usable[:, at]
            logp = torch.log_softmax(logits.float(), dim=-1)
            per_position = -(target_p[:, at] * logp).sum(-1)
            count = valid.sum().clamp(min=1)
            losses.append((per_position * valid).sum() / count)
        return losses

    def _target_choice_in_vocab(self, final: torch.Tensor,
                                choice: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] bool: the target's own argmax (`choice`, -1 where unknown; None: from
        `final` and the target's whole output head) lies in the draft vocabulary."""
        full = self.full_output_head
        if self.head.config.draft_vocab_size == self.head.config.vocab_size or \
                (choice is None and full is None):
            return torch.ones(final.shape[:2], dtype=torch.bool, device=final.device)
        if choice is None:
            choice = (final.float() @ full.to(final.device).float().T).argmax(-1)
        known = choice >= 0
        return self.head.t2d.to(choice.device)[choice.clamp(min=0)] & known

    def loss(self, batch: Any) -> torch.Tensor:
        losses = self.step_losses(batch)
        weights = [self.step_weight ** j for j in range(len(losses))]
        return sum(w * l for w, l in zip(weights, losses)) / sum(weights)

    def save(self, folder: Path) -> None:
        save_checkpoint(self.head, folder, layout="specforge", target=self.signature)


def trainable(target: Any, data: Any, *, draft_vocab_size: int = 4096, steps: int = TTT_STEPS,
              intermediate_size: int | None = None, seed: int = 0,
              step_weight: float = 0.8, **options: Any) -> Eagle3Trainable:
    """A fresh EAGLE-3 head for `target` (a pytest_specdec Target), to be trained on
    `data` (a DistillData) by the training-time test with `steps` unrolled steps (the
    reference: 7). The draft vocabulary is the `draft_vocab_size` target ids most frequent
    in the data (the reference: 32000 of Llama 3's 128256; the default here is sized for a
    CPU). The layer is shaped as one of the target's decoder layers (``intermediate_size``
    overrides its MLP width); ``norm`` and ``lm_head`` start from the target's final norm
    and output head (its draft-vocabulary rows), the rest from a seeded random init."""
    from pytest_specdec.models.training import TrainingError, target_signature

    if options:
        raise TrainingError(f"unknown eagle3 training option(s) {', '.join(sorted(options))}; "
                            "known: draft_vocab_size, steps, intermediate_size, seed, step_weight")
    if steps < 1:
        raise TrainingError(f"steps {steps} must be >= 1")
    if not 1 <= draft_vocab_size:
        raise TrainingError(f"draft_vocab_size {draft_vocab_size} must be >= 1")
    model = target.model
    size = min(int(draft_vocab_size), int(target.vocab_size))
    config = Eagle3Config.for_target(target, draft_vocab_size=size,
                                     intermediate_size=intermediate_size)
    embeddings = model.get_input_embeddings().weight.detach().float().cpu()
    output = model.get_output_embeddings().weight.detach().float().cpu()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        head = Eagle3Head(config, embeddings=embeddings)
    finally:
        torch.random.set_rng_state(generator_state)
    head.set_vocabulary(draft_vocabulary(data, config.vocab_size, size))
    ids = head.target_ids()
    with torch.no_grad():
        head.lm_head.weight.copy_(output[ids])
        final_norm = getattr(getattr(model, "model", model), "norm", None)
        if final_norm is not None and getattr(final_norm, "weight", None) is not None \
                and final_norm.weight.shape == head.norm.weight.shape:
            head.norm.weight.copy_(final_norm.weight.detach().float().cpu())
    head.train()
    return Eagle3Trainable(head=head, output_head=output[ids].clone(),
                           signature=target_signature(target), steps=int(steps),
                           step_weight=float(step_weight),
                           full_output_head=output if size < config.vocab_size else None)


def config_dict(config: Eagle3Config) -> dict:
    """The config as a plain dict (for reports)."""
    return asdict(config)
