"""A drafter factory under its name: its option schema (the factory's signature) and
the checks a fresh instance passes. Apart from :mod:`.registry` so that a hybrid
(:mod:`.hybrid`), itself a registered drafter, and the registry that builds hybrids
import it without importing each other."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pytest_specdec.protocol.drafter import NEEDS, Drafter, missing_methods

_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
}


def _to_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true/false, got {text!r}")


_CONVERTERS["bool"] = _to_bool


@dataclass(frozen=True)
class RegisteredDrafter:
    name: str
    factory: Callable[..., Drafter]
    origin: str  # "package-name (module:attr)" or "conftest"

    def parameters(self) -> dict[str, inspect.Parameter]:
        sig = inspect.signature(self.factory)
        return {n: p for n, p in sig.parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def convert_options(self, raw: Mapping[str, str]) -> dict[str, Any]:
        """Command-line strings to typed keyword arguments; ValueError names the bad one."""
        params = self.parameters()
        out: dict[str, Any] = {}
        for key, text in raw.items():
            if key not in params:
                accepted = ", ".join(sorted(params)) or "none"
                raise ValueError(f"drafter {self.name!r} has no option {key!r} "
                                 f"(accepted: {accepted})")
            annotation = params[key].annotation
            type_name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "str")
            convert = _CONVERTERS.get(type_name, str)
            try:
                out[key] = convert(text)
            except ValueError as exc:
                raise ValueError(f"drafter {self.name!r} option {key}={text!r}: "
                                 f"expected {type_name} ({exc})") from None
        return out

    def create(self, **options: Any) -> Drafter:
        drafter = self.factory(**options)
        missing = missing_methods(drafter)
        if missing:
            raise TypeError(f"drafter {self.name!r} from {self.origin} lacks {', '.join(missing)}")
        unknown = set(getattr(drafter, "needs", frozenset())) - NEEDS
        if unknown:
            raise TypeError(f"drafter {self.name!r} needs unknown target signals {sorted(unknown)} "
                            f"(available: {sorted(NEEDS)})")
        return drafter
