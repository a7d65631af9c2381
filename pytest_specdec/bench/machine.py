"""What a run was measured on: the ``specdec`` entry of pytest-benchmark's machine_info.

plugin/hooks.py fills it through ``pytest_benchmark_update_machine_info`` and checks it through
``pytest_benchmark_compare_machine_info``; reports show it (``report.describe_machine``).
Nothing here loads a model: the target is described from the options alone.

The entry, as saved by ``--benchmark-save`` / ``--benchmark-json``::

    "specdec": {
        "target": "Qwen3-8B",            # the name the records carry
        "target_spec": "/models/Qwen3-8B",  # --specdec-target as given
        "dtype": "bfloat16", "device": "cuda",
        "torch": "2.13.0", "transformers": "5.24.0",
        # only where CUDA is available:
        "gpus": ["NVIDIA H200"], "cuda": "12.8", "driver": "570.133.20"
    }

A conftest can add its own fields after ours (hooks of conftests run first, so wrap):

.. code-block:: python

    import pytest

    @pytest.hookimpl(wrapper=True)
    def pytest_benchmark_update_machine_info(config, machine_info):
        yield
        machine_info["specdec"]["cluster"] = "rack-7"
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pytest_specdec.bench.config import SpecdecConfig

#: The key under machine_info.
SPECDEC_KEY = "specdec"
#: Fields whose difference makes two runs' timings incomparable, with their labels.
COMPARED_FIELDS = (("gpus", "GPU"), ("target", "target"), ("dtype", "dtype"))
NVIDIA_SMI_TIMEOUT_S = 10


def specdec_machine_info(cfg: SpecdecConfig) -> dict[str, Any]:
    """GPUs, driver and CUDA (where CUDA is available), torch and transformers versions,
    and the target's name, dtype and device as the session resolves them."""
    import torch

    from pytest_specdec.engine.target import TargetError, resolve_device, resolve_dtype

    try:
        device = resolve_device(cfg.device)
        dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
        device_text = str(device)
    except TargetError:  # reported by the session itself; describe what was asked
        device_text, dtype = cfg.device, cfg.dtype
    info: dict[str, Any] = {
        "target": target_name(cfg.target),
        "target_spec": cfg.target,
        "dtype": dtype,
        "device": device_text,
        "torch": torch.__version__,
    }
    try:
        info["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        pass
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.version.cuda:
            info["cuda"] = torch.version.cuda
        driver = nvidia_driver_version()
        if driver:
            info["driver"] = driver
    return info


def target_name(spec: str) -> str:
    """The name a loaded target gets (``target.load_target``), without loading it."""
    from pytest_specdec.engine.target import EMBEDDED, EMBEDDED_NAME

    if spec == EMBEDDED:
        return EMBEDDED_NAME
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        return f"random:{path.name}"
    if path.exists():
        return path.name
    return spec


def nvidia_driver_version() -> str | None:
    """The driver version(s) nvidia-smi reports, or None without a working nvidia-smi."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        result = subprocess.run([executable, "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S,
                                check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    versions = dict.fromkeys(line.strip() for line in result.stdout.splitlines() if line.strip())
    return ", ".join(versions) or None


def machine_differences(current: Any, saved: Any) -> list[str]:
    """``GPU: saved 'A' vs now 'B'`` for each compared field that differs; nothing when
    either machine_info lacks the ``specdec`` entry (a run made without pytest-specdec)."""
    now = current.get(SPECDEC_KEY) if isinstance(current, dict) else None
    before = saved.get(SPECDEC_KEY) if isinstance(saved, dict) else None
    if not isinstance(now, dict) or not isinstance(before, dict):
        return []
    return [f"{label}: saved {_shown(before.get(key))!r} vs now {_shown(now.get(key))!r}"
            for key, label in COMPARED_FIELDS if before.get(key) != now.get(key)]


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def compare_warning(differences: list[str]) -> str:
    return ("pytest-specdec: the compared run was measured on another GPU, target or dtype "
            f"({'; '.join(differences)}); its timings and speedups are not comparable "
            "with this session's")
