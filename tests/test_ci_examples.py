"""The example CI workflows under examples/ci/ pass actionlint, and every --specdec-*
flag they run is a real option of the plugin, with a value its parser accepts.

actionlint is the binary a pip package installs into the virtualenv (the `test`
extra provides it); without it these tests fail, never skip. No network, no model.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "examples" / "ci"
CONFIG = CI / "actionlint.yaml"
#: the workflows the README of examples/ci/ describes; any other .yml/.yaml is linted too
EXPECTED = ("specdec-gpu-gate.yml", "specdec-pr-smoke.yml")
#: where the option table lives: the plugin package now, the package's top level before
OPTION_MODULES = ("pytest_specdec.plugin.options", "pytest_specdec.options")
DRAFTER_GROUP = "pytest_specdec.drafters"

# a flag and what follows it: "=VALUE" or whitespace and the next word
FLAG = re.compile(r"(--specdec-[a-z0-9-]+)(?:=(\S*)|[ \t]+(?!-)([^\s\\]+))?")
COMMENT = re.compile(r"^\s*#")


def workflow_files() -> list[Path]:
    return sorted(p for p in (*CI.glob("*.yml"), *CI.glob("*.yaml")) if p != CONFIG)


def actionlint() -> str:
    """The actionlint executable: next to this interpreter (the virtualenv's), else on
    PATH; a failure saying what installs it when there is none."""
    here = Path(sys.executable).parent / "actionlint"
    found = str(here) if here.is_file() else shutil.which("actionlint")
    if found is None:
        pytest.fail("actionlint is not installed: `pip install -e .[test]` provides it "
                    f"(looked next to {sys.executable} and on PATH)", pytrace=False)
    return found


def option_table() -> dict:
    """--specdec-* flag -> Option, from whichever module defines OPTIONS."""
    for name in OPTION_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            # only the module itself (or its package) missing means "try the next";
            # anything it fails to import is a real error
            if err.name and name.startswith(err.name):
                continue
            raise
        options = getattr(module, "OPTIONS", None)
        if options is not None:
            return {opt.flag: opt for opt in options}
    pytest.fail(f"no OPTIONS table in any of {', '.join(OPTION_MODULES)}", pytrace=False)


def used_flags(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, flag, value or None) of every --specdec-* flag outside full-line YAML
    comments (a comment may name a flag that does not exist yet)."""
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if COMMENT.match(line):
            continue
        for match in FLAG.finditer(line):
            value = match.group(2) if match.group(2) is not None else match.group(3)
            if value is not None:
                value = value.strip("\"')")
            found.append((number, match.group(1), value))
    return found


def test_the_examples_exist():
    names = [p.name for p in workflow_files()]
    missing = [name for name in EXPECTED if name not in names]
    assert not missing, f"missing from {CI}: {missing}"
    assert CONFIG.is_file(), f"{CONFIG} (actionlint's runner labels) is missing"


@pytest.mark.parametrize("path", workflow_files(), ids=lambda p: p.name)
def test_workflow_passes_actionlint(path: Path):
    result = subprocess.run(
        [actionlint(), "-no-color", "-config-file", str(CONFIG), str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, (
        f"actionlint found problems in {path.relative_to(ROOT)} (exit {result.returncode}):\n"
        f"{result.stdout}{result.stderr}")


@pytest.mark.parametrize("path", workflow_files(), ids=lambda p: p.name)
def test_workflow_uses_only_real_options(path: Path):
    table = option_table()
    used = used_flags(path)
    assert used, f"{path.name} runs no --specdec-* option: the flag pattern is out of date?"
    unknown = [f"line {n}: {flag}" for n, flag, _ in used if flag not in table]
    assert not unknown, (f"{path.name} uses options the plugin does not define:\n  "
                         + "\n  ".join(unknown) + f"\n(defined: {', '.join(sorted(table))})")

    drafters = {ep.name for ep in entry_points(group=DRAFTER_GROUP)}
    bad = []
    for number, flag, value in used:
        opt = table[flag]
        if opt.action in ("store_true", "store_false"):
            continue
        if not value or "$" in value:  # no literal value to check (a shell variable)
            continue
        if opt.type is not None:
            try:
                opt.type(value)
            except Exception as err:  # argparse.ArgumentTypeError, ValueError, ...
                bad.append(f"line {number}: {flag} {value}: {err}")
                continue
        if flag == "--specdec-drafter":
            name = value.split(":", 1)[0]
            parts = [part for part in name.split("+") if part not in drafters]
            if parts:
                bad.append(f"line {number}: {flag} {value}: no drafter {', '.join(parts)} "
                           f"(registered: {', '.join(sorted(drafters))})")
    assert not bad, f"{path.name} passes values the options reject:\n  " + "\n  ".join(bad)


def test_flag_pattern_reads_values(tmp_path):
    """The parser these checks rely on: =VALUE, a following word, a flag alone."""
    got = {(flag, value) for _, flag, value in used_flags(CI / "specdec-gpu-gate.yml")}
    assert ("--specdec-profile", "gate") in got
    assert ("--specdec-compare-fail", "speedup:10%,mat:5%") in got
    sample = tmp_path / "sample.yml"
    sample.write_text("run: pytest --specdec-no-peer --specdec-k 3 \\\n"
                      "  # --specdec-comment-only 1\n")
    assert used_flags(sample) == [(1, "--specdec-no-peer", None), (1, "--specdec-k", "3")]
