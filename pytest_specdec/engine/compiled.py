"""The compiled decode path (``--specdec-engine compiled``): a static KV cache with
explicit positions and target forwards compiled with ``torch.compile`` for a small set
of fixed shapes, CUDA graphs on CUDA.

Why: Hugging Face's eager forward over a ``DynamicCache`` is far from the machine's
limit (launch-bound on a GPU, the cache grown by ``torch.cat``, an explicit mask sending
SDPA through ``repeat_kv``), so speedups measured on it do not transfer to the engines
people deploy. On this path the baseline and every drafter of a case run the same
compiled forwards:

- :class:`StaticKV` preallocates every layer's keys and values for ``capacity``
  positions. ``length`` (a host integer) is how many slots hold the sequence; a forward
  writes its ``w`` fed tokens at slots ``length .. length + w - 1``. Rolling back a
  chain is a length change (:meth:`StaticKV.crop`); a tree keeps its accepted path by
  one device-side index copy per layer (:meth:`StaticKV.keep_path`).
- A forward of ``n`` fed tokens runs the compiled graph of the smallest width bucket
  ``w >= n`` (:data:`WIDTH_BUCKETS`), padded with pad slots that attend to themselves
  only and whose writes land past ``length + n`` (never attended to: the next forward
  overwrites them). A forward wider than the widest bucket (a long prompt) runs the same
  model eagerly on the same cache.
- The attention mask is built on the device from the cache length and the fed rows'
  ancestor matrix ``[w, w]`` (causal for a chain, tree ancestors for a tree); grouped
  query heads are folded into the query rows (:func:`packed_gqa_attention`), so no
  forward copies the cache across the heads of a group.

Every graph is compiled by :meth:`CompiledForward.warm_up` before any timed span
(inductor caches the compiled code across sessions); a width or capacity met for the
first time inside a decode is compiled there and counted (:attr:`CompiledForward.late_compiles`).
What this path cannot serve (sliding-window or other non-full attention layers, batches
of several sequences, exact mode) runs eagerly, and :func:`compiled_refusal` says why so
that the report names it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from pytest_specdec.engine import transfer

log = logging.getLogger("pytest_specdec")

#: The decode paths (``--specdec-engine``, with "auto" and BOTH).
ENGINES = ("eager", "compiled")
#: ``--specdec-engine both``: every case on each path, side by side in one session.
BOTH = "both"
#: Fed-token widths the forward is compiled for (a forward is padded to the next one).
WIDTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: Cache capacities are rounded up to a multiple of this (a new capacity recompiles).
CAPACITY_STEP = 256
#: The name the folded-GQA attention is registered under in transformers.
PACKED_ATTENTION = "specdec_packed_gqa"
#: Attention layer types the compiled path serves.
SERVED_LAYER_TYPES = frozenset({"full_attention"})
#: Kwarg carrying the slots a forward writes to, from the model's call to the cache.
WRITE_AT = "specdec_write_at"


#: torch.compile's backend: inductor (generated kernels; CUDA graphs on CUDA). The
#: environment's SPECDEC_COMPILE_BACKEND may name another (``aot_eager``: the same
#: graphs and static cache without generated kernels, compiled in seconds; the tests use it)
BACKEND = os.environ.get("SPECDEC_COMPILE_BACKEND", "inductor")
#: ``--specdec-engine auto`` on a CPU: the path that measured faster there (docs/engine.md)
CPU_DEFAULT = "eager"


def resolve_engine(spec: str, device: torch.device) -> str:
    """``--specdec-engine``: 'auto' is compiled on CUDA and :data:`CPU_DEFAULT` elsewhere."""
    if spec == "auto":
        return "compiled" if device.type == "cuda" else CPU_DEFAULT
    if spec not in ENGINES:
        raise ValueError(f"engine {spec!r} is not one of auto, {', '.join(ENGINES)}")
    return spec


def bucket(n: int) -> int | None:
    """The smallest width bucket holding `n` fed tokens; None past the widest."""
    return next((w for w in WIDTH_BUCKETS if w >= n), None)


def packed_gqa_attention(module: Any, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None,
                         dropout: float = 0.0, scaling: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA with the query heads of each key/value group folded into the query rows.

    query [b, heads, q, d]; key, value [b, kv_heads, keys, d]; attention_mask additive
    [b, 1, q, keys]. Head h reads key/value head h // groups (transformers' layout), so
    query rows ``(j, i)`` of kv head g are head ``g * groups + j``'s row i, and the mask
    row of each is row i. Nothing the size of the cache is copied."""
    b, heads, q, d = query.shape
    groups = heads // key.shape[1]
    folded = query.reshape(b, key.shape[1], groups * q, d)
    mask = attention_mask
    if mask is not None and groups > 1:
        mask = mask[:, :, None].expand(-1, -1, groups, -1, -1).reshape(b, 1, groups * q, -1)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling,
                                         dropout_p=0.0)
    # [b, kv_heads, groups * q, d] -> [b, q, heads, d] (what transformers' attention returns)
    return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :func:`packed_gqa_attention` with transformers (idempotent); its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_gqa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION


