"""The model drafters' weights registry: where a kind's default weights live, whether
weights fit a target, whether their training finished, how they were trained, and the
digest that names them in a benchmark record. What the drafters read; the training
that writes the weights is :mod:`pytest_specdec.training`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from pytest_specdec.engine.target import EMBEDDED_NAME, cache_dir, text_config

#: The kinds whose default weights ``pytest-specdec train KIND`` makes.
KINDS = ("eagle3", "sps")


def state_digest(module: torch.nn.Module) -> str:
    """First 16 hex digits of sha256 over every tensor of ``module.state_dict()``, in
    sorted key order: each key, dtype, shape and the raw bytes. Equal weights, equal
    digest, whatever file or layout they were loaded from."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class TrainingError(ValueError):
    """Training cannot run as asked; the message names the value and what is accepted."""


def default_weights(kind: str, info: Any) -> Path:
    """Where `pytest-specdec train KIND` writes the default weights for a target:
    beside the converted embedded model, ``cache_dir()/smollm2-135m-instruct-fp32/
    drafters/KIND`` for the embedded target; for any other target, a folder named after
    it under ``cache_dir()/drafters``. `info` is a TargetInfo or a Target (its ``name``)."""
    if kind not in KINDS:
        raise TrainingError(f"drafter kind {kind!r} is not one of {', '.join(KINDS)}")
    name = str(getattr(info, "name", info))
    if name == EMBEDDED_NAME:
        return cache_dir() / "smollm2-135m-instruct-fp32" / "drafters" / kind
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "target"
    return cache_dir() / "drafters" / safe / kind



def target_signature(target: Any) -> dict[str, Any]:
    """What names the target a drafter's weights fit: its name, hidden_size, vocab_size
    and num_layers, from a TargetInfo or a Target. Trainables write it into config.json
    under the key ``"target"``; :func:`weights_fit` compares it."""
    if hasattr(target, "hidden_size"):  # TargetInfo
        return {"name": str(target.name), "hidden_size": int(target.hidden_size),
                "vocab_size": int(target.vocab_size), "num_layers": int(target.num_layers)}
    text = text_config(target.model.config)
    return {"name": str(target.name), "hidden_size": int(text.hidden_size),
            "vocab_size": int(target.vocab_size), "num_layers": int(text.num_hidden_layers)}



def weights_fit(folder: Path, target: Any) -> str:
    """"" when `folder` holds weights (config.json + model.safetensors) whose config's
    ``"target"`` matches :func:`target_signature` of `target`; else why not."""
    folder = Path(folder)
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        return f"{folder} has no config.json and model.safetensors"
    try:
        written = json.loads(config_path.read_text(encoding="utf-8")).get("target")
    except (OSError, ValueError, AttributeError) as exc:
        return f"{config_path} is not a JSON object: {exc}"
    wanted = target_signature(target)
    if written != wanted:
        return f"{config_path} names target {written!r}, not {wanted!r}"
    return ""



def training_record(folder: str | Path) -> dict[str, Any] | None:
    """The folder's training.json, or None when it has none (or an unreadable one)."""
    try:
        record = json.loads((Path(folder) / "training.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None



def finish_command(kind: str, target: Any) -> str:
    """The command that finishes (resumes) `kind`'s default weights for `target`."""
    name = str(getattr(target, "name", target))
    where = "" if name == EMBEDDED_NAME else f" --target {name}"
    return f"pytest-specdec train {kind}{where} --resume"



def weights_incomplete(folder: str | Path, kind: str | None = None, target: Any = None) -> str:
    """"" unless the folder's training.json says its run stopped before its steps (a
    time limit): then a message naming the folder, the steps done of the steps and the
    command that finishes them. Weights without training.json (made elsewhere) count as
    complete."""
    record = training_record(folder)
    if record is None:
        return ""
    try:
        done, steps = int(record.get("steps_done", 0)), int(record.get("steps", 0))
    except (TypeError, ValueError):
        done, steps = 0, 1
    complete = record.get("complete", done >= steps)
    if complete is True and done >= steps:
        return ""
    kind = kind or str(record.get("kind", "KIND"))
    why = " (stopped by its time limit)" if record.get("stopped") == "time" else ""
    command = finish_command(kind, target if target is not None else
                             (record.get("target") or {}).get("name", ""))
    return (f"{folder} holds incomplete {kind} weights: {done} of {steps} training steps "
            f"done{why}; finish them with `{command}`")



def trained_otherwise(folder: str | Path, wanted: dict[str, Any]) -> str:
    """"" when the folder's training.json records every setting of `wanted` (keys as
    training.json names them: steps, lr, batch_size, seed, options, torch_threads,
    data_settings) with the same value, or has no training.json (weights made
    elsewhere); else the settings that differ, e.g. "steps 240 (not 200)"."""
    record = training_record(folder)
    if record is None:
        return ""
    differs = []
    for key, value in json.loads(json.dumps(wanted)).items():
        had = record.get(key)
        if had is None:  # an older version's run, or one given its data directly
            differs.append(f"{key} not recorded")
        elif isinstance(value, dict) and isinstance(had, dict) and value:
            differs += [f"{key}.{k} {had.get(k)!r} (not {value.get(k)!r})"
                        for k in sorted(value.keys() | had.keys()) if had.get(k) != value.get(k)]
        elif had != value:
            differs.append(f"{key} {had!r} (not {value!r})")
    return ", ".join(differs)



def training_summary(folder: str | Path) -> str:
    """One line on how the weights in `folder` were trained (from its ``training.json``):
    for the report's row of a drafter whose weights were made here."""
    try:
        info = json.loads((Path(folder) / "training.json").read_text(encoding="utf-8"))
        text = (f"self-distilled on the target's own generations, {info['steps_done']}/"
                f"{info['steps']} steps")
    except (OSError, ValueError, KeyError, TypeError):
        return "self-distilled on the target's own generations (no training.json)"
    if info.get("stopped") == "time":
        text += " (stopped by the time budget)"
    if isinstance(info.get("loss"), (int, float)):
        text += f", final loss {info['loss']:.3g}"
    return text
