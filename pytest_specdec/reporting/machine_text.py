"""One line describing the machine a run was measured on, from pytest-benchmark's
``machine_info`` and what pytest-specdec adds to it (:mod:`pytest_specdec.bench.machine`)."""

from __future__ import annotations

from typing import Any


def describe_machine(machine_info: Any) -> str:
    """One line from pytest-benchmark's machine_info: host, CPU, OS, Python, then what
    pytest-specdec adds under ``machine_info["specdec"]`` (GPUs, driver, CUDA, torch and
    transformers versions; see :func:`describe_specdec_machine`)."""
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
    specdec = describe_specdec_machine(machine_info.get("specdec"))
    return "; ".join(filter(None, (line, specdec)))


def describe_specdec_machine(info: Any) -> str:
    """``GPU NVIDIA H200 (driver 550.54, CUDA 12.4); torch 2.13.0, transformers 5.24.0``
    from the ``specdec`` entry of machine_info (empty when there is none)."""
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
    return "; ".join(parts)