@contextlib.contextmanager
def packed_attention(model: Any) -> Iterator[None]:
    """Run the model's attention through :func:`packed_gqa_attention` inside the block
    (the eager path and other cases share the model, so it is restored after)."""
    name = register()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


class StaticKV:
    """Every layer's keys and values for `capacity` positions, and how many slots hold
    the sequence (``length``, a host integer: reading it never waits for the device).

    The model's attention calls :meth:`update` with the fed tokens' keys and values;
    they are written at the slots the forward named (``WRITE_AT``), and the whole
    buffers are returned (the mask hides every slot past the sequence)."""

    def __init__(self, owner: str = "sequence"):
        self.owner = owner
        self.capacity = 0
        self.length = 0
        self.keys: list[torch.Tensor] = []  # per layer: [1, kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor] = []

    def reset(self) -> None:
        """A new sequence: nothing held (the buffers and their addresses are kept)."""
        self.length = 0

    def grow(self, capacity: int, layers: int, kv_heads: int, head_dim: int,
             dtype: torch.dtype, device: torch.device) -> None:
        """Room for `capacity` positions; the slots held are kept."""
        shape = (1, kv_heads, capacity, head_dim)
        for states in (self.keys, self.values):
            old = list(states)
            states[:] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
            for new, was in zip(states, old):
                new[:, :, :self.length] = was[:, :, :self.length]
            for t in states:
                torch._dynamo.mark_static_address(t)
        self.capacity = capacity

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               kwargs: dict[str, Any] | None = None, **extra: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value [1, kv_heads, w, head_dim] at slots ``kwargs[WRITE_AT]`` [w]."""
        where = (kwargs or extra)[WRITE_AT]
        self.keys[layer_idx].index_copy_(2, where, key)
        self.values[layer_idx].index_copy_(2, where, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, length: int) -> None:
        """Keep `length` positions, or drop ``-length`` when negative (a rollback): a
        length change only, the slots past it are overwritten by the next forward."""
        kept = length if length >= 0 else self.length + length
        if not 0 <= kept <= self.length:
            raise ValueError(f"cannot crop to {length}: the cache holds {self.length} positions")
        self.length = kept

    def keep_path(self, base: int, path: list[int], fed: int, *,
                  index: torch.Tensor | None = None) -> None:
        """The cache holds `base` context slots then `fed` tree nodes: move the nodes of
        `path` (increasing) to base, base + 1, ... and drop the rest (one index copy per
        layer from one index tensor: no host work per layer or node). `index`
        [len(path)]: the path as an int64 tensor on the device (None: copied from it)."""
        if self.length != base + fed:
            raise RuntimeError(f"the static cache holds {self.length} positions; expected "
                               f"{base} context positions then {fed} tree nodes")
        if path != list(range(len(path))):
            device = self.keys[0].device
            source = base + transfer.to_device(path if index is None else index, device)
            target = torch.arange(base, base + len(path), device=device)
            for states in (*self.keys, *self.values):
                states.index_copy_(2, target, states.index_select(2, source))
        self.length = base + len(path)


def padded_ancestors(anc: torch.Tensor, width: int) -> torch.Tensor:
    """anc [n, n] bool (fed rows' view of each other) padded to [width, width] with pad
    rows that attend to themselves only."""
    n = anc.shape[0]
    out = torch.eye(width, dtype=torch.bool)
    out[:n, :n] = anc.cpu()
    return out


def _mask(length: torch.Tensor, anc: torch.Tensor, capacity: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [1, 1, w, capacity] of a forward writing w slots after
    `length` (0-d) slots: every row sees the held slots, and among the new ones its
    ancestors (anc [w, w] bool). Built on the device inside the compiled graph."""
    w = anc.shape[0]
    slots = torch.arange(capacity, device=anc.device)
    rel = slots - length
    new = (rel >= 0) & (rel < w)
    seen = anc.gather(1, rel.clamp(0, w - 1)[None, :].expand(w, capacity))
    allowed = (rel < 0)[None, :] | (new[None, :] & seen)
    mask = torch.zeros(w, capacity, dtype=dtype, device=anc.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


@dataclass
class CompiledForward:
    """A target's compiled forwards and its static caches, one per owner ("sequence":
    the sequence being decoded; "probe": the timing probe's fixed context), each reused
    from one sequence to the next: CUDA graphs are bound to the buffers' addresses, so
    graphs are compiled per owner, width bucket and capacity."""

    model: Any
    device: torch.device
    dtype: torch.dtype
    #: the decoder's config (the target's ``text_config``): its layers' and heads' sizes
    config: Any
    caches: dict[str, StaticKV] = field(default_factory=dict)
    #: (owner, width bucket, capacity, hidden-state layers) -> its compiled forward
    graphs: dict[tuple[str, int, int, tuple[int, ...]], Callable] = field(default_factory=dict)
    #: graphs compiled inside a decode, not by warm_up (a width or capacity not warmed)
    late_compiles: int = 0
    #: seconds warm_up spent compiling (or loading from inductor's cache)
    compile_s: float = 0.0
    warming: bool = False
    _staging: torch.Tensor | None = field(default=None, repr=False)

    def new_cache(self, capacity: int, owner: str = "sequence") -> StaticKV:
        """`owner`'s static cache, reset, with room for at least `capacity` positions
        (grown only when a sequence needs more than it ever had)."""
        cache = self.caches.get(owner)
        if cache is None:
            cache = self.caches[owner] = StaticKV(owner)
        self._fit(cache, capacity)
        cache.reset()
        return cache

    def _fit(self, cache: StaticKV, capacity: int) -> None:
        need = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
        if cache.capacity >= need:
            return
        if cache.capacity:
            log.warning("pytest-specdec: the compiled path's %s cache grows from %d to %d "
                        "positions; its graphs are compiled again", cache.owner,
                        cache.capacity, need)
        text = self.config
        heads = int(text.num_attention_heads)
        cache.grow(need, int(text.num_hidden_layers),
                   int(getattr(text, "num_key_value_heads", None) or heads),
                   int(getattr(text, "head_dim", None) or text.hidden_size // heads),
                   self.dtype, self.device)
        for key in [k for k in self.graphs if k[0] == cache.owner]:
            del self.graphs[key]

    def _graph(self, cache: StaticKV, width: int, hidden: tuple[int, ...]) -> Callable:
        key = (cache.owner, width, cache.capacity, hidden)
        graph = self.graphs.get(key)
        if graph is None:
            if not self.warming:
                self.late_compiles += 1
            name = "_".join(map(str, key[:3])) + "".join(f"_h{i}" for i in hidden)
            graph = self.graphs[key] = self._compile(cache, hidden, name)
        return graph

    def _forward(self, cache: StaticKV, hidden: tuple[int, ...]) -> Callable:
        """The forward a graph compiles (and a forward wider than every graph runs as it
        is): the model over `cache`, returning logits [w, vocab] and the `hidden` layers'
        states [w, hidden] each."""
        model, capacity, dtype = self.model, cache.capacity, self.dtype

        def forward(ids: torch.Tensor, positions: torch.Tensor, length: torch.Tensor,
                    anc: torch.Tensor, write_at: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # ids, positions [1, w]; length 0-d; anc [w, w] bool; write_at [w]
            out = model(input_ids=ids, position_ids=positions,
                        attention_mask=_mask(length, anc, capacity, dtype), cache=cache,
                        use_cache=True, output_hidden_states=bool(hidden),
                        **{WRITE_AT: write_at})
            # only the layers asked for leave the graph: the others' buffers are reused
            return (out.logits[0], *(out.hidden_states[i][0] for i in hidden))

        return forward

    def _compile(self, cache: StaticKV, hidden: tuple[int, ...], name: str) -> Callable:
        forward = self._forward(cache, hidden)
        # dynamo keeps compiled graphs per code object (8 at most, each call checking the
        # guards of all): each graph gets a code object of its own, so a call checks one
        code = forward.__code__.replace(co_name=f"specdec_forward_{name}")
        own = types.FunctionType(code, forward.__globals__, code.co_name, None,
                                 forward.__closure__)
        if BACKEND != "inductor":
            return torch.compile(own, dynamic=False, backend=BACKEND)
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        return torch.compile(own, dynamic=False, mode=mode)

    def run(self, cache: StaticKV, token_ids: Sequence[int] | torch.Tensor,
            positions: Sequence[int] | torch.Tensor | None, anc: torch.Tensor | None,
            hidden: tuple[int, ...] = ()) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Feed `token_ids` after the cache's ``length`` slots; anc [n, n] bool (None: a
        chain, causal). Ids and positions are lists, or [n] int64 tensors already on the
        device (a tree's, packed by the caller), with anc then on the device too. Returns
        logits [n, vocab] and the hidden states [n, hidden] of the layers `hidden` names
        (output_hidden_states numbering: 0 the embeddings, i decoder layer i, num_layers
        after the final norm), copied out of the graph's buffers."""
        n, base = len(token_ids), cache.length
        width = bucket(n)
        self._fit(cache, base + (width or n))
        width = width or n  # wider than every graph (a long prompt): the model, eagerly
        if isinstance(token_ids, torch.Tensor):
            args = self._device_inputs(token_ids, positions, base, anc, width)
        else:
            at = list(positions) if positions is not None else list(range(base, base + n))
            grid = anc.cpu() if anc is not None else torch.ones(n, n, dtype=torch.bool).tril()
            args = self._inputs(token_ids, at, base, padded_ancestors(grid, width))
        with packed_attention(self.model):
            if bucket(n) is None:
                outs = self._forward(cache, hidden)(*args)
            else:
                outs = self._graph(cache, width, hidden)(*args)
        cache.length = base + n
        logits = outs[0][:n].clone()
        return logits, tuple(h[:n].clone() for h in outs[1:])

    def _device_inputs(self, token_ids: torch.Tensor, positions: torch.Tensor | None,
                       base: int, anc: torch.Tensor | None,
                       width: int) -> tuple[torch.Tensor, ...]:
        """:meth:`_inputs` from inputs already on the device (token_ids, positions [n];
        anc [n, n] bool): padded there, nothing copied from the host."""
        n, device = len(token_ids), self.device
        length = torch.full((), base, dtype=torch.long, device=device)
        slots = torch.arange(width, device=device)
        ids = torch.zeros(width, dtype=torch.long, device=device)
        ids[:n] = token_ids
        at = torch.empty(width, dtype=torch.long, device=device)
        at[:n] = positions if positions is not None else length + slots[:n]
        at[n:] = at[n - 1]
        grid = torch.eye(width, dtype=torch.bool, device=device)
        grid[:n, :n] = anc if anc is not None else \
            torch.ones(n, n, dtype=torch.bool, device=device).tril()
        return ids[None], at[None], length, grid, length + slots

    def _inputs(self, token_ids: Sequence[int], at: list[int], base: int,
                anc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A forward's inputs on the device, from ONE host-to-device copy: ids and
        positions [1, w], the cache length (0-d), anc [w, w] bool, the write slots [w].
        On CUDA the copy leaves a pinned staging buffer without waiting for the device
        (a copy from pageable memory would wait for the stream first)."""
        width, pad = anc.shape[0], anc.shape[0] - len(token_ids)
        packed = torch.tensor([*token_ids, *([0] * pad), *at, *([at[-1]] * pad), base],
                              dtype=torch.long)
        packed = torch.cat([packed, anc.reshape(-1).long()])
        transfer.count.to_device += 1  # the one copy (none on a CPU, counted all the same)
        if self.device.type == "cuda":
            packed = self._staged(packed).to(self.device, non_blocking=True)
        ids, positions = packed[:width][None], packed[width:2 * width][None]
        length = packed[2 * width]
        return (ids, positions, length, packed[2 * width + 1:].reshape(width, width).bool(),
                length + torch.arange(width, device=self.device))

    def _staged(self, packed: torch.Tensor) -> torch.Tensor:
        """`packed` copied into the pinned staging buffer (grown when too small). The
        previous step's copy is done by now: every step reads its choices on the host."""
        if self._staging is None or self._staging.numel() < packed.numel():
            self._staging = torch.empty(max(packed.numel(), 1 << 15), dtype=torch.long,
                                        pin_memory=True)
        staged = self._staging[:packed.numel()]
        staged.copy_(packed)
        return staged

    def warm_up(self, capacity: int | None = None, widths: Sequence[int] = WIDTH_BUCKETS,
                hidden: Sequence[tuple[int, ...]] = ((),), owner: str = "sequence") -> float:
        """Compile (or load from inductor's cache) `owner`'s graphs of `widths`' buckets
        at `capacity` (None: its cache's present one), those not compiled yet, before any
        timed span; returns the seconds it took."""
        import time

        started = time.perf_counter()
        self.warming = True
        try:
            held = self.caches.get(owner)
            if capacity is None and held is None:
                return 0.0  # nothing to size the graphs by: the first sequence compiles them
            cache = self.new_cache(capacity or held.capacity, owner)
            for width in sorted({b for b in map(bucket, widths) if b is not None}):
                for states in hidden:
                    if (owner, width, cache.capacity, states) in self.graphs:
                        continue
                    for _ in range(2):  # CUDA graphs are recorded on a later call than the first
                        self.run(cache, [0] * width, None, None, states)
                        cache.reset()
        finally:
            self.warming = False
        spent = time.perf_counter() - started
        self.compile_s += spent
        return spent
