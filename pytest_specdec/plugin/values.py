"""Parsers of option values, shared by the pytest options (:mod:`.options`) and the
``pytest-specdec`` command (:mod:`pytest_specdec.cli`): one definition, two front ends.
Each raises ``argparse.ArgumentTypeError``, which both argparse front ends show as
``argument --flag: <message>``."""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

from pytest_specdec.bench.record import GATED_METRICS


def at_least(convert: Callable[[str], Any], low: float, what: str, *, above: bool = False,
             finite: bool = False, name_range: bool = True) -> Callable[[str], Any]:
    """A parser: ``convert`` the text, then require ``value >= low`` (``> low`` with
    ``above``; NaN always fails, infinity too with ``finite``).

    Text that does not convert reads ``expected WHAT, got 'TEXT'``; a value out of range
    ``must be >= LOW, got TEXT`` (the pytest options), or with ``name_range=False`` the
    first form too (the CLI's)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        inside = (value > low if above else value >= low) and not (finite and math.isinf(value))
        if not inside:
            if name_range:
                raise argparse.ArgumentTypeError(
                    f"must be {'>' if above else '>='} {low:g}, got {text}")
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = at_least(int, 1, "a positive integer")
non_negative_int = at_least(int, 0, "an integer >= 0")
non_negative_float = at_least(float, 0, "a number >= 0")


def count(low: int) -> Callable[[str], int]:
    """The CLI's integer options: ``expected an integer >= LOW``."""
    return at_least(int, low, f"an integer >= {low}", name_range=False)


def positive_float(zero_ok: bool) -> Callable[[str], float]:
    """The CLI's finite numbers > 0 (>= 0 with ``zero_ok``)."""
    return at_least(float, 0, f"a number {'>=' if zero_ok else '>'} 0", above=not zero_ok,
                    finite=True, name_range=False)


temperature = at_least(float, 0, "a temperature >= 0 such as 0 or 0.6", name_range=False)


#: The most sequences one batch may decode together.
MAX_BATCH = 1024


def batch_sizes(text: str) -> tuple[int, ...]:
    """B[,B...]: the batch sizes to run every case at, each in [1, MAX_BATCH]."""
    sizes = []
    for part in text.split(","):
        try:
            size = int(part)
        except ValueError:
            size = 0
        if not 1 <= size <= MAX_BATCH:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated batch sizes in [1, {MAX_BATCH}], e.g. 1,4; "
                f"got {part.strip()!r} in {text!r}")
        sizes.append(size)
    return tuple(dict.fromkeys(sizes))


def compare_fail(text: str) -> tuple[tuple[str, float], ...]:
    """METRIC:DROP[,METRIC:DROP...], DROP a percentage ("10%") or a fraction ("0.1"):
    fail when the metric falls by more than that share of its compared value."""
    rules: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        metric, sep, drop = part.partition(":")
        if not sep or metric not in GATED_METRICS:
            raise argparse.ArgumentTypeError(
                f"expected METRIC:DROP with METRIC one of {', '.join(GATED_METRICS)}, "
                f"got {part!r}")
        try:
            value = float(drop[:-1]) / 100 if drop.endswith("%") else float(drop)
        except ValueError:
            value = -1.0
        if not 0.0 <= value < 1.0:
            raise argparse.ArgumentTypeError(
                f"{metric}: expected a drop like 10% or 0.1 (in [0, 1)), got {drop!r}")
        rules[metric] = value
    if not rules:
        raise argparse.ArgumentTypeError(f"expected METRIC:DROP[,...], got {text!r}")
    return tuple(rules.items())
