"""Cases cannot disturb each other through torch's global state.

First torch_state itself (capture, diff, restore, setting by setting); then the engine,
where a drafter that changes a setting in any call fails with the setting named and
the state set back; last the real suite under pytester, where drafters registered by a
conftest change the state in ``begin`` and in their factory, the target's loading
changes it, and a later drafter checks that its case runs with the session's state.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pytest_specdec.engine import TORCH_STATE, GenerationRequest, generate
from pytest_specdec.engine import torch_state
from pytest_specdec.engine.torch_state import SETTINGS, Setting, TorchState, Unreadable
from pytest_specdec.protocol.drafter import DraftError, DrafterBase
from pytest_specdec.protocol.sampling import Sampler

backends = torch.backends
#: a thread count other than this process's
OTHER_THREADS = 1 if torch.get_num_threads() != 1 else 2


@pytest.fixture(autouse=True)
def torch_state_kept():
    """Whatever a test here does (or fails to undo), the next test starts clean."""
    before = torch_state.capture()
    yield before
    assert torch_state.restore(before) == []
    assert torch_state.capture() == before


def _set(owner, attr: str, value) -> None:
    setattr(owner, attr, value)


#: setting -> (a change made through torch's public API, the value it then reads,
#: whether it is the only setting that changes). The TF32 flags and the fp32_precision
#: tree are views of one state (torch >= 2.9), so changing one moves others with it.
CHANGES = {
    "torch.get_default_dtype()": (lambda: torch.set_default_dtype(torch.float64),
                                  torch.float64, True),
    "torch.get_default_device()": (lambda: torch.set_default_device("meta"),
                                   torch.device("meta"), True),
    "torch.get_num_threads()": (lambda: torch.set_num_threads(OTHER_THREADS), OTHER_THREADS, True),
    "torch.is_grad_enabled()": (lambda: torch.set_grad_enabled(False), False, True),
    "torch.are_deterministic_algorithms_enabled()": (
        lambda: torch.use_deterministic_algorithms(True), True, True),
    "torch.get_float32_matmul_precision()": (
        lambda: torch.set_float32_matmul_precision("medium"), "medium", False),
    "torch.backends.cuda.matmul.allow_tf32": (
        lambda: _set(backends.cuda.matmul, "allow_tf32", True), True, False),
    "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction": (
        lambda: _set(backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", False),
        (False, True), True),
    "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction": (
        lambda: _set(backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False),
        (False, True), True),
    "torch.backends.cuda.matmul.allow_fp16_accumulation": (
        lambda: _set(backends.cuda.matmul, "allow_fp16_accumulation", True), True, True),
    "torch.backends.cudnn.enabled": (lambda: _set(backends.cudnn, "enabled", False), False, True),
    "torch.backends.cudnn.allow_tf32": (
        lambda: _set(backends.cudnn, "allow_tf32", False), False, False),
    "torch.backends.cudnn.benchmark": (lambda: _set(backends.cudnn, "benchmark", True), True, True),
    "torch.backends.cudnn.deterministic": (
        lambda: _set(backends.cudnn, "deterministic", True), True, True),
    "torch.backends.mkldnn.enabled": (lambda: _set(backends.mkldnn, "enabled", False), False, True),
    "torch.backends.cuda.flash_sdp_enabled()": (
        lambda: backends.cuda.enable_flash_sdp(False), False, True),
    "torch.backends.cuda.mem_efficient_sdp_enabled()": (
        lambda: backends.cuda.enable_mem_efficient_sdp(False), False, True),
    "torch.backends.cuda.math_sdp_enabled()": (
        lambda: backends.cuda.enable_math_sdp(False), False, True),
    "torch.backends.cuda.cudnn_sdp_enabled()": (
        lambda: backends.cuda.enable_cudnn_sdp(False), False, True),
    "torch.backends.fp32_precision": (
        lambda: _set(backends, "fp32_precision", "tf32"), "tf32", False),
    "torch.backends.cudnn.fp32_precision": (
        lambda: _set(backends.cudnn, "fp32_precision", "tf32"), "tf32", False),
    "torch.backends.mkldnn.fp32_precision": (
        lambda: _set(backends.mkldnn, "fp32_precision", "bf16"), "bf16", False),
    "torch.backends.cuda.matmul.fp32_precision": (
        lambda: _set(backends.cuda.matmul, "fp32_precision", "tf32"), "tf32", False),
    "torch.backends.cudnn.conv.fp32_precision": (
        lambda: _set(backends.cudnn.conv, "fp32_precision", "ieee"), "ieee", False),
    "torch.backends.cudnn.rnn.fp32_precision": (
        lambda: _set(backends.cudnn.rnn, "fp32_precision", "ieee"), "ieee", False),
    "torch.backends.mkldnn.matmul.fp32_precision": (
        lambda: _set(backends.mkldnn.matmul, "fp32_precision", "bf16"), "bf16", False),
    "torch.backends.mkldnn.conv.fp32_precision": (
        lambda: _set(backends.mkldnn.conv, "fp32_precision", "tf32"), "tf32", False),
    "torch.backends.mkldnn.rnn.fp32_precision": (
        lambda: _set(backends.mkldnn.rnn, "fp32_precision", "bf16"), "bf16", False),
}
#: torch takes one set_num_interop_threads per process: not changed in this process
NOT_CHANGED_HERE = {"torch.get_num_interop_threads()"}


def test_every_setting_is_tested_and_named_once():
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    assert set(names) == set(CHANGES) | NOT_CHANGED_HERE


@pytest.mark.parametrize("name", list(CHANGES))
def test_capture_diff_and_restore_each_setting(name):
    change, new_value, alone = CHANGES[name]
    before = torch_state.capture()
    assert before.as_dict()[name] != new_value  # the change is a change
    change()
    after = torch_state.capture()
    changes = torch_state.diff(before, after)
    assert (name, before.as_dict()[name], new_value) in changes
    if alone:
        assert changes == [(name, before.as_dict()[name], new_value)]
    assert torch_state.unchanged(before) is False
    assert torch_state.restore(before) == []
    assert torch_state.capture() == before
    assert torch_state.diff(before, torch_state.capture()) == []
    assert torch_state.unchanged(before) is True


def test_capture_reads_each_setting_through_its_public_api():
    """The fast readers (torch._C's getters) agree with the public expressions."""
    state = torch_state.capture().as_dict()
    assert state["torch.get_default_dtype()"] == torch.get_default_dtype()
    assert state["torch.get_default_device()"] == torch.get_default_device()
    assert state["torch.get_num_threads()"] == torch.get_num_threads()
    assert state["torch.get_num_interop_threads()"] == torch.get_num_interop_threads()
    assert state["torch.get_float32_matmul_precision()"] == torch.get_float32_matmul_precision()
    for name, value in state.items():
        if name.startswith("torch.backends.") and not name.endswith(")"):
            public = eval(name, {"torch": torch})  # a property, e.g. torch.backends.cudnn.benchmark
            # the reduced-precision flags read (allow, allow_split_k) where torch has both
            assert value == public or (isinstance(value, tuple) and value[0] == public), name


def test_a_default_device_is_set_back_to_none_not_to_cpu():
    """Setting the default device installs a mode that slows every torch call: the
    session's unset default is restored as unset."""
    before = torch_state.capture()
    torch.set_default_device("meta")
    torch_state.restore(before)
    assert getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None) is None
    assert torch.empty(1).device == torch.device("cpu")


