"""Hostile drafters, contained: whatever a drafter returns, raises, takes or touches, it
fails its own case with a DraftError naming it and the rule it broke, and the output of
every other case (and of this one, as far as it got) is untouched.

First the engine, in process, on a tiny random Llama; then the same drafters through the
real suite under pytester, registered by a conftest.py (pytest_specdec_register_drafters),
beside the baseline and a good drafter that must pass; last, a session interrupted with
KeyboardInterrupt after two cases finished, whose reports must parse and hold exactly
those two.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.protocol.drafter import (MAX_DRAFT_NODES, MAX_PROBES, Draft, DraftError,
                                             DrafterBase)
from pytest_specdec.protocol.sampling import Sampler

PROMPT = (1, 17, 42, 99, 250, 3, 77)
VOCAB = 512


def run(target, drafter, *, k: int = 3, max_new_tokens: int = 6, step_timeout: float = 0.0,
        name: str = "hostile"):
    request = GenerationRequest(PROMPT, max_new_tokens, Sampler())
    return generate(target, request, drafter, k=k, drafter_name=name, step_timeout=step_timeout)


def broken(target, drafter, **kwargs) -> DraftError:
    with pytest.raises(DraftError) as info:
        run(target, drafter, name="hostile-3", **kwargs)
    assert info.value.drafter == "hostile-3"
    assert str(info.value).startswith("drafter 'hostile-3' broke the rule '")
    return info.value


@pytest.fixture(scope="module")
def truth(llama) -> list[int]:
    return run(llama, None, max_new_tokens=12).tokens


class Oracle(DrafterBase):
    """Proposes the true continuation (so a passing run shows real acceptance)."""

    def __init__(self, truth):
        self.truth = list(truth)

    def propose(self, context, k):
        done = len(context) - len(PROMPT)
        return Draft(tuple(self.truth[done:done + k]))


# --------------------------------------------------------------------------- step timeout


class Sleepy(DrafterBase):
    needs = frozenset({"top_k"})

    def __init__(self, method: str, seconds: float):
        self.method, self.seconds = method, seconds

    def _maybe_sleep(self, method):
        if method == self.method:
            time.sleep(self.seconds)

    def begin(self, request):
        self._maybe_sleep("begin")

    def propose(self, context, k):
        self._maybe_sleep("propose")
        return Draft()

    def observe(self, signals):
        self._maybe_sleep("observe")

    def accept(self, tokens):
        self._maybe_sleep("accept")

    def end(self):
        self._maybe_sleep("end")


@pytest.mark.parametrize("method", ["begin", "propose", "observe", "accept", "end"])
def test_a_call_past_the_step_timeout_fails_naming_the_call(llama, method):
    error = broken(llama, Sleepy(method, 0.25), step_timeout=0.05)
    assert error.rule == "each call returns within 0.05 s"
    assert error.detail.startswith(f"{method} took ")
    took = float(error.detail.removeprefix(f"{method} took ").removesuffix(" s"))
    assert took >= 0.25


def test_without_a_limit_or_under_it_a_slow_drafter_runs(llama, truth):
    assert run(llama, Sleepy("propose", 0.02), step_timeout=0).tokens == truth[:6]
    assert run(llama, Sleepy("propose", 0.02), step_timeout=5).tokens == truth[:6]


# --------------------------------------------------------------------------- the context


class Mutator(Oracle):
    """Proposes the truth, and in `method` does `act(context)` to what it was shown."""

    def __init__(self, truth, method: str, act: Callable):
        super().__init__(truth)
        self.method, self.act, self.kept = method, act, None

    def propose(self, context, k):
        self.kept = context  # a reference kept for later calls
        if self.method == "propose":
            self.act(context)
        return super().propose(context, k)

    def accept(self, tokens):
        if self.method == "accept":
            self.act(self.kept)


def _swallow(fn):
    def act(context):
        try:
            fn(context)
        except TypeError:
            pass
    return act


MUTATIONS = [
    # id, method, act, detail (substring)
    ("private-append", "propose", lambda c: c._tokens.append(5), "tried to change it"),
    ("private-setitem", "propose", lambda c: c._tokens.__setitem__(-1, 5), "tried to change it"),
    ("private-clear", "accept", lambda c: c._tokens.clear(), "tried to change it"),
    ("refused-write-swallowed", "propose", _swallow(lambda c: c._tokens.pop()),
     "after propose: a write to it was refused"),
    ("list-append-bypass", "propose", lambda c: list.append(c._tokens, 5),
     "after propose: its length is 8, the sequence has 7 tokens"),
    ("list-setitem-last", "accept", lambda c: list.__setitem__(c._tokens, -1, 511),
     "after accept: its last token is 511"),
    ("list-setitem-middle", "accept", lambda c: list.__setitem__(c._tokens, 2, 0),
     "token 2 of the context was changed (found at the end of the sequence)"),
    ("not-an-int", "accept", lambda c: list.__setitem__(c._tokens, 0, "x"),
     "token 0 of the context was changed"),
    ("view-replaced", "propose", lambda c: setattr(c, "_tokens", [1, 2, 3]),
     "after propose: the view's token list was replaced"),
    ("view-emptied", "accept", lambda c: delattr(c, "_tokens"),
     "after accept: the view's token list was replaced"),
]


@pytest.mark.parametrize("method, act, detail", [m[1:] for m in MUTATIONS],
                         ids=[m[0] for m in MUTATIONS])
def test_a_drafter_that_changes_its_context_breaks_read_only(llama, truth, method, act, detail):
    error = broken(llama, Mutator(truth, method, act))
    assert error.rule == "the context is read-only"
    assert detail in error.detail


def test_tampering_never_reaches_the_output(llama, truth):
    """Each step, propose changes the first token of its copy (before the prefill, at the
    first step) and accept puts it back: the O(1) checks see nothing, the end-of-sequence
    check finds the copy intact, and the output is plain decoding's, because the engine
    never reads the drafter's copy."""
    seen = []

    class Transient(Oracle):
        def propose(self, context, k):
            self.kept = context._tokens
            self.saved = list.__getitem__(self.kept, 0)
            list.__setitem__(self.kept, 0, 400)
            seen.append(context[0])
            return super().propose(context, k)

        def accept(self, tokens):
            list.__setitem__(self.kept, 0, self.saved)

    out = run(llama, Transient(truth), k=3, max_new_tokens=12)
    assert seen and set(seen) == {400}  # it did see its own change
    assert out.tokens == truth
    assert out.stats.accepted > 0


