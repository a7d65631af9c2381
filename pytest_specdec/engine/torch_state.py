"""Torch's process-wide settings that change a case's timing or numerics, as one snapshot.

A drafter's ``begin`` that calls ``torch.set_default_dtype(torch.float64)`` or
``torch.set_num_threads(1)`` (model-loading code does exactly this) would otherwise
pass its own case and slow down, or change the numbers of, every later case of the
session. The engine checks this snapshot after each call into a drafter, and the
plugin restores the session's snapshot around every case and around target loading.

Each setting is defined once, in :data:`SETTINGS`, by the public expression that reads
it, a reader and a writer. Readers of the ``torch.backends`` flags go straight to
``torch._C``'s getter where this torch has one, because the public module property
costs about 0.5 µs per read against 0.05 µs and the engine reads the whole snapshot
after every drafter call; writers always go through the public API. A setting that
this torch build lacks (or cannot read right now: ``get_float32_matmul_precision``
raises after the legacy and the new TF32 APIs were mixed) reads as an
:class:`Unreadable` value, compares equal to itself and is never written.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

#: what "no default device set" reads as (torch.get_default_device's answer then)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Unreadable:
    """A setting that could not be read: why (compares by that text)."""

    why: str

    def __repr__(self) -> str:
        return f"<unreadable: {self.why}>"


@dataclass(frozen=True)
class Setting:
    """One global setting: `name` is the public expression that reads it."""

    name: str
    read: Callable[[], Any]
    write: Callable[[Any], None]


def _resolve(path: str) -> Any:
    """The object at a dotted path under ``torch`` (``torch.backends.cudnn.conv``)."""
    obj: Any = torch
    for part in path.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def _missing(name: str) -> Callable[..., Any]:
    def fail(*_: Any) -> Any:
        raise AttributeError(f"{name} does not exist in torch {torch.__version__}")
    return fail


def _function(getter: str, setter: str | Callable[[Any], None],
              fast: Callable[[], Any] | None = None) -> Setting:
    """A setting read by ``torch.<getter>()`` (or `fast`, torch._C's getter behind it)
    and written by ``torch.<setter>(value)``."""
    read = fast or getattr(torch, getter, None) or _missing(f"torch.{getter}")
    if isinstance(setter, str):
        setter = getattr(torch, setter, None) or _missing(f"torch.{setter}")
    return Setting(f"torch.{getter}()", read, setter)


def _backend_function(module: str, getter: str, setter: str,
                      fast: Callable[[], Any] | None = None) -> Setting:
    """A flag read by ``<module>.<getter>()`` (or `fast`) and written by
    ``<module>.<setter>(value)``."""
    try:
        owner = _resolve(module)
        read, write = fast or getattr(owner, getter), getattr(owner, setter)
    except AttributeError:
        read = write = _missing(f"{module}.{getter}")
    return Setting(f"{module}.{getter}()", read, write)


def _attribute(path: str, fast: Callable[[], Any] | None) -> Setting:
    """A ``torch.backends`` property: read through `fast` (torch._C's getter) when this
    torch has it, else through the property; written through the property."""
    owner, _, attr = path.rpartition(".")

    def read() -> Any:
        return getattr(_resolve(owner), attr)

    def write(value: Any) -> None:
        setattr(_resolve(owner), attr, value)

    return Setting(path, fast or read, write)


def _c(name: str, *args: str) -> Callable[[], Any] | None:
    function = getattr(torch._C, name, None)
    if function is None:
        return None
    return functools.partial(function, *args) if args else function


def _precision(path: str, backend: str, op: str) -> Setting:
    """A leaf of the fp32_precision tree (torch >= 2.9's TF32 controls)."""
    getter = _c("_get_fp32_precision_getter")
    return _attribute(path, functools.partial(getter, backend, op) if getter else None)


_DEVICE_CONTEXT = getattr(torch, "_GLOBAL_DEVICE_CONTEXT", None)


def _default_device() -> torch.device:
    """torch.get_default_device() as set by torch.set_default_device: the global device
    context (0.05 µs) when this torch keeps one, else the public call (3 µs)."""
    if _DEVICE_CONTEXT is None:
        return torch.get_default_device()
    # this thread's attributes of the threading.local (getattr would raise and catch)
    context = _DEVICE_CONTEXT.__dict__.get("device_context")
    return CPU if context is None else context.device


def _set_default_device(device: torch.device) -> None:
    # None, not "cpu": a set default device costs every later torch call a little
    torch.set_default_device(None if device == CPU else device)


def _set_deterministic(enabled: bool) -> None:
    torch.use_deterministic_algorithms(
        enabled, warn_only=torch.is_deterministic_algorithms_warn_only_enabled())


#: Every setting, in the order restore() writes them: the legacy TF32 flags before the
#: fp32_precision tree they are views of (so the tree ends exactly as captured), and in
#: the tree each parent before its children (setting a parent overwrites them).
SETTINGS: tuple[Setting, ...] = (
    _function("get_default_dtype", "set_default_dtype"),
    Setting("torch.get_default_device()", _default_device, _set_default_device),
    _function("get_num_threads", "set_num_threads"),
    # torch accepts one set_num_interop_threads per process: a change is found but
    # cannot be undone (restore reports it)
    _function("get_num_interop_threads", "set_num_interop_threads"),
    _function("is_grad_enabled", "set_grad_enabled"),
    _function("are_deterministic_algorithms_enabled", _set_deterministic),
    _function("get_float32_matmul_precision", "set_float32_matmul_precision",
              _c("_get_float32_matmul_precision")),
    _attribute("torch.backends.cuda.matmul.allow_tf32", _c("_get_cublas_allow_tf32")),
    # (allow, allow_split_k) where torch reads both; the property takes the pair back
    _attribute("torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction",
               _c("_get_cublas_allow_fp16_reduced_precision_reduction")),
    _attribute("torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction",
               _c("_get_cublas_allow_bf16_reduced_precision_reduction")),
    _attribute("torch.backends.cuda.matmul.allow_fp16_accumulation",
               _c("_get_cublas_allow_fp16_accumulation")),
    _attribute("torch.backends.cudnn.enabled", _c("_get_cudnn_enabled")),
    _attribute("torch.backends.cudnn.allow_tf32", _c("_get_cudnn_allow_tf32")),
    _attribute("torch.backends.cudnn.benchmark", _c("_get_cudnn_benchmark")),
    _attribute("torch.backends.cudnn.deterministic", _c("_get_cudnn_deterministic")),
    _attribute("torch.backends.mkldnn.enabled", _c("_get_mkldnn_enabled")),
    _backend_function("torch.backends.cuda", "flash_sdp_enabled", "enable_flash_sdp",
                      _c("_get_flash_sdp_enabled")),
    _backend_function("torch.backends.cuda", "mem_efficient_sdp_enabled",
                      "enable_mem_efficient_sdp", _c("_get_mem_efficient_sdp_enabled")),
    _backend_function("torch.backends.cuda", "math_sdp_enabled", "enable_math_sdp",
                      _c("_get_math_sdp_enabled")),
    _backend_function("torch.backends.cuda", "cudnn_sdp_enabled", "enable_cudnn_sdp",
                      _c("_get_cudnn_sdp_enabled")),
    _precision("torch.backends.fp32_precision", "generic", "all"),
    _precision("torch.backends.cudnn.fp32_precision", "cuda", "all"),
    _precision("torch.backends.mkldnn.fp32_precision", "mkldnn", "all"),
    _precision("torch.backends.cuda.matmul.fp32_precision", "cuda", "matmul"),
    _precision("torch.backends.cudnn.conv.fp32_precision", "cuda", "conv"),
    _precision("torch.backends.cudnn.rnn.fp32_precision", "cuda", "rnn"),
    _precision("torch.backends.mkldnn.matmul.fp32_precision", "mkldnn", "matmul"),
    _precision("torch.backends.mkldnn.conv.fp32_precision", "mkldnn", "conv"),
    _precision("torch.backends.mkldnn.rnn.fp32_precision", "mkldnn", "rnn"),
)

_READERS = tuple(s.read for s in SETTINGS)


@dataclass(frozen=True)
class TorchState:
    """The value of every setting of :data:`SETTINGS`, in its order."""

    values: tuple[Any, ...]

    def as_dict(self) -> dict[str, Any]:
        return {s.name: v for s, v in zip(SETTINGS, self.values)}


def _read(setting: Setting) -> Any:
    try:
        return setting.read()
    except Exception as exc:
        return Unreadable(f"{type(exc).__name__}: {exc}")


def capture() -> TorchState:
    """The current value of every setting (a few µs: the engine calls it per drafter call)."""
    try:
        return TorchState(tuple([read() for read in _READERS]))
    except Exception:  # a setting that cannot be read: each one on its own
        return TorchState(tuple(_read(s) for s in SETTINGS))


def unchanged(snapshot: TorchState) -> bool:
    """Whether every setting still has its value in `snapshot`: capture() == snapshot
    without building a TorchState (the engine's check after each drafter call)."""
    try:
        return tuple([read() for read in _READERS]) == snapshot.values
    except Exception:
        return capture() == snapshot


def diff(before: TorchState, after: TorchState) -> list[tuple[str, Any, Any]]:
    """``(setting, before, after)`` for each setting whose value differs, in table order."""
    return [(s.name, b, a) for s, b, a in zip(SETTINGS, before.values, after.values) if b != a]


def restore(snapshot: TorchState) -> list[tuple[str, str]]:
    """Write back every setting that differs from `snapshot`, in table order (each read
    again just before, since writing one can change others). Returns ``(setting, why)``
    for each that could not be restored; a value captured as :class:`Unreadable` is left
    as it is."""
    failed = []
    for setting, value in zip(SETTINGS, snapshot.values):
        if isinstance(value, Unreadable) or _read(setting) == value:
            continue
        try:
            setting.write(value)
        except Exception as exc:
            failed.append((setting.name, f"{type(exc).__name__}: {exc}"))
    return failed


def show(value: Any) -> str:
    """A value for a message: dtypes and devices as torch prints them (``torch.float64``,
    ``cuda:0``), anything else as its repr."""
    return str(value) if isinstance(value, (torch.dtype, torch.device)) else repr(value)


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    """``S from X to Y; ...`` for a diff."""
    return "; ".join(f"{name} from {show(b)} to {show(a)}" for name, b, a in changes)
