"""What a run was measured on: the ``specdec`` entry of pytest-benchmark's machine_info.

plugin/hooks.py fills it through ``pytest_benchmark_update_machine_info`` and checks it through
``pytest_benchmark_compare_machine_info``; reports show it (``report.describe_machine``).
Nothing here loads a model: the target is described from the options alone, and the
memory limit of a decode step (:func:`measure_memory_limit`, :func:`memory_entry`) is
measured on a target a case has already loaded.

The entry, as saved by ``--benchmark-save`` / ``--benchmark-json``::

    "specdec": {
        "target": "Qwen3-8B",            # the name the records carry
        "target_spec": "/models/Qwen3-8B",  # --specdec-target as given
        "dtype": "bfloat16", "device": "cuda",
        "torch": "2.13.0", "transformers": "5.24.0",
        # only where CUDA is available:
        "gpus": ["NVIDIA H200"], "cuda": "12.8", "driver": "570.133.20",
    }

The memory limit of the decode step (:func:`memory_entry`) is not part of it: a saved
run carries it beside, as its top-level ``"specdec": {"memory": {...}}`` (the plugin's
``pytest_benchmark_update_json``), since pytest-benchmark compares machine_info, taken
before any target is loaded, with the next run's.

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
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pytest_specdec.bench.config import SpecdecConfig
from pytest_specdec.engine.metrics import limit_over_step, memory_limit_s

#: The key under machine_info.
SPECDEC_KEY = "specdec"
#: Fields whose difference makes two runs' timings incomparable, with their labels.
COMPARED_FIELDS = (("gpus", "GPU"), ("target", "target"), ("dtype", "dtype"))
NVIDIA_SMI_TIMEOUT_S = 10
#: The bandwidth probe reads a matrix of the target's weight bytes, up to this many (past
#: every cache; on a GPU the target nearly fills, room for this much more is likely)
BANDWIDTH_PROBE_MAX_BYTES = 1 << 30
#: its matrix's columns (a hidden size of a large model: a long, contiguous row per dot)
BANDWIDTH_PROBE_COLUMNS = 4096
#: timed matrix-vector products after one untimed warm-up (threads and kernels started);
#: the probe reads their median
BANDWIDTH_PROBE_REPEATS = 5


def specdec_machine_info(cfg: SpecdecConfig, memory: dict[str, Any] | None = None
                         ) -> dict[str, Any]:
    """GPUs, driver and CUDA (where CUDA is available), torch and transformers versions,
    and the target's name, dtype and device as the session resolves them; `memory`, the
    session's :func:`memory_entry`, where it has one."""
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
    if memory:
        info["memory"] = memory
    return info


@dataclass(frozen=True)
class MemoryLimit:
    """A target's weight bytes and the memory bandwidth its device reads them at (bytes
    per second, from ``probe_bytes`` read by one matrix-vector product)."""

    weight_bytes: int
    probe_bytes: int
    bandwidth: float

    @property
    def limit_s(self) -> float | None:
        """One pass over the weights: the memory limit of a decode step at batch 1."""
        return memory_limit_s(self.weight_bytes, self.bandwidth)


def weight_bytes(model: Any) -> int:
    """The bytes of a model's parameters and buffers, each storage counted once (tied
    weights, such as an input embedding shared with the output head, read once a step)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        key = (str(tensor.device), tensor.data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def measure_bandwidth(device: Any, dtype: Any, nbytes: int) -> tuple[int, float] | None:
    """(bytes read, seconds): the median of :data:`BANDWIDTH_PROBE_REPEATS` products of
    a matrix of about `nbytes` (at most :data:`BANDWIDTH_PROBE_MAX_BYTES`) with a vector,
    on `device` in `dtype`, each timed on :func:`~pytest_specdec.engine.timing.now` with
    the device synchronized around it. None when the matrix does not fit in memory."""
    import torch

    from pytest_specdec.engine.timing import now

    element = torch.empty((), dtype=dtype).element_size()
    elements = max(1, min(nbytes, BANDWIDTH_PROBE_MAX_BYTES) // element)
    columns = min(BANDWIDTH_PROBE_COLUMNS, elements)
    rows = max(1, elements // columns)
    try:
        with torch.inference_mode():
            matrix = torch.full((rows, columns), 0.5, dtype=dtype, device=device)  # [rows, columns]
            vector = torch.ones(columns, dtype=dtype, device=device)  # [columns]
            out = torch.mv(matrix, vector)  # [rows]; the untimed warm-up
            times = []
            for _ in range(BANDWIDTH_PROBE_REPEATS):
                _synchronize(out.device)
                started = now()
                torch.mv(matrix, vector, out=out)
                _synchronize(out.device)
                times.append(now() - started)
    except torch.OutOfMemoryError:
        return None
    return matrix.numel() * element, statistics.median(times)


def _synchronize(device: Any) -> None:
    """Wait for an asynchronous device (kernels are queued, a host clock would time the
    queueing); a CPU's work is done when the call returns."""
    import torch

    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def measure_memory_limit(model: Any, device: Any, dtype: Any) -> MemoryLimit | None:
    """The memory limit of a loaded target's decode step: its weight bytes, and the
    bandwidth of a matrix-vector product of about that size on its device and dtype
    (:func:`measure_bandwidth`; about 0.3 s for the default target on a 2-core CPU).
    None when the probe does not fit in memory or reads no time."""
    size = weight_bytes(model)
    measured = measure_bandwidth(device, dtype, size)
    if measured is None or measured[1] <= 0:
        return None
    probe_bytes, seconds = measured
    return MemoryLimit(size, probe_bytes, probe_bytes / seconds)


def memory_entry(limit: MemoryLimit, step_ms: Iterable[float]) -> dict[str, Any]:
    """machine_info's ``memory``: the weight bytes, the probe's bytes and bandwidth, the
    memory limit of a step in ms and, given the session's probes of a plain decode step
    (`step_ms`, the baseline records' ``probe_ms``; their median is the step), the step
    and ``limit_over_step`` (:func:`~pytest_specdec.engine.metrics.limit_over_step`)."""
    entry: dict[str, Any] = {"weight_bytes": limit.weight_bytes, "probe_bytes": limit.probe_bytes,
                             "bandwidth_bytes_per_s": round(limit.bandwidth, 1)}
    if limit.limit_s is None:
        return entry
    entry["limit_ms"] = round(limit.limit_s * 1e3, 3)
    steps = [s for s in step_ms if isinstance(s, (int, float)) and s > 0]
    if steps:
        step_s = statistics.median(steps) / 1e3
        entry["step_ms"] = round(step_s * 1e3, 3)
        figure = limit_over_step(limit.limit_s, step_s)
        if figure is not None:
            entry["limit_over_step"] = round(figure, 4)
    return entry


def baseline_step_ms(records: Sequence[dict]) -> list[float]:
    """The baseline records' probes of a plain decode step (``probe_ms``), in ms."""
    return [r["probe_ms"] for r in records
            if r.get("role") == "baseline" and isinstance(r.get("probe_ms"), (int, float))]


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
