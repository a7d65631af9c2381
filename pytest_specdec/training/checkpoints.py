"""A training run's resumable checkpoint (model, optimizer and RNG states in
safetensors, the rest in state.json) and its final weights with training.json, each
folder swapped in whole (:mod:`pytest_specdec.atomic`)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from pytest_specdec.atomic import new_folder
from pytest_specdec.models.trainable import Trainable
from pytest_specdec.models.weights import TrainingError, state_digest

CHECKPOINT_FORMAT = 1


def checkpoint_folder(output: Path) -> Path:
    """Where a run on `output` keeps its resumable checkpoint: ``OUTPUT.checkpoint``."""
    output = Path(output)
    return output.with_name(output.name + ".checkpoint")


def _trained_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, *, step: int, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Model (trained parameters) and optimizer state in safetensors, the step, the RNG
    states and `meta` in state.json; written to a temp folder, then swapped in."""
    from safetensors.torch import save_file

    folder = Path(folder)
    params = _trained_parameters(module)
    tensors = {name: p.detach().cpu().contiguous().clone() for name, p in params.items()}
    state = optimizer.state_dict()
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                opt_tensors[f"{index}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                opt_plain.setdefault(str(index), {})[key] = value
    opt_tensors["torch_rng"] = torch.get_rng_state()
    py_state = random.getstate()
    record = dict(meta, format=CHECKPOINT_FORMAT, step=step,
                  param_groups=state["param_groups"], optimizer_plain=opt_plain,
                  python_rng=[py_state[0], list(py_state[1]), py_state[2]],
                  parameters=list(params))
    with new_folder(folder) as staging:
        save_file(tensors, str(staging / "model.safetensors"))
        save_file(opt_tensors, str(staging / "optimizer.safetensors"))
        (staging / "state.json").write_text(json.dumps(record, indent=1), encoding="utf-8")


def load_checkpoint(folder: Path, *, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote (module, optimizer, RNG states);
    returns its state.json."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        record = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "model.safetensors"))
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError) as exc:
        raise TrainingError(f"checkpoint {folder} is unreadable: {exc}") from exc
    params = _trained_parameters(module)
    if set(record.get("parameters", ())) != set(params) or set(tensors) != set(params):
        raise TrainingError(f"checkpoint {folder} holds parameters that do not match the "
                            f"model being trained (another kind or configuration?)")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise TrainingError(f"checkpoint {folder}: parameter {name} has shape "
                                    f"{tuple(tensors[name].shape)}, the model {tuple(p.shape)}")
            p.copy_(tensors[name])
    torch.set_rng_state(opt_tensors.pop("torch_rng"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in opt_tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in record.get("optimizer_plain", {}).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})
    version, internal, gauss = record["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return record


def save_weights(trainable: Trainable, output: Path, record: dict[str, Any]) -> str:
    """The trainable's final weights (``trainable.save``) plus training.json (`record`,
    with ``weights_digest`` added: :func:`~pytest_specdec.models.weights.state_digest`
    of the trainable's ``weights_module`` (default: its ``module``), the model the
    drafter loads, so it equals the drafter's ``weights_digest`` after attach in the same
    dtype), written to a temp folder beside `output`, then swapped in; returns the digest."""
    output = Path(output)
    with new_folder(output) as staging:
        was_training = trainable.module.training
        trainable.module.eval()
        try:
            trainable.save(staging)
        finally:
            trainable.module.train(was_training)
        missing = [n for n in ("config.json", "model.safetensors") if not (staging / n).is_file()]
        if missing:
            raise TrainingError(f"{trainable.kind}'s save() wrote no {' or '.join(missing)}")
        digest = state_digest(getattr(trainable, "weights_module", trainable.module))
        (staging / "training.json").write_text(json.dumps(dict(record, weights_digest=digest),
                                                          indent=1), encoding="utf-8")
    return digest