def test_changes_made_through_several_apis_are_all_undone():
    """Mixing the legacy and the new TF32 APIs makes get_float32_matmul_precision raise;
    restore still returns every setting (and that reading) to the snapshot."""
    before = torch_state.capture()
    torch.set_float32_matmul_precision("medium")
    backends.mkldnn.fp32_precision = "bf16"
    backends.cudnn.conv.fp32_precision = "ieee"
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(OTHER_THREADS)
    assert torch_state.restore(before) == []
    assert torch_state.capture() == before
    assert torch.get_float32_matmul_precision() == before.as_dict()[
        "torch.get_float32_matmul_precision()"]


def _patched(monkeypatch, name: str, **fields) -> None:
    """SETTINGS with the setting `name` replaced by one with other read/write."""
    settings = tuple(dataclasses.replace(s, **fields) if s.name == name else s
                     for s in SETTINGS)
    monkeypatch.setattr(torch_state, "SETTINGS", settings)
    monkeypatch.setattr(torch_state, "_READERS", tuple(s.read for s in settings))


def test_a_setting_torch_refuses_to_set_back_is_reported(monkeypatch):
    """torch accepts set_num_interop_threads once per process: restore names it and why."""
    def refuse(value):
        raise RuntimeError("Error: cannot set number of interop threads after parallel work "
                           "has started or set_num_interop_threads called")

    name = "torch.get_num_interop_threads()"
    _patched(monkeypatch, name, write=refuse)
    current = torch_state.capture()
    index = [s.name for s in SETTINGS].index(name)
    wanted = TorchState(current.values[:index] + (current.values[index] + 1,)
                        + current.values[index + 1:])
    assert torch_state.restore(wanted) == [
        (name, "RuntimeError: Error: cannot set number of interop threads after parallel "
               "work has started or set_num_interop_threads called")]


