"""One line describing the machine a run was measured on, from pytest-benchmark's
``machine_info`` and what pytest-specdec adds to it (:mod:`pytest_specdec.bench.machine`)."""

from __future__ import annotations

from typing import Any


def describe_machine(machine_info: Any, memory: Any = None) -> str:
    """One line from pytest-benchmark's machine_info: host, CPU, OS, Python, then what
    pytest-specdec adds under ``machine_info["specdec"]`` (GPUs, driver, CUDA, torch and
    transformers versions, the memory limit of a decode step; see
    :func:`describe_specdec_machine`); `memory`: the memory limit kept beside
    machine_info (a saved run's ``specdec`` entry), which takes precedence."""
    if not isinstance(machine_info, dict):
        return ""
    cpu = machine_info.get("cpu")
    parts = [
        machine_info.get("node"),
        cpu.get("brand_raw") if isinstance(cpu, dict) else None,
        " ".join(filter(None, (machine_info.get("system"), machine_info.get("release")))),
        f"Python {machine_info['python_version']}" if machine_info.get("python_version") else None,
    ]
    line = ", ".join(str(part) for part in parts if part)
    info = machine_info.get("specdec")
    if memory is not None and isinstance(info, dict):
        info = {**info, "memory": memory}
    specdec = describe_specdec_machine(info)
    return "; ".join(filter(None, (line, specdec)))


def describe_specdec_machine(info: Any) -> str:
    """``GPU NVIDIA H200 (driver 550.54, CUDA 12.4); torch 2.13.0, transformers 5.24.0``,
    then the memory limit of a decode step (:func:`describe_memory_limit`), from the
    ``specdec`` entry of machine_info (empty when there is none)."""
    if not isinstance(info, dict):
        return ""
    parts = []
    gpus = info.get("gpus")
    if isinstance(gpus, list) and gpus:
        counted = {name: gpus.count(name) for name in dict.fromkeys(map(str, gpus))}
        names = ", ".join(f"{count}x {name}" if count > 1 else name
                          for name, count in counted.items())
        versions = ", ".join(f"{label} {info[key]}" for key, label in
                             (("driver", "driver"), ("cuda", "CUDA")) if info.get(key))
        parts.append(f"GPU {names}" + (f" ({versions})" if versions else ""))
    software = ", ".join(f"{key} {info[key]}" for key in ("torch", "transformers") if info.get(key))
    if software:
        parts.append(software)
    memory = describe_memory_limit(info.get("memory"))
    if memory:
        parts.append(memory)
    return "; ".join(parts)


def describe_memory_limit(memory: Any) -> str:
    """``decode step 53.0 ms, memory limit 27.1 ms (538 MB of weights at 19.9 GB/s):
    limit ÷ step 0.51`` from a saved run's ``specdec.memory`` (``bench.machine.memory_entry``;
    the step and the figure only where the run had a baseline); empty without one."""
    if not isinstance(memory, dict) or not _is_number(memory.get("limit_ms")):
        return ""
    text = f"memory limit {memory['limit_ms']:.1f} ms"
    weights, bandwidth = memory.get("weight_bytes"), memory.get("bandwidth_bytes_per_s")
    if _is_number(weights) and _is_number(bandwidth):
        text += f" ({_bytes_text(weights)} of weights at {_bytes_text(bandwidth)}/s)"
    if _is_number(memory.get("step_ms")):
        text = f"decode step {memory['step_ms']:.1f} ms, {text}"
    if _is_number(memory.get("limit_over_step")):
        text += f": limit ÷ step {memory['limit_over_step']:.2f}"
    return text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bytes_text(count: float) -> str:
    """Decimal units, as memory bandwidths are quoted: 538 MB, 19.9 GB, 3.35 TB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            value = count / size
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{count:.0f} B"
