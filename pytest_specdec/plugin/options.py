"""Every --specdec-* option, defined once, each with a validator passed as ``type=``.

Syntax is checked when the command line is parsed; what needs the registry or the
file system (drafter names and options, model and dataset paths) is checked in
:func:`resolve` before any case runs. The defaults are sized so the default suite
finishes in about ten minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from pytest_specdec.bench.config import SpecdecConfig
from pytest_specdec.bench.paradigms import PARADIGM_NAMES
from pytest_specdec.bench.profiles import DEFAULT_PROFILE, PROFILE_OPTIONS, PROFILES, describe
from pytest_specdec.bench.problems import DEFAULT_PROBLEMS
from pytest_specdec.bench.record import GATED_METRICS, PEER_NAMES, PEER_PLAIN
from pytest_specdec.engine.timing import BASELINE_ROUNDS, TIMING_MODES
from pytest_specdec.plugin.values import (batch_sizes, compare_fail, non_negative_float,
                                          non_negative_int, positive_float, positive_int)
from pytest_specdec.protocol.drafter import (CPU_PROFILE_DEPTH, DEFAULT_MAX_DEPTH, DEPTH_PROFILES,
                                             MAX_DRAFT_NODES)
from pytest_specdec.protocol.spec import parse_drafter_spec


def _draft_depth(text: str) -> int:
    """--specdec-k: a depth in [1, MAX_DRAFT_NODES] (a deeper chain fits in no draft)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_DRAFT_NODES:
        raise argparse.ArgumentTypeError(
            f"expected a draft depth in 1..{MAX_DRAFT_NODES}, got {text!r}")
    return value


def _tie_margin(text: str) -> float | None:
    """--specdec-tie-margin: 'auto' (None: measured on the target) or a number of logits >= 0."""
    if text == "auto":
        return None
    try:
        return non_negative_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a number of logits >= 0, got {text!r}") from None


def _depth_profile(text: str) -> str:
    if text not in DEPTH_PROFILES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(DEPTH_PROFILES)}, got {text!r}")
    return text


def _timing_mode(text: str) -> str:
    if text not in TIMING_MODES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(TIMING_MODES)}, got {text!r}")
    return text


LOSSLESS_MODES = ("auto", "exact")


def _engine(text: str) -> str:
    from pytest_specdec.engine.compiled import BOTH, ENGINES

    if text not in ("auto", *ENGINES, BOTH):
        raise argparse.ArgumentTypeError(
            f"expected one of auto, {', '.join(ENGINES)}, {BOTH}, got {text!r}")
    return text


def _lossless_mode(text: str) -> str:
    if text not in LOSSLESS_MODES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(LOSSLESS_MODES)}, got {text!r}")
    return text


def _profile(text: str) -> str:
    if text not in PROFILES:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(PROFILES)}, got {text!r}")
    return text


