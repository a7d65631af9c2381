"""Options and the summary table of the propose-cost benchmark."""

from __future__ import annotations

import argparse

import pytest

# (drafter, context length) -> (median seconds per step, draft nodes per step)
COST_KEY = pytest.StashKey[dict]()


def _lengths(text: str) -> tuple[int, ...]:
    try:
        lengths = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        lengths = ()
    if len(lengths) < 2 or lengths[0] < 16:
        raise argparse.ArgumentTypeError(
            f"expected at least two comma-separated context lengths >= 16, got {text!r}")
    return lengths


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"expected a ratio >= 1, got {text!r}")
    return value


def length_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("propose-cost", "propose-cost benchmark (benchmarks/)")
    group.addoption("--cost-lengths", type=_lengths, default=(1024, 8192, 32768, 131072),
                    metavar="L,L,...", help="context lengths to time (default: 1k,8k,32k,128k)")
    group.addoption("--cost-steps", type=_positive_int, default=100, metavar="N",
                    help="drafting steps per timed round (default: 100)")
    group.addoption("--cost-rounds", type=_positive_int, default=5, metavar="N",
                    help="timed rounds per case; the median is used (default: 5)")
    group.addoption("--cost-history", type=_positive_int, default=131072, metavar="N",
                    help="tokens of the earlier sample of the same problem that every "
                         "measured sequence follows, so drafters hold about as much at "
                         "every context length (default: 131072)")
    group.addoption("--cost-max-ratio", type=_ratio, default=2.0, metavar="R",
                    help="fail a constant-cost drafter whose step costs more than R times "
                         "as much at the longest context as at the shortest (default: 2)")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[COST_KEY] = {}


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    costs = config.stash.get(COST_KEY, {})
    if not costs:
        return
    from tabulate import tabulate

    lengths = sorted({length for _, length in costs})
    drafters = list(dict.fromkeys(name for name, _ in costs))
    rows = []
    for name in drafters:
        cells = [costs.get((name, length)) for length in lengths]
        ratio = f"{cells[-1][0] / cells[0][0]:.2f}" if cells[0] and cells[-1] else "—"
        rows.append([name, *(f"{c[0] * 1e6:.1f} ({c[1]:.0f})" if c else "—" for c in cells), ratio])
    headers = ["drafter", *(f"{length_label(n)}: µs (nodes)" for n in lengths),
               f"{length_label(lengths[-1])} ÷ {length_label(lengths[0])}"]
    terminalreporter.write_sep("=", "propose + accept cost per step: median µs (draft nodes per step)")
    terminalreporter.write_line(tabulate(rows, headers=headers, tablefmt="github"))