# --------------------------------------------------------------------------- ids and types


class LyingInt(int):
    """Equal to everything: would be 'accepted' at every position if it got through."""

    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


class DeepChainClaimsShallow(Draft):
    @property
    def depth(self) -> int:  # type: ignore[override]
        return 1


class ShortTuple(tuple):
    def __len__(self):
        return 1

    def __iter__(self):
        return iter(tuple.__getitem__(self, slice(0, 1)))


class FieldsRaise(Draft):
    def __getattribute__(self, name):
        if name == "parents":
            raise RuntimeError("no parents today")
        return super().__getattribute__(name)


def _propose(fn) -> DrafterBase:
    class Hostile(DrafterBase):
        def propose(self, context, k):
            return fn(k)
    return Hostile()


IDS = [
    # id, draft, rule, detail (substring)
    ("numpy-int64", Draft((np.int64(3),)), "token ids are ints",
     "token 0 is np.int64(3) (numpy.int64); convert numpy or torch values with int()"),
    ("numpy-array-item", Draft(tuple(np.array([3, 4]))), "token ids are ints", "(numpy.int64)"),
    ("torch-scalar", Draft((torch.tensor(3),)), "token ids are ints",
     "token 0 is tensor(3) (torch.Tensor); convert numpy or torch values with int()"),
    ("bool", Draft((1, False)), "token ids are ints", "token 1 is False (bool)"),
    ("int-subclass-lying-eq", Draft((LyingInt(3),)), "token ids are ints", "(test_hostile.LyingInt)"),
    ("str", Draft(("3",)), "token ids are ints", "token 0 is '3' (str)"),
    ("parents-cycle", Draft((1, 2), parents=(1, 0)), "parents come before children",
     "parents[0] = 1"),
    ("parents-self", Draft((1,), parents=(0,)), "parents come before children", "parents[0] = 0"),
    ("parents-below-root", Draft((1, 2), parents=(-1, -2)), "parents come before children",
     "parents[1] = -2"),
    ("parents-float", Draft((1, 2), parents=(-1, 0.0)), "parents come before children",
     "parents[1] = 0.0 (float)"),
    ("parents-list", Draft((1, 2), parents=[-1, 0]), "Draft.parents is None or a tuple of ints",
     "got list"),
    ("huge-tokens", Draft((1,) * 10**6), f"at most {MAX_DRAFT_NODES} draft nodes", "proposed 1000000"),
    ("huge-probes", Draft((), probe_tokens=(1,) * 10**6, probe_parents=(-1,) * 10**6),
     f"at most {MAX_PROBES} probe nodes", "proposed 1000000"),
    ("probe-parents-cycle", Draft((), probe_tokens=(1, 2), probe_parents=(1, 0)),
     "probe parents come before children", "probe_parents[0] = 1"),
    ("probe-numpy", Draft((), probe_tokens=(np.int64(1),), probe_parents=(-1,)),
     "probe token ids are ints", "(int64)"),
    ("probes-list", Draft((), probe_tokens=[1], probe_parents=(-1,)),
     "Draft.probe_tokens is a tuple of ints", "got list"),
    ("draft-subclass-lying-depth", DeepChainClaimsShallow((1, 2, 3, 4, 5)), "at most k tokens deep",
     "proposed depth 5 with k=3"),
    ("draft-fields-raise", FieldsRaise((1,)), "propose returns a Draft",
     "reading it raised RuntimeError: no parents today"),
    ("tuple-subclass-lying-len", Draft(ShortTuple((1,) * 300)), f"at most {MAX_DRAFT_NODES} draft nodes",
     "proposed 300"),
]