def _temperatures(text: str) -> tuple[float, ...]:
    """Comma-separated temperatures, each >= 0."""
    values = tuple(non_negative_float(t.strip()) for t in text.split(",") if t.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected temperatures like 0 or 0,0.6, got {text!r}")
    return values


def _names(text: str, available: Sequence[str], what: str, *, extra: str = "") -> tuple[str, ...]:
    """Comma-separated names, each one of `available` (`extra` is added to the error's
    list of what is accepted)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or text!r}; "
                                         f"available: {', '.join(available)}{extra}")
    return names


def _paradigms(text: str) -> tuple[str, ...]:
    return _names(text, PARADIGM_NAMES, "paradigm")


#: ``--specdec-peer``'s default: plain generate, our baseline's independent reference
DEFAULT_PEERS = (PEER_PLAIN,)


def _peers(text: str) -> tuple[str, ...]:
    """Comma-separated peer names, or "none"."""
    if text.strip() == "none":
        return ()
    return tuple(dict.fromkeys(_names(text, PEER_NAMES, "peer", extra=", or none")))


def _device(text: str) -> str:
    if text in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:<index>, got {text!r}")


def _dtype(text: str) -> str:
    choices = ("auto", "float32", "float16", "bfloat16")
    if text in choices:
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {text!r}")


@dataclass(frozen=True)
class Option:
    flag: str
    dest: str
    help: str
    default: Any = None
    type: Callable[[str], Any] | None = None
    action: str | None = None
    metavar: str | None = None


OPTIONS = (
    Option("--specdec-profile", "specdec_profile", default=DEFAULT_PROFILE, type=_profile,
           metavar="PROFILE",
           help="the run's size, several options at once (an option given explicitly "
                "overrides its profile's value): "
                + " | ".join(f"{p.name}: {describe(p)}".replace("%", "%%")
                             for p in PROFILES.values())
                + f" (default: {DEFAULT_PROFILE})"),
    Option("--specdec-target", "specdec_target", default="embedded", metavar="MODEL",
           help="target model: 'embedded' (SmolLM2-135M-Instruct, offline), a local model "
                "folder, a config .json (random weights), or a Hugging Face id"),
    Option("--specdec-device", "specdec_device", default="auto", type=_device,
           help="auto (cuda if available), cpu, cuda or cuda:<index>"),
    Option("--specdec-dtype", "specdec_dtype", default="auto", type=_dtype,
           help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16 or bfloat16"),
    Option("--specdec-trust-remote-code", "specdec_trust_remote_code", action="store_true",
           default=False, help="allow model code from the hub (off unless you ask)"),
    Option("--specdec-drafter", "specdec_drafters", action="append", type=parse_drafter_spec,
           metavar="NAME[:k=v,...]",
           help="drafter to run, with options (repeatable); default: every registered drafter"),
    Option("--specdec-paradigm", "specdec_paradigms", type=_paradigms, default=PARADIGM_NAMES,
           metavar="NAMES", help=f"comma-separated paradigms; default: {','.join(PARADIGM_NAMES)}"),
    Option("--specdec-dataset", "specdec_dataset", default="embedded", metavar="SOURCE",
           help="'embedded' (our own problems), a .jsonl/.json file, or a Hugging Face "
                "dataset name (owner/name[:config]; needs `datasets`)"),
    Option("--specdec-dataset-split", "specdec_dataset_split", default="test", metavar="SPLIT",
           help="split of a Hugging Face dataset (default: test)"),
    Option("--specdec-problems", "specdec_problems", default=DEFAULT_PROBLEMS, type=positive_int, metavar="N",
           help="number of problems per case (default: 2)"),
    Option("--specdec-max-new-tokens", "specdec_max_new_tokens", default=96, type=positive_int,
           metavar="N", help="token budget of each generated sequence (default: 96)"),
    Option("--specdec-n", "specdec_n", default=4, type=positive_int, metavar="N",
           help="samples per problem for best_of_n (default: 4)"),
    Option("--specdec-rounds", "specdec_rounds", default=2, type=positive_int, metavar="N",
           help="rounds for multi_round (default: 2)"),
    Option("--specdec-temperature", "specdec_temperatures", type=_temperatures, metavar="T[,T]",
           help="temperatures to run every paradigm at; default: each paradigm's own "
                "(multi_round 0, best_of_n 0.6)"),
    Option("--specdec-seed", "specdec_seed", default=0, type=non_negative_int, metavar="SEED",
           help="base seed of coupled sampling (default: 0)"),
    Option("--specdec-k", "specdec_k", type=_draft_depth, metavar="K",
           help="draft depth (tokens one step can accept) for every drafter, overriding "
                "each drafter's own max_depth; hf_pld follows pld's (default: each "
                f"drafter's own; {DEFAULT_MAX_DEPTH} for one that declares none)"),
    Option("--specdec-depth-profile", "specdec_depth_profile", default="reference",
           type=_depth_profile, metavar="PROFILE",
           help="draft depths: reference (each drafter's reference depth), cpu (those "
                f"capped at {CPU_PROFILE_DEPTH}: deep drafts that are mostly wrong lose on "
                "a CPU), auto (cpu for a target on a CPU, else reference); default: "
                "reference"),
    Option("--specdec-batch", "specdec_batch", type=batch_sizes, metavar="B[,B...]",
           help="batch sizes: every case runs at each, its sequences decoded B at a time "
                "(best_of_n: the N samples of a problem together, several problems when B "
                "> N; multi_round: round r of B problems together), each sequence still "
                "checked against plain decoding alone; peers run at batch 1 (default: 1, "
                "on a CPU and a GPU alike: the reference table is at batch 1; ask for "
                "e.g. 1,8,32 on a GPU to see where speculative decoding stops paying)"),
    Option("--specdec-timed-rounds", "specdec_timed_rounds", default=1, type=positive_int,
           metavar="N", help="timed rounds per case after one warm-up; the median is "
                             "reported (default: 1)"),
    Option("--specdec-baseline-rounds", "specdec_baseline_rounds", default=BASELINE_ROUNDS,
           type=positive_int, metavar="N",
           help="timed rounds of each baseline (at least --specdec-timed-rounds); its "
                "median round is the time every speedup divides, and the rounds' spread "
                "(the machine's round-to-round scatter) enters every speedup's noise; 1 "
                f"measures no scatter (default: {BASELINE_ROUNDS}; the smoke profile: 1)"),
    Option("--specdec-timing", "specdec_timing", default="calibrated", type=_timing_mode,
           metavar="MODE",
           help="how speedups cancel a machine whose speed changes during the session: "
                "calibrated (a short probe of the target before every sequence; each run "
                "in units of the machine's speed then; about 5%% more time) or paired "
                "(also a fresh baseline round next to every timed round of a case, the "
                "speedup the median of the paired ratios; about twice the time); "
                "default: calibrated"),
    Option("--specdec-step-ms", "specdec_step_ms", type=positive_float(False), metavar="MS",
           help="the start-of-session estimate of the run's length uses this decode-step "
                "cost of the target (milliseconds) instead of measuring it on the loaded "
                "target; with --collect-only no model is loaded, so a run on another "
                "machine can be sized here (default: measured)"),
    Option("--specdec-expected-speedup", "specdec_expected_speedup",
           type=positive_float(False), metavar="X",
           help="the speedup the estimate assumes for a drafter's case that no earlier "
                "report in --specdec-report-dir measured on this target (default: the "
                "built-in drafters' mean on a 2-core CPU, 1.25 at T=0 and 0.75 at T>0)"),
    Option("--specdec-report-dir", "specdec_report_dir", default="reports", metavar="DIR",
           help="where the session's Markdown/CSV/JSON report goes (default: reports/ "
                "under the rootdir); never overwrites"),
    Option("--specdec-peer", "specdec_peers", default=DEFAULT_PEERS, type=_peers,
           metavar="NAMES",
           help="Hugging Face peer cases: comma-separated from hf_generate (plain "
                "generate, the independent check of our baseline), hf_pld (its prompt "
                "lookup with our pld's settings), or none (default: hf_generate)"),
    Option("--specdec-no-peer", "specdec_no_peer", action="store_true", default=False,
           help="skip the peer cases (the same as --specdec-peer none)"),
    Option("--specdec-ablations", "specdec_ablations", action="store_true", default=False,
           help="with the default drafter set: also each drafter's ablation variants (the "
                "option sets it declares in `ablations`, e.g. sam:share_group=false)"),
    Option("--specdec-lossless", "specdec_lossless", default="auto", type=_lossless_mode,
           metavar="MODE",
           help="auto: equality with plain decoding in float32, every token judged "
                "teacher-forced in float16/bfloat16; exact: row-invariant attention in "
                "baseline and speculative forwards, equality in every dtype (default: auto)"),
    Option("--specdec-engine", "specdec_engine", default="auto", type=_engine,
           metavar="PATH",
           help="the decode path of the baseline and every drafter: eager (transformers' "
                "forward over a dynamic cache) or compiled (a static cache and forwards "
                "compiled for fixed widths, CUDA graphs on CUDA); both: every case on each "
                "path, side by side (case ids end in -eager / -compiled); auto: compiled on "
                "CUDA, on a CPU the path measured faster there (docs/engine.md) "
                "(default: auto)"),
    Option("--specdec-strict", "specdec_strict", action="store_true", default=False,
           help="fail a case on a half-precision near-tie divergence too"),
    Option("--specdec-tie-margin", "specdec_tie_margin", default=None, type=_tie_margin,
           metavar="M", help="in float16/bfloat16, a token within M logits of the target's "
                             "teacher-forced choice is a near-tie; auto: measured once per "
                             "session on the target (twice the largest logit gap between "
                             "its decode and verify forwards and a teacher-forced one) "
                             "(default: auto)"),
    Option("--specdec-step-timeout", "specdec_step_timeout", default=10.0,
           type=non_negative_float, metavar="S",
           help="fail a drafter's case when one of its calls (propose, accept, ...) takes "
                "longer than S seconds; 0: no limit (default: 10)"),
    Option("--specdec-compare", "specdec_compare", metavar="RUN.json",
           help="a saved run (pytest-benchmark JSON) to compare this session's cases with"),
    Option("--specdec-compare-fail", "specdec_compare_fail", type=compare_fail,
           metavar="METRIC:DROP,...",
           help="with --specdec-compare: fail the session when a metric of a case drops by "
                "more than DROP, e.g. speedup:10%%,mat:5%% (metrics: "
                + ", ".join(GATED_METRICS) + ")"),
)


#: dest -> the option's own default, for the options a profile may set: those are
#: registered with the default None, so read_config can tell "given" from "not given"
PROFILED_DEFAULTS = {o.dest: o.default for o in OPTIONS if o.dest in PROFILE_OPTIONS.values()}


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("specdec", "speculative decoding benchmarks (pytest-specdec)")
    for opt in OPTIONS:
        default = None if opt.dest in PROFILED_DEFAULTS else opt.default
        kwargs: dict[str, Any] = {"dest": opt.dest, "help": opt.help, "default": default}
        for name in ("type", "action", "metavar"):
            if getattr(opt, name) is not None:
                kwargs[name] = getattr(opt, name)
        group.addoption(opt.flag, **kwargs)


def _resolver(config: pytest.Config) -> Callable[[str], Any]:
    """getoption, with --specdec-profile's values for the options not given."""
    profile = PROFILES[config.getoption("specdec_profile")]
    by_dest = {dest: getattr(profile, name) for name, dest in PROFILE_OPTIONS.items()}

    def get(dest: str) -> Any:
        value = config.getoption(dest)
        if value is not None or dest not in PROFILED_DEFAULTS:
            return value
        chosen = by_dest[dest]
        return chosen if chosen is not None else PROFILED_DEFAULTS[dest]

    return get


def read_config(config: pytest.Config) -> SpecdecConfig:
    get = _resolver(config)
    report_dir = Path(get("specdec_report_dir")).expanduser()
    if not report_dir.is_absolute():
        report_dir = Path(config.rootpath) / report_dir
    drafters = get("specdec_drafters")
    batches = get("specdec_batch")
    return SpecdecConfig(
        target=get("specdec_target"), device=get("specdec_device"), dtype=get("specdec_dtype"),
        trust_remote_code=get("specdec_trust_remote_code"),
        drafters=tuple(dict.fromkeys(drafters)) if drafters else None,
        drafters_named=config.getoption("specdec_drafters") is not None,
        profile=get("specdec_profile"),
        paradigms=tuple(dict.fromkeys(get("specdec_paradigms"))),
        dataset=get("specdec_dataset"), dataset_split=get("specdec_dataset_split"),
        problems=get("specdec_problems"), max_new_tokens=get("specdec_max_new_tokens"),
        n=get("specdec_n"), rounds=get("specdec_rounds"),
        temperatures=get("specdec_temperatures"), seed=get("specdec_seed"), k=get("specdec_k"),
        timed_rounds=get("specdec_timed_rounds"), timing=get("specdec_timing"),
        baseline_rounds=get("specdec_baseline_rounds"),
        report_dir=report_dir,
        peers=() if get("specdec_no_peer") else get("specdec_peers"),
        ablations=get("specdec_ablations"), strict=get("specdec_strict"),
        tie_margin=get("specdec_tie_margin"), exact=get("specdec_lossless") == "exact",
        depth_profile=get("specdec_depth_profile"), step_timeout=get("specdec_step_timeout"),
        compare=Path(get("specdec_compare")).expanduser() if get("specdec_compare") else None,
        compare_fail=get("specdec_compare_fail") or (),
        batches=batches or (1,), batch_explicit=batches is not None,
        step_ms=get("specdec_step_ms"), expected_speedup=get("specdec_expected_speedup"),
        engine=get("specdec_engine"),
    )
