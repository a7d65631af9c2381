"""A drafter as asked for by name: ``NAME``, ``A+B`` (a hybrid) or ``NAME:key=value,...``.

Read by the pytest options and by the registry (a conftest's drafter names follow the
same pattern), so it lives below both."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DrafterSpec:
    """A drafter as asked for on the command line: NAME or NAME:key=value,key=value."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """The drafter's name in ids and reports (options included)."""
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options)


_NAME = r"[A-Za-z_][\w.-]*"
#: NAME, or A+B (a hybrid of two drafters, protocol/hybrid.py), then :key=value,...
_DRAFTER = re.compile(rf"^(?P<name>{_NAME}(?:\+{_NAME})?)(?::(?P<opts>.*))?$")


def parse_drafter_spec(text: str) -> DrafterSpec:
    """``--specdec-drafter``'s value (and a conftest's drafter name): NAME, A+B or
    NAME:key=value,...; argparse.ArgumentTypeError says what is wrong."""
    match = _DRAFTER.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected NAME, A+B (a hybrid) or NAME:key=value,..., "
                                         f"got {text!r}")
    options = []
    for item in filter(None, (match["opts"] or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"drafter option {item!r} in {text!r} is not key=value")
        options.append((key.strip(), value.strip()))
    return DrafterSpec(match["name"], tuple(options))