@pytest.mark.parametrize("draft, rule, detail", [c[1:] for c in IDS], ids=[c[0] for c in IDS])
def test_ids_must_be_plain_ints_and_trees_well_formed(llama, draft, rule, detail):
    error = broken(llama, _propose(lambda k: draft))
    assert rule in error.rule
    assert detail in error.detail


def test_a_valid_draft_subclass_is_read_as_a_plain_draft(llama, truth):
    class Tagged(Draft):
        pass

    class Drafter(Oracle):
        def propose(self, context, k):
            return Tagged(super().propose(context, k).tokens)

    out = run(llama, Drafter(truth), max_new_tokens=12)
    assert out.tokens == truth and out.stats.accepted > 0


# --------------------------------------------------------------------------- raising


class Raises(DrafterBase):
    def __init__(self, method: str, exc: BaseException):
        self.method, self.exc = method, exc

    def _maybe_raise(self, method):
        if method == self.method:
            raise self.exc

    def begin(self, request):
        self._maybe_raise("begin")

    def propose(self, context, k):
        self._maybe_raise("propose")
        return Draft()

    def accept(self, tokens):
        self._maybe_raise("accept")

    def end(self):
        self._maybe_raise("end")


@pytest.mark.parametrize("method", ["begin", "propose", "accept", "end"])
@pytest.mark.parametrize("exc, detail", [
    (RuntimeError("boom"), "RuntimeError: boom"),
    (SystemExit(3), "SystemExit: 3"),
    (DraftError("someone-else", "a rule"), "DraftError: drafter 'someone-else' broke"),
], ids=["RuntimeError", "SystemExit", "DraftError-naming-another"])
def test_whatever_a_drafter_raises_fails_it_by_name(llama, method, exc, detail):
    error = broken(llama, Raises(method, exc))
    assert error.rule == f"{method} does not raise"
    assert error.detail.startswith(detail)


class Unprintable(Exception):
    def __str__(self):
        raise ValueError("a hostile __str__")


def test_an_unprintable_or_huge_exception_still_names_the_drafter(llama):
    error = broken(llama, Raises("propose", Unprintable()))
    assert error.detail == "Unprintable: <the exception's message cannot be shown>"
    error = broken(llama, Raises("accept", RuntimeError("x" * 100_000)))
    assert error.rule == "accept does not raise"
    assert error.detail.startswith("RuntimeError: xxx") and len(error.detail) == 300


def test_keyboard_interrupt_is_not_contained(llama):
    with pytest.raises(KeyboardInterrupt):
        run(llama, Raises("propose", KeyboardInterrupt()))


