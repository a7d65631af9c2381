"""What ``pip install`` of the project puts into site-packages: its wheel, built here with
setuptools from a copy of the sources (offline, a few seconds), holds no top-level
package but ``pytest_specdec``, with the repository's ``drafters/`` as
``pytest_specdec.drafters`` and every package of the source tree."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "pytest_specdec", "drafters")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    work = tmp_path_factory.mktemp("build")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, work / name)
    out = work / "dist"
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                    "build_meta.build_wheel(sys.argv[1])", str(out)],
                   cwd=work, check=True, capture_output=True, text=True)
    (path,) = out.glob("*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_the_wheel_installs_only_pytest_specdec(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"pytest_specdec"}
    (top_level,) = [n for n in wheel.namelist() if n.endswith("top_level.txt")] or [None]
    if top_level is not None:
        assert wheel.read(top_level).decode().split() == ["pytest_specdec"]


def test_the_wheel_holds_every_source_module(wheel):
    names = set(wheel.namelist())
    expected = {f"pytest_specdec/{p.relative_to(ROOT / 'pytest_specdec').as_posix()}"
                for p in (ROOT / "pytest_specdec").rglob("*.py")}
    expected |= {f"pytest_specdec/drafters/{p.name}" for p in (ROOT / "drafters").glob("*.py")}
    assert expected - names == set()


def test_entry_points_name_the_installed_modules(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    names = set(wheel.namelist())
    for group in ("pytest11", "pytest_specdec.drafters", "console_scripts"):
        for target in parser[group].values():
            module = target.split(":")[0]
            assert f"{module.replace('.', '/')}.py" in names, (group, target)