def test_an_unreadable_setting_compares_equal_and_is_never_written(monkeypatch):
    def unreadable():
        raise RuntimeError("mixed legacy and new APIs")

    def never(value):
        raise AssertionError("an unreadable value was written")

    _patched(monkeypatch, "torch.get_float32_matmul_precision()", read=unreadable, write=never)
    before = torch_state.capture()
    value = before.as_dict()["torch.get_float32_matmul_precision()"]
    assert value == Unreadable("RuntimeError: mixed legacy and new APIs")
    assert repr(value) == "<unreadable: RuntimeError: mixed legacy and new APIs>"
    assert torch_state.capture() == before and torch_state.unchanged(before)
    torch.set_default_dtype(torch.float64)  # the other settings still work
    assert torch_state.diff(before, torch_state.capture()) == [
        ("torch.get_default_dtype()", torch.float32, torch.float64)]
    assert torch_state.restore(before) == []
    assert torch.get_default_dtype() == torch.float32


def test_a_setting_missing_from_this_torch_reads_as_unreadable(monkeypatch):
    missing = torch_state._function("get_no_such_setting", "set_no_such_setting")
    assert missing.name == "torch.get_no_such_setting()"
    monkeypatch.setattr(torch_state, "SETTINGS", (*SETTINGS, missing))
    monkeypatch.setattr(torch_state, "_READERS", (*torch_state._READERS, missing.read))
    state = torch_state.capture()
    assert state.as_dict()[missing.name] == Unreadable(
        f"AttributeError: torch.get_no_such_setting does not exist in torch {torch.__version__}")
    assert torch_state.restore(state) == []


@pytest.mark.parametrize("changes, text", [
    ([("torch.get_default_dtype()", torch.float32, torch.float64)],
     "torch.get_default_dtype() from torch.float32 to torch.float64"),
    ([("torch.get_default_device()", torch.device("cpu"), torch.device("cuda", 0)),
      ("torch.get_float32_matmul_precision()", "highest", "high")],
     "torch.get_default_device() from cpu to cuda:0; "
     "torch.get_float32_matmul_precision() from 'highest' to 'high'"),
    ([("torch.backends.cudnn.benchmark", False, True)],
     "torch.backends.cudnn.benchmark from False to True"),
])
def test_describe(changes, text):
    assert torch_state.describe(changes) == text


# --------------------------------------------------------------------------- the engine

PROMPT = (1, 17, 42, 99, 250, 3, 77)


class ChangesState(DrafterBase):
    """In `method`, makes `change` (and in every call, nothing else)."""

    needs = frozenset({"top_k"})  # so that observe is called too

    def __init__(self, method: str, change):
        self.method, self.change = method, change

    def _maybe(self, method):
        if method == self.method:
            self.change()

    def begin(self, request):
        self._maybe("begin")

    def propose(self, context, k):
        self._maybe("propose")
        return super().propose(context, k)

    def observe(self, signals):
        self._maybe("observe")

    def accept(self, tokens):
        self._maybe("accept")

    def end(self):
        self._maybe("end")


def run(target, drafter, name: str = "careless"):
    request = GenerationRequest(PROMPT, 6, Sampler())
    return generate(target, request, drafter, k=3, drafter_name=name)


ENGINE_CHANGES = [
    # id, change, detail after "<method> changed " (the engine runs under inference mode)
    ("dtype", lambda: torch.set_default_dtype(torch.float64),
     "torch.get_default_dtype() from torch.float32 to torch.float64"),
    ("threads", lambda: torch.set_num_threads(OTHER_THREADS),
     f"torch.get_num_threads() from {torch.get_num_threads()} to {OTHER_THREADS}"),
    ("grad", lambda: torch.set_grad_enabled(True), "torch.is_grad_enabled() from False to True"),
    ("matmul-precision", lambda: torch.set_float32_matmul_precision("medium"),
     "torch.get_float32_matmul_precision() from 'highest' to 'medium'; "),
]


@pytest.mark.parametrize("method", ["begin", "propose", "observe", "accept", "end"])
@pytest.mark.parametrize("change, detail", [c[1:] for c in ENGINE_CHANGES],
                         ids=[c[0] for c in ENGINE_CHANGES])
def test_a_drafter_that_changes_torch_state_fails_and_the_state_is_set_back(
        llama, method, change, detail, torch_state_kept):
    with pytest.raises(DraftError) as info:
        run(llama, ChangesState(method, change))
    error = info.value
    assert (error.drafter, error.rule) == ("careless", TORCH_STATE)
    assert str(error).startswith("drafter 'careless' broke the rule "
                                 "'torch's global state is left unchanged': ")
    if detail.endswith("; "):  # the matmul precision moves its TF32 views with it
        assert error.detail.startswith(f"{method} changed {detail}")
    else:
        assert error.detail == f"{method} changed {detail}"
    assert torch_state.capture() == torch_state_kept  # set back by the engine itself