@pytest.mark.parametrize("needs, detail", [
    (frozenset({"logits"}), "unknown ['logits']; available: ['embeddings', 'hidden_states', 'output_head', 'probe_choices', 'top_k']"),
    (42, "TypeError:"),
], ids=["unknown-signal", "not-iterable"])
def test_needs_must_name_known_signals(llama, needs, detail):
    class Needy(DrafterBase):
        pass

    drafter = Needy()
    drafter.needs = needs  # type: ignore[misc]
    error = broken(llama, drafter)
    assert error.rule == "needs is a set of target signal names"
    assert detail in error.detail


# --------------------------------------------------------------------------- through the suites

HOSTILE_CONFTEST = '''
import time

from pytest_specdec.protocol.drafter import Draft, DrafterBase


def proposing(fn):
    class Hostile(DrafterBase):
        def propose(self, context, k):
            return fn(context, k)
    return Hostile


class Raises(DrafterBase):
    method = ""

    def _maybe(self, method):
        if method == self.method:
            raise RuntimeError(f"{method} exploded")

    def begin(self, request):
        self._maybe("begin")

    def propose(self, context, k):
        self._maybe("propose")
        return Draft()

    def accept(self, tokens):
        self._maybe("accept")

    def end(self):
        self._maybe("end")


def raising(method):
    return type(f"RaisesIn_{method}", (Raises,), {"method": method})


class InitRaises(DrafterBase):
    def __init__(self):
        raise RuntimeError("init exploded")


class Mutates(DrafterBase):
    def propose(self, context, k):
        context._tokens.append(7)
        return Draft()


class Slow(DrafterBase):
    def propose(self, context, k):
        time.sleep(2.5)
        return Draft()


class Interrupts(DrafterBase):
    def propose(self, context, k):
        raise KeyboardInterrupt


class Crashes(DrafterBase):
    """The process dies at once: no terminal summary, no cleanup."""

    def propose(self, context, k):
        import os

        os._exit(3)


HOSTILE = {
    "wrong_type": proposing(lambda c, k: [1, 2]),
    "returns_none": proposing(lambda c, k: None),
    "out_of_range": proposing(lambda c, k: Draft((10**9,))),
    "negative": proposing(lambda c, k: Draft((-1,))),
    "bool_ids": proposing(lambda c, k: Draft((True,))),
    "float_ids": proposing(lambda c, k: Draft((1.0,))),
    "too_deep": proposing(lambda c, k: Draft((1,) * (k + 1))),
    "too_many_nodes": proposing(lambda c, k: Draft((1,) * 300, parents=(-1,) * 300)),
    "cycle": proposing(lambda c, k: Draft((1, 2), parents=(1, 0))),
    "parent_out_of_range": proposing(lambda c, k: Draft((1, 2), parents=(-1, 5))),
    "huge_probes": proposing(lambda c, k: Draft((), probe_tokens=(1,) * 100000,
                                                 probe_parents=(-1,) * 100000)),
    "raises_begin": raising("begin"),
    "raises_propose": raising("propose"),
    "raises_accept": raising("accept"),
    "raises_end": raising("end"),
    "raises_init": InitRaises,
    "mutates": Mutates,
    "slow": Slow,
    "interrupts": Interrupts,
    "crashes": Crashes,
}


def pytest_specdec_register_drafters(config):
    return HOSTILE
'''

#: drafter -> the message its case fails with (after "drafter 'NAME' broke the rule ")
EXPECTED = {
    "wrong_type": "'propose returns a Draft': got list",
    "returns_none": "'propose returns a Draft': got NoneType",
    "out_of_range": "'token ids in [0, *)': token 0 is 1000000000",
    "negative": "'token ids in [0, *)': token 0 is -1",
    "bool_ids": "'token ids are ints': token 0 is True (bool)",
    "float_ids": "'token ids are ints': token 0 is 1.0 (float)",
    "too_deep": "'at most k tokens deep': proposed depth 6 with k=5",
    "too_many_nodes": "'at most 256 draft nodes': proposed 300",
    "cycle": "'parents come before children (-1 = root)': parents[0] = 1",
    "parent_out_of_range": "'parents come before children (-1 = root)': parents[1] = 5",
    "huge_probes": "'at most 512 probe nodes': proposed 100000",
    "raises_begin": "'begin does not raise': RuntimeError: begin exploded",
    "raises_propose": "'propose does not raise': RuntimeError: propose exploded",
    "raises_accept": "'accept does not raise': RuntimeError: accept exploded",
    "raises_end": "'end does not raise': RuntimeError: end exploded",
    "mutates": "'the context is read-only': propose tried to change it "
               "(TypeError: the context is read-only)",
    "slow": "'each call returns within 1 s': propose took *",
}


