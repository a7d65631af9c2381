"""EAGLE-3 checkpoint layouts: read (:func:`load_checkpoint`, the layout detected from
config.json and the keys) and written (:func:`save_checkpoint`) for the head of
:mod:`.head`.

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

This project's own weights are written in the ``specforge`` layout (model.safetensors,
no embeddings: they are the target's) with two extra config keys, ``hidden_layers``
(output_hidden_states numbering, read first) and ``target`` (the target they fit, see
:func:`pytest_specdec.models.weights.target_signature`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from pytest_specdec.models.eagle3.head import CheckpointError, Eagle3Config, Eagle3Head, _rope_of


LAYOUTS = ("safeailab", "specforge", "speculators")


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
    :func:`~pytest_specdec.training.loop.target_signature`) is written as config.json's
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