def test_a_drafter_that_sets_back_what_it_changed_runs(llama):
    """Only what a call leaves behind counts: a temporary change inside it is fine."""
    def temporary():
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        torch.set_default_dtype(dtype)

    plain = run(llama, None).tokens
    assert run(llama, ChangesState("propose", temporary)).tokens == plain


def test_a_drafter_that_raises_after_a_change_has_it_undone(llama, torch_state_kept):
    def change_then_raise():
        torch.set_default_dtype(torch.float64)
        raise RuntimeError("half-way")

    with pytest.raises(DraftError) as info:
        run(llama, ChangesState("begin", change_then_raise))
    assert info.value.rule == "begin does not raise"
    assert torch_state.capture() == torch_state_kept


# --------------------------------------------------------------------------- through the suites

CONFTEST = '''
import json
from pathlib import Path

import torch

import pytest_specdec.engine.target
from pytest_specdec.protocol.drafter import DrafterBase

#: the session's state, as the suite starts
ORIGINAL = (str(torch.get_default_dtype()), torch.get_num_threads())
SEEN = Path(__file__).parent / "seen.jsonl"

_load_target = pytest_specdec.engine.target.load_target


def careless_load_target(*args, **kwargs):
    """Model-loading code that leaves the default dtype changed."""
    target = _load_target(*args, **kwargs)
    torch.set_default_dtype(torch.float64)
    return target


pytest_specdec.engine.target.load_target = careless_load_target


class DtypeInBegin(DrafterBase):
    def begin(self, request):
        torch.set_default_dtype(torch.float64)


class ThreadsInBegin(DrafterBase):
    def begin(self, request):
        torch.set_num_threads(torch.get_num_threads() + 1)


class ChangesInFactory(DrafterBase):
    """Outside the engine's calls (its factory): the plugin sets it back after the case."""

    def __init__(self):
        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(torch.get_num_threads() + 1)


class Checks(DrafterBase):
    """Records the state its case runs with, and fails unless it is the session's."""

    def begin(self, request):
        seen = (str(torch.get_default_dtype()), torch.get_num_threads())
        with SEEN.open("a") as out:
            out.write(json.dumps(seen) + "\\n")
        assert seen == ORIGINAL, f"saw {seen}, the session started with {ORIGINAL}"


def pytest_specdec_register_drafters(config):
    return {"dtype_in_begin": DtypeInBegin, "threads_in_begin": ThreadsInBegin,
            "changes_in_factory": ChangesInFactory, "checks": Checks}
'''


def test_a_drafter_that_changes_torch_state_fails_its_own_case_only(suite, tiny_model_dir,
                                                                     tmp_path):
    suite.makeconftest(CONFTEST)
    drafters = ["dtype_in_begin", "threads_in_begin", "changes_in_factory", "checks"]
    args = ["-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
            "--specdec-problems", "1", "--specdec-max-new-tokens", "4", "--specdec-rounds", "1",
            "--specdec-paradigm", "multi_round", "--specdec-no-peer", "--benchmark-disable",
            "--specdec-report-dir", str(tmp_path / "reports"), "-rf", "--tb=short"]
    for name in drafters:
        args += ["--specdec-drafter", name]
    result = suite.runpytest_subprocess(*args, timeout=300)
    # the suite fixture runs torch on one thread (OMP_NUM_THREADS=1)
    result.stdout.fnmatch_lines_random([
        "FAILED *test_speculative[[]dtype_in_begin-multi_round[]]*",
        "*DraftError: drafter 'dtype_in_begin' broke the rule 'torch's global state is left "
        "unchanged': begin changed torch.get_default_dtype() from torch.float32 to torch.float64",
        "FAILED *test_speculative[[]threads_in_begin-multi_round[]]*",
        "*DraftError: drafter 'threads_in_begin' broke the rule 'torch's global state is left "
        "unchanged': begin changed torch.get_num_threads() from 1 to 2",
        f"*pytest-specdec: loading the target {str(tiny_model_dir)!r} changed "
        "torch.get_default_dtype() from torch.float32 to torch.float64; set back for the cases",
    ])
    result.assert_outcomes(passed=3, failed=2)
    # one timed round (the engine's warm-up ran in an earlier case): each sequence begun
    # with the session's state
    seen = (suite.path / "seen.jsonl").read_text().splitlines()
    assert seen and set(seen) == {'["torch.float32", 1]'}