def fnmatch_escape(text: str) -> str:
    """`text` literally in an fnmatch pattern, except '*' which stays a wildcard."""
    return "".join(f"[{c}]" if c in "[]?" else c for c in text)


@pytest.fixture
def suite(suite: pytest.Pytester) -> pytest.Pytester:
    """conftest.py's suite, plus the hostile drafters registered by a conftest."""
    suite.makeconftest(HOSTILE_CONFTEST)
    return suite


def small(tiny_model_dir: Path, reports: Path, *drafters: str) -> list[str]:
    args = ["-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
            "--specdec-problems", "1", "--specdec-max-new-tokens", "8", "--specdec-rounds", "2",
            "--specdec-paradigm", "multi_round", "--specdec-no-peer", "--benchmark-disable",
            "--specdec-report-dir", str(reports), "-rf", "--tb=short"]
    for name in drafters:
        args += ["--specdec-drafter", name]
    return args


def failed_ids(result: pytest.RunResult) -> list[str]:
    return sorted(line.split()[1].split("::")[1] for line in result.outlines
                  if line.startswith("FAILED "))


def read_reports(directory: Path) -> tuple[dict, list[dict], str]:
    """The one report of a session: its JSON, CSV rows and Markdown, each parsed whole."""
    names = sorted(p.name for p in directory.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names  # no half-written file left
    # one report, one file of each kind (and its two charts, drawn at the session's end)
    assert len([n for n in names if n.endswith(".png")]) in (0, 2), names
    names = [n for n in names if not n.endswith(".png")]
    suffixes = [Path(n).suffix for n in names]
    assert len(set(suffixes)) == len(names), names
    assert {".csv", ".json", ".md"} <= set(suffixes), names
    by_suffix = {Path(n).suffix: (directory / n).read_text(encoding="utf-8") for n in names}
    if ".html" in by_suffix:
        assert by_suffix[".html"].rstrip().endswith("</html>")
    rows = list(csv.DictReader(io.StringIO(by_suffix[".csv"], newline="")))
    return json.loads(by_suffix[".json"]), rows, by_suffix[".md"]


def test_each_hostile_drafter_fails_only_its_own_case(suite, tiny_model_dir, tmp_path):
    reports = tmp_path / "reports"
    hostile = list(EXPECTED) + ["raises_init"]
    result = suite.runpytest_subprocess(
        *small(tiny_model_dir, reports, "pld", *hostile), "--specdec-step-timeout", "1",
        timeout=300)
    # the baseline and the good drafter pass; every hostile drafter fails its own case
    result.assert_outcomes(passed=2, failed=len(hostile))
    assert failed_ids(result) == sorted(f"test_speculative[{h}-multi_round]" for h in hostile)
    result.stdout.fnmatch_lines_random(
        [f"*DraftError: drafter '{name}' broke the rule {fnmatch_escape(message)}"
         for name, message in EXPECTED.items()])
    result.stdout.fnmatch_lines(["*RuntimeError: init exploded*"])
    # the session's report holds the two cases that passed, and nothing else
    data, rows, markdown = read_reports(reports)
    assert [(r["drafter"], r["lossless"]) for r in data["records"]] == [("baseline", "exact"),
                                                                        ("pld", "exact")]
    assert [r["drafter"] for r in rows] == ["baseline", "pld"]
    assert markdown.startswith("# ")


@pytest.mark.parametrize("benchmark_option", ["--benchmark-disable", "--benchmark-save=run"])
def test_an_interrupted_session_leaves_valid_reports_of_the_finished_cases(
        suite, tiny_model_dir, tmp_path, benchmark_option):
    """Ctrl-C in the third case (a drafter raising KeyboardInterrupt): pytest stops, and
    the reports, written from the records of the cases that finished, parse whole. With
    --benchmark-save (as `make bench` runs), pytest-benchmark saves the finished cases
    too, instead of crashing on the interrupted one's empty benchmark."""
    reports = tmp_path / "reports"
    args = [a if a != "--benchmark-disable" else benchmark_option
            for a in small(tiny_model_dir, reports, "pld", "interrupts")]
    result = suite.runpytest_subprocess(*args, f"--benchmark-storage={tmp_path / 'saved'}",
                                        timeout=300)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.assert_outcomes(passed=2)
    # pytest runs the terminal summary, where the reports are written, before it
    # reports the interrupt
    result.stdout.fnmatch_lines(["*= pytest-specdec =*", f"report written: {reports}/specdec-*.json",
                                 "*! KeyboardInterrupt !*"])
    data, rows, markdown = read_reports(reports)
    assert [r["drafter"] for r in data["records"]] == ["baseline", "pld"]
    assert [r["drafter"] for r in rows] == ["baseline", "pld"]
    assert {r["paradigm"] for r in data["records"]} == {"multi_round"}
    assert "interrupts" not in markdown and "| pld " in markdown
    assert "ValueError" not in result.stdout.str() + result.stderr.str()
    if benchmark_option.startswith("--benchmark-save"):
        saved = json.loads(next((tmp_path / "saved").rglob("*_run.json")).read_text())
        assert [b["name"] for b in saved["benchmarks"]] == [
            "test_baseline[multi_round]", "test_speculative[pld-multi_round]"]


def test_a_crashed_session_leaves_valid_reports_of_the_finished_cases(
        suite, tiny_model_dir, tmp_path):
    """The process dies in the third case (os._exit, no summary): the report, rewritten
    after each finished case, parses whole and holds exactly those cases."""
    reports = tmp_path / "reports"
    result = suite.runpytest_subprocess(*small(tiny_model_dir, reports, "pld", "crashes"),
                                        timeout=300)
    assert result.ret == 3
    data, rows, markdown = read_reports(reports)
    assert [r["drafter"] for r in data["records"]] == ["baseline", "pld"]
    assert [r["drafter"] for r in rows] == ["baseline", "pld"]
    assert "crashes" not in markdown and "| pld " in markdown
    assert not [p for p in reports.iterdir() if p.suffix not in (".md", ".csv", ".json", ".html")]


# --------------------------------------------------------------------------- the option


@pytest.mark.parametrize("text, message", [
    ("-1", "must be >= 0, got -1"),
    ("abc", "expected a number >= 0, got 'abc'"),
    ("nan", "must be >= 0, got nan"),
])
def test_step_timeout_option_rejects_bad_values(text, message):
    import argparse

    from pytest_specdec.plugin.options import OPTIONS

    (option,) = [o for o in OPTIONS if o.flag == "--specdec-step-timeout"]
    assert option.default == 10.0 and option.type("0") == 0.0 and option.type("0.5") == 0.5
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{message}$"):
        option.type(text)


def test_reports_are_written_when_pytest_benchmark_fails_the_session(suite, tiny_model_dir,
                                                                     tmp_path):
    """pytest-benchmark's --benchmark-compare-fail raises from its terminal summary; the
    pytest-specdec report is written before it (tryfirst), whole."""
    from pytest_benchmark.utils import get_machine_id

    # a saved run (tests/data/run_pld.json) of the same two cases, impossibly fast
    data = json.loads((Path(__file__).parent / "data" / "run_pld.json").read_text(encoding="utf-8"))
    data["benchmarks"] = [b for b in data["benchmarks"]
                          if b["name"] in ("test_baseline[baseline-multi_round]",
                                           "test_speculative[pld-multi_round]")]
    for bench, name in zip(data["benchmarks"], ("test_baseline[multi_round]",
                                                "test_speculative[pld-multi_round]")):
        # the node id as pytest forms it: the rootdir is the folder above the run's
        bench.update(name=name, fullname=f"{suite.path.name}/test_cases.py::{name}")
        bench["stats"].update({key: 1e-9 for key in ("min", "max", "mean", "median")})
    # inside the run's folder: pytest-benchmark names the storage relative to it
    storage, reports = suite.path / "storage", tmp_path / "reports"
    (storage / get_machine_id()).mkdir(parents=True)
    (storage / get_machine_id() / "0001_base.json").write_text(json.dumps(data), encoding="utf-8")
    args = [a for a in small(tiny_model_dir, reports, "pld") if a != "--benchmark-disable"]
    result = suite.runpytest_subprocess(*args, f"--benchmark-storage={storage}",
                                        "--benchmark-min-rounds=1", "--benchmark-compare=0001",
                                        "--benchmark-compare-fail=min:5%", timeout=300)
    assert result.ret != pytest.ExitCode.OK
    output = pytest.LineMatcher(result.outlines + result.errlines)
    output.fnmatch_lines(["*test_speculative[[]pld-multi_round[]] (0001_base)*",
                          "*Performance has regressed*"])
    data, rows, _ = read_reports(reports)
    assert [r["drafter"] for r in data["records"]] == ["baseline", "pld"]
    assert [r["drafter"] for r in rows] == ["baseline", "pld"]


# --------------------------------------------------------------------------- a hidden write


FLIPS_CONFTEST = '''
import gc

import torch

from pytest_specdec.drafter import Draft, DrafterBase


class FlipsASign(DrafterBase):
    """Lent nothing; finds the target model through gc in attach and flips the sign of
    one whole weight matrix: an fp32 sign flip adds 2^31 to the word, so with an even
    number of rows and columns its bits' sums by row and by column stay the same (mod
    2^32). Once: a second instance flipping it again would undo it."""

    flipped = False

    def attach(self, info):
        if FlipsASign.flipped:
            return
        for found in gc.get_objects():
            if (issubclass(type(found), torch.nn.Module) and hasattr(found, "get_input_embeddings")
                    and found.get_input_embeddings() is not None
                    and tuple(found.get_input_embeddings().weight.shape)
                    == (info.vocab_size, info.hidden_size)):
                weight = dict(found.named_parameters())["model.layers.0.mlp.down_proj.weight"]
                weight.data.neg_()
                FlipsASign.flipped = True
                return

    def propose(self, context, k):
        return Draft()


def pytest_specdec_register_drafters(config):
    return {"flips_a_sign": FlipsASign}
'''


def test_a_drafter_that_flips_a_whole_matrix_fails_and_the_next_case_is_intact(
        suite, tiny_model_dir, tmp_path):
    """The flipped matrix's sum of bits, by row and column, is what it was: only a keyed
    digest sees the change. The hostile case fails naming the matrix; the next case, an
    innocent drafter, runs on a fresh load and gives the output it gives without it."""
    suite.makeconftest(FLIPS_CONFTEST)
    clean = suite.runpytest_subprocess(*small(tiny_model_dir, tmp_path / "clean", "pld"),
                                       timeout=300)
    clean.assert_outcomes(passed=2)
    result = suite.runpytest_subprocess(
        *small(tiny_model_dir, tmp_path / "hostile", "flips_a_sign", "pld"), "-v",
        timeout=300)
    result.assert_outcomes(passed=2, failed=1)
    assert failed_ids(result) == ["test_speculative[flips_a_sign-multi_round]"]
    result.stdout.fnmatch_lines([
        "*TargetChanged: case 'flips_a_sign on multi_round' broke the rule 'the target is "
        "left unchanged': it changed model.layers.0.mlp.down_proj.weight (1 of the *"])
    order = [line.split()[0].split("::")[1] for line in result.outlines
             if line.startswith("test_") and "::" in line
             and (" PASSED" in line or " FAILED" in line)]
    assert order == ["test_baseline[multi_round]", "test_speculative[flips_a_sign-multi_round]",
                     "test_speculative[pld-multi_round]"]
    # the next case: the output (and verdict) it has in the run without the hostile one
    clean_records = {r["drafter"]: r for r in read_reports(tmp_path / "clean")[0]["records"]}
    records = {r["drafter"]: r for r in read_reports(tmp_path / "hostile")[0]["records"]}
    assert set(records) == {"baseline", "pld"}
    for name in records:
        assert records[name]["lossless"] == "exact", name
        assert records[name]["output_sha256"] == clean_records[name]["output_sha256"], name
