"""Third-party drafters: the example package installed into a fresh virtual
environment and run through the suite, drafters from a conftest's
``pytest_specdec_register_drafters`` hook, and broken registrations as warnings."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from pytest_specdec import cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "specdec-example-drafter"
SUITE = ROOT / "suites" / "test_cases.py"
EXAMPLE_ORIGIN = "specdec-example-drafter (specdec_example_drafter:BigramCache)"


def subprocess_env() -> dict[str, str]:
    """This environment, without what could leak this checkout into the child."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    # one intra-op thread: OpenMP spinning on a small busy CPU makes short runs slow
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def make_env(path: Path) -> Path:
    """A virtual environment that sees this interpreter's packages (torch, transformers,
    pytest-specdec): ``--system-site-packages`` covers an interpreter outside a venv;
    from inside one it would only reach the base interpreter's packages, so a .pth
    file adds this venv's site-packages too (running its .pth files, which is how the
    editable install of pytest-specdec is found)."""
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(path)
    python = path / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if sys.prefix != sys.base_prefix:
        lines = [f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()]
        (Path(purelib) / "_specdec_parent_env.pth").write_text("".join(lines), encoding="utf-8")
    return python


def test_example_package_installs_lists_and_runs_lossless(tmp_path: Path, tiny_model_dir: Path):
    # a copy: building in place would leave build/ and *.egg-info in the checkout
    source = tmp_path / "specdec-example-drafter"
    shutil.copytree(EXAMPLE, source)
    python = make_env(tmp_path / "env")
    env = subprocess_env()
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", str(source)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr

    # the example lives in the new environment; pytest-specdec is this checkout's
    where = subprocess.run(
        [python, "-c", "import pytest_specdec, specdec_example_drafter as m; "
                       "print(pytest_specdec.__file__); print(m.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout.split()
    assert where[0] == str(ROOT / "pytest_specdec" / "__init__.py")
    assert Path(where[1]).is_relative_to(tmp_path / "env") and Path(where[1]).name == \
        "specdec_example_drafter.py"

    listing = subprocess.run([python, "-m", "pytest_specdec.cli", "list"], capture_output=True,
                             text=True, cwd=tmp_path, env=env, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert listing.stderr == ""
    lines = listing.stdout.splitlines()
    bigram = lines.index(f"bigram  ({EXAMPLE_ORIGIN})")
    assert lines[bigram + 1:bigram + 3] == ["    draft depth 5", "    share_group: bool = True"]
    assert "pld  (pytest-specdec (pytest_specdec.drafters.pld:PromptLookup))" in lines

    suites = tmp_path / "suites"
    suites.mkdir()
    shutil.copy(SUITE, suites / "test_cases.py")
    reports = tmp_path / "reports"
    run = subprocess.run(
        [python, "-m", "pytest", "suites", "-v", "-p", "no:cacheprovider",
         f"--specdec-target={tiny_model_dir}", "--specdec-drafter", "bigram",
         "--specdec-problems", "1", "--specdec-max-new-tokens", "8", "--specdec-n", "2",
         "--specdec-no-peer", "--benchmark-disable", "--specdec-report-dir", str(reports)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    matcher = pytest.LineMatcher(run.stdout.splitlines())
    matcher.fnmatch_lines(["*test_speculative?bigram-multi_round? PASSED*",
                           "*test_speculative?bigram-best_of_n? PASSED*",
                           "*4 passed, 4 deselected*"])
    (report,) = reports.glob("*.json")
    records = json.loads(report.read_text(encoding="utf-8"))["records"]
    bigram = [r for r in records if r["drafter"] == "bigram"]
    assert sorted(r["paradigm"] for r in bigram) == ["best_of_n", "multi_round"]
    for record in bigram:
        assert record["lossless"] == "exact"
        assert record["drafted"] > 0  # it really drafted, and every output still matched


# --------------------------------------------------------------------------- the hook

REPEAT_LAST = '''
from pytest_specdec.protocol.drafter import Draft, DrafterBase


class RepeatLast(DrafterBase):
    # drafts the last token again, up to `length` times
    ablations = ({"length": "1"},)

    def __init__(self, length: int = 2):
        self.length = length

    def propose(self, context, k):
        return Draft(tuple(context[-1:]) * min(k, self.length))


class Half:
    def begin(self, request):
        pass


def pytest_specdec_register_drafters(config):
    return {"repeat_last": RepeatLast, "bad name": RepeatLast, "not_callable": 3,
            "half": Half}
'''


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """The real suite under suites/, a conftest defining drafters through the hook, and
    two -p plugins whose hooks are broken (one returns garbage, one raises)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))
    pytester.mkdir("suites")
    (pytester.path / "suites" / "test_cases.py").write_text(SUITE.read_text(encoding="utf-8"))
    pytester.makeconftest(REPEAT_LAST)
    pytester.makepyfile(
        garbage_plugin="def pytest_specdec_register_drafters(config):\n    return 42\n",
        raising_plugin="def pytest_specdec_register_drafters(config):\n"
                       "    raise RuntimeError('no drafters today')\n")
    return pytester


BROKEN = ("-p", "garbage_plugin", "-p", "raising_plugin")
HOOK_WARNINGS = [
    "*pytest_specdec_register_drafters in plugin (garbage_plugin) returned int, expected a "
    "mapping of drafter names to factories; ignored*",
    "*pytest_specdec_register_drafters in plugin (raising_plugin) raised RuntimeError: "
    "no drafters today; its drafters are skipped*",
    "*pytest_specdec_register_drafters in conftest (conftest.py): drafter name 'bad name' is "
    "not a valid NAME*; skipped*",
    "*drafter 'not_callable' from conftest (conftest.py) is not callable (got int); skipped*",
    "*pytest_specdec_register_drafters in conftest (conftest.py): drafter 'half' is a class "
    "without propose, accept, end; skipped*",
]


def test_conftest_drafter_runs_lossless_beside_the_others(suite, tiny_model_dir, tmp_path):
    reports = tmp_path / "reports"
    result = suite.runpytest_subprocess(
        "suites", "-v", "-p", "no:cacheprovider", *BROKEN,
        # NAME=VALUE: a separate folder argument would count in pytest's rootdir choice
        f"--specdec-target={tiny_model_dir}", "--specdec-paradigm", "multi_round",
        "--specdec-drafter", "repeat_last", "--specdec-drafter", "pld",
        "--specdec-problems", "1", "--specdec-max-new-tokens", "8",
        "--specdec-no-peer", "--benchmark-disable", "--specdec-report-dir", str(reports),
        timeout=300)
    result.assert_outcomes(passed=3, deselected=2)
    result.stdout.fnmatch_lines(["*test_speculative?repeat_last-multi_round? PASSED*"])
    pytest.LineMatcher(result.outlines + result.errlines).fnmatch_lines(HOOK_WARNINGS,
                                                                         consecutive=False)
    (report,) = reports.glob("*.json")
    records = {r["drafter"]: r for r in json.loads(report.read_text(encoding="utf-8"))["records"]}
    assert sorted(records) == ["baseline", "pld", "repeat_last"]
    assert records["repeat_last"]["lossless"] == "exact"
    assert records["repeat_last"]["drafted"] > 0


def test_conftest_drafter_is_a_default_case_with_options_and_origin(suite):
    # a conftest next to the suites shadows a built-in: the warning names both origins
    (suite.path / "suites" / "conftest.py").write_text(
        "from pytest_specdec.protocol.drafter import DrafterBase\n\n\n"
        "def pytest_specdec_register_drafters(config):\n"
        "    return {'pld': DrafterBase}\n")
    result = suite.runpytest_subprocess("suites", "-p", "no:cacheprovider", *BROKEN,
                                        "--specdec-paradigm", "multi_round", "--specdec-no-peer",
                                        "--specdec-ablations", "--collect-only", "-q", timeout=120)
    assert result.ret == pytest.ExitCode.OK
    ids = {line.split("::", 1)[1] for line in result.outlines if "test_cases.py::" in line}
    assert {"test_speculative[repeat_last-multi_round]",
            "test_speculative[repeat_last:length=1-multi_round]",
            "test_speculative[pld-multi_round]", "test_speculative[sam-multi_round]"} <= ids
    assert not any("half" in i or "not_callable" in i for i in ids)
    result.stdout.fnmatch_lines(["*drafter 'pld' from conftest (suites/conftest.py) shadows the "
                                 "one from pytest-specdec (pytest_specdec.drafters.pld:PromptLookup)*"])

    bad = suite.runpytest_subprocess("suites", "-p", "no:cacheprovider",
                                     "--specdec-drafter", "repeat_last:bogus=1", "--collect-only",
                                     timeout=120)
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--specdec-drafter repeat_last:bogus=1: drafter 'repeat_last' "
                              "has no option 'bogus' (accepted: length)*"])


# --------------------------------------------------------------------------- list


def test_list_warns_about_broken_entry_points_naming_the_package_and_shows_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    info = tmp_path / "kaput_drafters-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kaput-drafters\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[pytest_specdec.drafters]\n"
        "kaput = kaput_missing_module:Kaput\n"
        "constant = kaput_drafters_ok:NOT_A_FACTORY\n"
        "fine = kaput_drafters_ok:Fine\n")
    (tmp_path / "kaput_drafters_ok.py").write_text(
        "from pytest_specdec.protocol.drafter import DrafterBase\n\n"
        "NOT_A_FACTORY = 3\n\n\n"
        "class Fine(DrafterBase):\n"
        "    def __init__(self, depth: int = 2):\n"
        "        self.depth = depth\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.delitem(sys.modules, "kaput_drafters_ok", raising=False)

    assert cli.main(["list"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "pytest-specdec: warning: drafter 'kaput' from kaput-drafters "
        "(kaput_missing_module:Kaput) failed to load: ModuleNotFoundError: "
        "No module named 'kaput_missing_module'",
        "pytest-specdec: warning: drafter 'constant' from kaput-drafters "
        "(kaput_drafters_ok:NOT_A_FACTORY) is not callable (got int); skipped",
    ]
    lines = out.splitlines()
    fine = lines.index("fine  (kaput-drafters (kaput_drafters_ok:Fine))")
    # DrafterBase declares the default depth; then the option
    assert lines[fine + 1:fine + 3] == ["    draft depth 5", "    depth: int = 2"]
    pld = lines.index("pld  (pytest-specdec (pytest_specdec.drafters.pld:PromptLookup))")
    assert lines[pld + 1] == "    draft depth 10"
    assert "pld  (pytest-specdec (pytest_specdec.drafters.pld:PromptLookup))" in lines
    assert not any(line.startswith(("kaput ", "constant ")) for line in lines)
