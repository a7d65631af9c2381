"""A benchmark session: the loaded target and problems, the baselines measured so far,
and the records of finished cases. The suites call into it; plugin/hooks.py wires it up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from pytest_specdec.bench.config import SpecdecConfig
from pytest_specdec.bench.lossless import TieMargin, check_lossless, resolve_tie_margin
from pytest_specdec.bench.paradigms import make_paradigm
from pytest_specdec.bench.peer import check_peer, hf_method, plain_peer_settings, pld_peer_settings
from pytest_specdec.bench.problems import Problem
from pytest_specdec.bench.progress import ProgressMeter, RunProgress
from pytest_specdec.bench.record import (OUR_PLD, PEER_PLAIN, PER_SEQUENCE, SCHEMA_VERSION, SHARED,
                                         CaseRecord)
from pytest_specdec.bench.runner import (DecodeSettings, Method, RunResult, engine_batch_method,
                                         engine_method, run_paradigm, run_paradigm_batched)
from pytest_specdec.engine.integrity import TargetChanged, TargetFingerprint
from pytest_specdec.engine.compiled import BOTH, ENGINES, resolve_engine
from pytest_specdec.engine.metrics import (ideal_speedup, mat_by_index, median_round,
                                           verify_steps)
from pytest_specdec.engine.loop import DRAFT_ROOM
from pytest_specdec.engine.target import Target
from pytest_specdec.engine.speedup import (SpeedupEstimate, round_scatter, speedup_estimate,
                                           step_costs, timing_flags)
from pytest_specdec.engine.timing import Probe, Reference, Timeline, wide_ratio
from pytest_specdec.protocol.drafter import (depth_profile, draft_depth, drafter_record_fields,
                                             serves_concurrent_sequences)
from pytest_specdec.protocol.registry import Registry
from pytest_specdec.protocol.spec import DrafterSpec

log = logging.getLogger("pytest_specdec")

#: Token budget of the warm-up sequences that precede a case's timed rounds.
WARMUP_TOKENS = 16
#: Tokens a later round's prompt adds to the question and the earlier answer (the
#: compiled path sizes its cache by it; a longer prompt grows the cache, recompiling)
ROUND_PROMPT_ROOM = 64


@dataclass(frozen=True)
class ParadigmCase:
    paradigm: str
    temperature: float
    explicit_temperature: bool = False
    batch: int = 1  # sequences decoded together (--specdec-batch)
    explicit_batch: bool = False  # --specdec-batch was given: the id names the size
    # the decode path (--specdec-engine: auto, eager or compiled; "both" makes a case of
    # each, whose ids name it)
    engine: str = "auto"
    explicit_engine: bool = False

    @property
    def id(self) -> str:
        out = self.paradigm
        if self.explicit_temperature:
            out += f"-T{self.temperature:g}"
        if self.explicit_batch:
            out += f"-b{self.batch}"
        if self.explicit_engine:
            out += f"-{self.engine}"
        return out

    @property
    def at_batch_1(self) -> ParadigmCase:
        return dataclasses.replace(self, batch=1)


def paradigm_cases(cfg: SpecdecConfig) -> list[ParadigmCase]:
    """Each paradigm at the asked temperatures, or at its own default temperature, at
    every asked batch size."""
    out = []
    engines = ENGINES if cfg.engine == BOTH else (cfg.engine,)
    for name in cfg.paradigms:
        temps = cfg.temperatures or (make_paradigm(name).default_temperature,)
        out += [ParadigmCase(name, t, cfg.temperatures is not None, b, cfg.batch_explicit,
                             e, cfg.engine == BOTH)
                for t in temps for b in cfg.batches for e in engines]
    return out


def worker_device(spec: str, worker: str, gpu_count: int) -> str:
    """The device one pytest-xdist worker uses: with ``--specdec-device`` ``auto`` or
    ``cuda`` and several GPUs visible (``gpu_count``, after ``CUDA_VISIBLE_DEVICES``),
    worker ``gwN`` takes ``cuda:<N % gpu_count>``, one GPU each. Anything else is used
    as given: ``cpu``, an explicit ``cuda:<index>``, one GPU or none, and a process that
    is not an xdist worker (``main``).

    >>> [worker_device("auto", w, 2) for w in ("gw0", "gw1", "gw2", "main")]
    ['cuda:0', 'cuda:1', 'cuda:0', 'auto']
    """
    number = re.fullmatch(r"gw(\d+)", worker)
    if spec not in ("auto", "cuda") or gpu_count < 2 or number is None:
        return spec
    return f"cuda:{int(number.group(1)) % gpu_count}"


@dataclass
class Measured:
    """The timed rounds of one method on one paradigm case; in paired timing, a drafter's
    case also holds the baseline rounds timed next to its own (``paired_baseline``)."""

    runs: list[RunResult]
    paired_baseline: list[RunResult] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return median_round([r.wall_s for r in self.runs])

    @property
    def last(self) -> RunResult:
        return self.runs[-1]


@dataclass
class SpecdecSession:
    config: SpecdecConfig
    registry: Registry
    problems: list[Problem]
    load_target: Callable[[], Target]
    #: the pytest-xdist worker this session runs on ("gw0", ...), or "main" without xdist
    worker: str = "main"
    records: list[dict[str, Any]] = field(default_factory=list)
    #: default drafters skipped for a missing prerequisite (their weights): name -> why
    unavailable: dict[str, str] = field(default_factory=dict)
    #: told where every run of a case stands (bench/progress.py): the plugin's live
    #: progress line (plugin/progress.py) sets it; None: nobody listens
    progress: Callable[[RunProgress], None] | None = None
    _target: Target | None = None
    _fingerprint: Any = None  # the target's as loaded (integrity.TargetFingerprint)
    _baselines: dict[ParadigmCase, Measured] = field(default_factory=dict)
    _peer_plain: dict[ParadigmCase, Measured] = field(default_factory=dict)
    #: (paradigm case, stack) pairs whose first-call costs a warm-up has already paid
    _warm: set[tuple[ParadigmCase, str]] = field(default_factory=set)
    #: the calibration workload of the loaded target, per decode path (a probe times
    #: the path it runs on; a case is calibrated by its own path's)
    _probes: dict[str, Probe] = field(default_factory=dict)
    #: plain decoding at batch 1 of a case asked for at batch > 1 only (untimed)
    _references: dict[ParadigmCase, RunResult] = field(default_factory=dict)
    #: every timed (probed) run of the session so far: the wide probes' reference
    _probed: list[Timeline] = field(default_factory=list)
    #: the near-tie margin per (target, dtype, decode path), measured once
    #: (lossless.resolve_tie_margin)
    _tie_margins: dict[tuple[str, str, str], TieMargin] = field(default_factory=dict)

    @property
    def target(self) -> Target:
        if self._target is None:
            self._target = self.load_target()
            self._fingerprint = TargetFingerprint.take(self._target.model)
            self._compile(self._target)
        return self._target

    def _compile(self, target: Target) -> None:
        """On the compiled path, every graph a sequence may use is compiled now, before
        any timed span (:meth:`CompiledForward.warm_up`), with room for the longest
        sequence the session can decode: the longest first prompt, every round's budget
        and answer, and the draft room."""
        cfg = self.config
        if cfg is None or target.compiled_refusal() or not any(
                resolve_engine(c.engine, target.device) == "compiled"
                for c in paradigm_cases(cfg)):
            return
        longest = max(len(target.encode_prompt(p.question)) for p in self.problems)
        capacity = longest + cfg.rounds * (cfg.max_new_tokens + ROUND_PROMPT_ROOM) + DRAFT_ROOM
        spent = target.compiled_forward().warm_up(capacity)
        log.info("compiled path: graphs compiled or loaded in %.1f s", spent)

    @property
    def loaded_target(self) -> Target | None:
        """The target if a case has loaded it, without loading it (None: not yet, or
        dropped after a case changed it)."""
        return self._target

    @property
    def probe(self) -> Probe:
        """The calibration probe (see :mod:`pytest_specdec.engine.timing`), on the first
        problem's prompt; made again for a reloaded target."""
        target = self.target
        probe = self._probes.get(target.engine)
        if probe is None or probe.target is not target:
            probe = self._probes[target.engine] = Probe(
                target, target.encode_prompt(self.problems[0].question))
        return probe

    def compile_text(self) -> str:
        """The compiled path's compilation, for the report's meta ("" when it did not
        run): the seconds paid before timing, and graphs compiled inside a decode (a
        width or capacity no warm-up foresaw: that decode's time includes it)."""
        compiled = self._target.compiled if self._target is not None else None
        if compiled is None or not compiled.graphs:
            return ""
        return (f"{len(compiled.graphs)} graphs compiled or loaded from inductor's cache in "
                f"{compiled.compile_s:.1f} s before any timed span; "
                f"{compiled.late_compiles} compiled inside a decode")

    def on_path(self, case: ParadigmCase) -> Target:
        """The target, set to decode on the case's path (every run of a case goes
        through here first)."""
        target = self.target
        target.engine = resolve_engine(case.engine, target.device)
        return target

    @property
    def depth_profile(self) -> str:
        """``reference`` or ``cpu``: what ``--specdec-depth-profile`` means for this
        session's target (``auto``: ``cpu`` on a CPU)."""
        return depth_profile(self.config.depth_profile, self.target.device.type)

    def settings(self, case: ParadigmCase, k: int = 0) -> DecodeSettings:
        return DecodeSettings(case.temperature, self.config.seed, self.config.max_new_tokens, k)

    # -- measuring ---------------------------------------------------------------

    def measure(self, case: ParadigmCase, make_method: Callable[[], Method], *,
                benchmark: Any = None, k: int = 0, stack: str = "engine",
                before_round: Callable[[], None] | None = None, label: str = "",
                rounds: int | None = None) -> Measured:
        """A short warm-up on the first problem, then the timed rounds over all problems.

        The warm-up pays first-call costs (kernel selection, lazy imports, caches) of
        the decoding stack: our engine or transformers' generate. It runs once per
        stack and paradigm case, in the first case that needs it (the baseline, or
        hf_generate), not again in every drafter's case: the target's kernels are then
        warm, and a drafter is built afresh for every timed round anyway.

        make_method is called per round, so a drafter starts every round afresh and
        nothing it learnt in one round (or in the warm-up) speeds up the next. Every
        timed round is calibrated by the session's probe; `before_round` (paired
        timing: a baseline round) runs before each timed round, untimed by
        pytest-benchmark. `label` names the method in the progress events
        (``pld-best_of_n``); `rounds`: the timed rounds (default ``timed_rounds``).
        """
        cfg = self.config
        self.on_path(case)
        rounds = rounds or cfg.timed_rounds
        paradigm = make_paradigm(case.paradigm, rounds=cfg.rounds, n=cfg.n)
        settings = self.settings(case, k)
        if (case, stack) not in self._warm:
            # every code path of the paradigm (prefill, decoding, the later rounds) at a
            # small budget: first-call costs, not the work
            warmup = dataclasses.replace(settings,
                                         max_new_tokens=min(WARMUP_TOKENS, cfg.max_new_tokens))
            self._run(case, paradigm, self.problems[:1], make_method(), warmup, None,
                      meter=self._meter(label, "warm-up"))
            self._warm.add((case, stack))
        runs: list[RunResult] = []
        probe = self.probe.reading

        def one_round(method: Method) -> None:
            runs.append(self._run(case, paradigm, self.problems, method, settings, probe,
                                  meter=self._meter(label, "timed round", len(runs) + 1,
                                                    rounds)))

        def fresh_method() -> tuple[tuple[Method], dict]:  # untimed: a model drafter loads here
            if before_round is not None:
                before_round()
            return (make_method(),), {}

        if benchmark is not None:
            try:
                benchmark.pedantic(one_round, setup=fresh_method, rounds=rounds,
                                   iterations=1, warmup_rounds=0)
            except BaseException:
                # pytest-benchmark marks a benchmark errored on an Exception only; after
                # Ctrl-C inside a round its --benchmark-save would save one with no
                # rounds, crash (min() of nothing) and take the session's summary with it
                benchmark.has_error = True
                raise
        # without a benchmark, or with a disabled one (--benchmark-disable, which runs
        # its target once), the remaining rounds run here
        while len(runs) < rounds:
            one_round(*fresh_method()[0])
        return Measured(runs)

    def _run(self, case: ParadigmCase, paradigm: Any, problems: list[Problem], method: Any,
             settings: DecodeSettings, probe: Callable[[], Any] | None, *,
             meter: ProgressMeter | None = None) -> RunResult:
        """One run of the paradigm, one sequence at a time or case.batch together
        (`method` then decodes a batch: runner.engine_batch_method); a probed run
        (a timed round) logs its progress."""
        progress = log.info if probe is not None else None
        self.on_path(case)
        if case.batch == 1:
            run = run_paradigm(self.target, paradigm, problems, method, settings,
                               progress=progress, probe=probe, meter=meter)
        else:
            run = run_paradigm_batched(self.target, paradigm, problems, method, settings,
                                       case.batch, progress=progress, probe=probe, meter=meter)
        if probe is not None:
            self._probed.append(run.timeline)
        return run

    def _meter(self, label: str, phase: str, round: int = 0,
               rounds: int | None = None) -> ProgressMeter | None:
        """A run's progress meter for :attr:`progress`, None when nobody listens;
        `rounds`: the timed rounds of the run (default ``timed_rounds``)."""
        if self.progress is None:
            return None
        return ProgressMeter(self.progress, label, phase, round,
                             rounds or self.config.timed_rounds)

    def baseline_method(self, case: ParadigmCase | None = None) -> Any:
        if case is not None and case.batch > 1:
            return engine_batch_method(self.target, None, batch=case.batch, k=0,
                                       drafter_name="baseline", exact=self.config.exact)
        return engine_method(self.target, None, k=0, drafter_name="baseline",
                             exact=self.config.exact)

    def baseline_round(self, case: ParadigmCase, round: int = 0) -> RunResult:
        """One calibrated baseline round (paired timing), not warmed: the baseline's
        case has paid its first-call costs. `round`: the timed round it pairs with."""
        cfg = self.config
        paradigm = make_paradigm(case.paradigm, rounds=cfg.rounds, n=cfg.n)
        return self._run(case, paradigm, self.problems, self.baseline_method(case),
                         self.settings(case), self.probe.reading,
                         meter=self._meter(f"baseline-{case.id}", "paired baseline round", round))

    def reference(self, case: ParadigmCase) -> RunResult:
        """What every case of `case` is judged against: plain decoding one sequence at
        a time (batch 1), so a batched run must give each sequence exactly what it gets
        alone. The batch-1 baseline's last round when measured, else one untimed run."""
        plain = case.at_batch_1
        if plain in self._baselines:
            return self._baselines[plain].last
        if plain not in self._references:
            cfg = self.config
            paradigm = make_paradigm(case.paradigm, rounds=cfg.rounds, n=cfg.n)
            self._references[plain] = run_paradigm(
                self.target, paradigm, self.problems, self.baseline_method(),
                self.settings(plain), meter=self._meter(f"baseline-{plain.id}", "reference"))
        return self._references[plain]

    def _judge(self, case: ParadigmCase, measured: Measured, label: str) -> Any:
        """Every token of every timed round (not just one round's) judged against plain
        decoding at batch 1 (:meth:`reference`)."""
        target = self.target
        verdict = check_lossless(target, self.reference(case).outputs,
                                 [(run.requests, run.outputs) for run in measured.runs],
                                 exact_mode=self.config.exact, tie_margin=self.tie_margin(),
                                 strict=self.config.strict, decode=target.decode)
        for tie in verdict.near_ties:
            log.info("near-tie accepted (%s): %s", label, tie.describe(target.decode))
        return verdict

    def tie_margin(self) -> TieMargin:
        """The half-precision check's near-tie margin: ``--specdec-tie-margin``, or
        measured once per target, dtype and decode path after the first problem's prompt."""
        target = self.target
        key = (target.name, str(target.dtype), target.path)
        if key not in self._tie_margins:
            margin = resolve_tie_margin(self.config.tie_margin, target,
                                        target.encode_prompt(self.problems[0].question),
                                        exact_mode=self.config.exact)
            if margin.source == "measured":
                log.info("near-tie margin of %s in %s: %s", target.name, target.dtype,
                         margin.summary())
            self._tie_margins[key] = margin
        return self._tie_margins[key]

    def baseline(self, case: ParadigmCase, benchmark: Any = None) -> Measured:
        """Plain decoding on our engine; measured once per session and paradigm case.

        Under pytest-xdist each worker has its own session: a speculative or peer case
        on a worker that has not run ``test_baseline`` for its paradigm case measures the
        baseline here first (our own warm-up and timed rounds, not pytest-benchmark's);
        only ``run_baseline_case`` adds a baseline record.
        """
        if case not in self._baselines or benchmark is not None:
            self._baselines[case] = self.measure(case, lambda: self.baseline_method(case),
                                                 benchmark=benchmark, label=f"baseline-{case.id}",
                                                 rounds=self.config.baseline_timed_rounds)
        return self._baselines[case]

    def round_scatter(self) -> float | None:
        """The machine's round-to-round timing scatter in this session
        (:func:`~pytest_specdec.engine.speedup.round_scatter` over the baselines measured
        so far, each in its own host-probe units); None before a baseline of two rounds."""
        rounds = [[r.timeline for r in m.runs] for m in self._baselines.values()]
        return round_scatter(rounds, [Reference.of(t, self._probed) for t in rounds])

    def peer_plain(self, case: ParadigmCase, benchmark: Any = None) -> Measured:
        if case not in self._peer_plain or benchmark is not None:
            target = self.target
            self._peer_plain[case] = self.measure(case, lambda: hf_method(target),
                                                  benchmark=benchmark, stack="generate",
                                                  label=f"{PEER_PLAIN}-{case.id}")
        return self._peer_plain[case]

    # -- the three kinds of case -------------------------------------------------

    def run_baseline_case(self, case: ParadigmCase, benchmark: Any) -> dict[str, Any]:
        with self._intact(f"baseline on {case.id}"):
            return self._baseline_case(case, benchmark)

    def run_speculative_case(self, spec: DrafterSpec, case: ParadigmCase,
                             benchmark: Any) -> dict[str, Any]:
        with self._intact(f"{spec.label} on {case.id}"):
            return self._speculative_case(spec, case, benchmark)

    def run_peer_case(self, peer: str, case: ParadigmCase, benchmark: Any) -> dict[str, Any]:
        """transformers' generate (plain, or prompt lookup with our pld's settings),
        timed like a drafter and checked against our baseline in every timed round:
        in fp32 a difference raises PeerMismatch (see peer.py)."""
        with self._intact(f"{peer} on {case.id}"):
            return self._peer_case(peer, case, benchmark)

    @contextlib.contextmanager
    def _intact(self, case_label: str) -> Iterator[None]:
        """After the case, whether it passed or failed: the target must be as loaded
        (:meth:`check_target_intact`); a change fails this case, named, and the next
        case reloads the target; the record the case added, if any, is taken back (the
        report holds the cases that passed)."""
        kept = len(self.records)
        try:
            yield
        except BaseException as exc:
            try:
                self.check_target_intact(case_label)
            except TargetChanged as changed:
                del self.records[kept:]
                raise changed from exc
            raise
        try:
            self.check_target_intact(case_label)
        except TargetChanged:
            del self.records[kept:]
            raise

    def _baseline_case(self, case: ParadigmCase, benchmark: Any) -> dict[str, Any]:
        measured = self.baseline(case, benchmark)
        if case.batch == 1:
            return self._record("baseline", "baseline", case, measured, measured,
                                lossless="exact")
        # a batched baseline is judged like a drafter, each sequence against its plain
        # decoding alone: a batched forward that leaks between rows fails here
        verdict = self._judge(case, measured, "baseline")
        return self._record("baseline", "baseline", case, measured, measured,
                            **verdict.summary())

    def _speculative_case(self, spec: DrafterSpec, case: ParadigmCase,
                          benchmark: Any) -> dict[str, Any]:
        base = self.baseline(case)
        registered = self.registry.get(spec.name)
        options = registered.convert_options(dict(spec.options))
        # the drafter's own depth (its max_depth), unless --specdec-k overrides it
        target, k = self.target, draft_depth(registered.factory, override=self.config.k,
                                             options=options, drafter=spec.label,
                                             profile=self.depth_profile)
        # the latest round's drafters (one per row of a batch): their record fields
        made: list[Any] = []

        def fresh_method() -> Any:
            if case.batch > 1:
                method = engine_batch_method(target, lambda: registered.create(**options),
                                             batch=case.batch, k=k, drafter_name=spec.label,
                                             step_timeout=self.config.step_timeout,
                                             exact=self.config.exact)
                made[:] = method.drafters  # one instance for every row, or one per row
                return method
            made[:] = [registered.create(**options)]
            return engine_method(target, made[-1], k=k, drafter_name=spec.label,
                                 step_timeout=self.config.step_timeout, exact=self.config.exact)

        paired: list[RunResult] = []
        before_round = (lambda: paired.append(self.baseline_round(case, len(paired) + 1))) \
            if self.config.timing == "paired" else None
        measured = self.measure(case, fresh_method, benchmark=benchmark, k=k,
                                before_round=before_round, label=f"{spec.label}-{case.id}")
        measured.paired_baseline = paired
        verdict = self._judge(case, measured, spec.label)
        return self._record("speculative", spec.label, case, measured, base,
                            drafter_options=dict(spec.options), k=k, **verdict.summary(),
                            **_instances_of(made, case.batch, spec.label),
                            **_record_fields_of(made))  # the last timed round's

    def _peer_case(self, peer: str, case: ParadigmCase, benchmark: Any) -> dict[str, Any]:
        target, k = self.target, 0
        if peer == PEER_PLAIN:
            measured = reference = self.peer_plain(case, benchmark)
            settings = plain_peer_settings()
        else:
            pld = self.registry.drafters.get(OUR_PLD)  # hf_pld copies our pld's settings
            pld_settings = pld_peer_settings(pld and pld.factory, self.config.k,
                                             self.depth_profile)
            k = pld_settings.prompt_lookup_num_tokens
            reference = self.peer_plain(case)
            measured = self.measure(
                case, lambda: hf_method(target, prompt_lookup_tokens=k,
                                        max_ngram=pld_settings.max_matching_ngram_size),
                benchmark=benchmark, k=k, stack="generate", label=f"{peer}-{case.id}")
            settings = pld_settings.as_record()
        verdict = check_peer(self.baseline(case).last.outputs,
                             [run.outputs for run in measured.runs], peer=peer,
                             dtype=target.dtype, decode=target.decode)
        if verdict.description is not None:
            log.warning("%s differs from our baseline in half precision (timed round %s): %s",
                        peer, verdict.timed_round, verdict.description)
        divergence = {} if verdict.description is None else {"peer_divergence": verdict.description}
        return self._record("peer", peer, case, measured, reference, lossless=verdict.label, k=k,
                            peer_settings=settings, **divergence)

    def _engine_of(self, role: str, case: ParadigmCase) -> str:
        """The decode path a case's forwards ran on (CaseRecord.engine)."""
        if role == "peer":
            return "eager (transformers generate)"
        if self.config.exact:
            return "eager (exact mode)"
        if case.batch > 1:
            return "eager (batched)"
        return self.on_path(case).path

    def _record(self, role: str, drafter: str, case: ParadigmCase, measured: Measured,
                reference: Measured, *, lossless: str, drafter_options: dict[str, str] | None = None,
                k: int = 0, **fields: Any) -> dict[str, Any]:
        """The case's record (:class:`~pytest_specdec.bench.record.CaseRecord`, which
        checks it), kept for the session's report and returned for ``extra_info``;
        ``fields``: what only some cases carry (the lossless check's details, the
        drafter's own fields, a peer's settings)."""
        cfg, target, run = self.config, self.target, measured.last
        stats = run.stats
        record = CaseRecord(
            specdec_schema=SCHEMA_VERSION,
            role=role,
            drafter=drafter,
            drafter_options=drafter_options or {},
            paradigm=case.paradigm,
            temperature=case.temperature,
            batch=case.batch,
            target=target.name,
            dtype=str(target.dtype).removeprefix("torch."),
            device=str(target.device),
            worker=self.worker,
            engine=self._engine_of(role, case),
            k=k,
            depth_profile=self.depth_profile,
            profile=cfg.profile,
            problems=len(self.problems),
            max_new_tokens=cfg.max_new_tokens,
            sequences=len(run.outputs),
            new_tokens=stats.new_tokens,
            steps=stats.steps,
            drafted=stats.drafted,
            accepted=stats.accepted,
            mat=round(stats.mat, 4),
            mat_by_round=[round(m, 4) for m in mat_by_index(
                (key[2], g.stats) for key, g in run.outputs.items())],
            mat_by_sample=[round(m, 4) for m in mat_by_index(
                (key[1], g.stats) for key, g in run.outputs.items())],
            acceptance_rate=None if stats.acceptance_rate is None else round(stats.acceptance_rate, 4),
            per_position_acceptance=[round(p, 4) for p in stats.per_position_acceptance],
            draft_share=round(stats.draft_share, 4),
            tokens_per_s=round(stats.new_tokens / measured.wall_s, 3),
            wall_s_rounds=[round(r.wall_s, 4) for r in measured.runs],
            wall_s=round(measured.wall_s, 4),
            baseline_wall_s=round(reference.wall_s, 4),
            **self._timing_fields(measured, reference, own_reference=measured is reference,
                                  mat=stats.mat),
            accuracy=round(run.accuracy, 4),
            output_sha256=run.digest,
            lossless=lossless,
            **fields,
        ).as_dict()
        self.records.append(record)
        return record

    def _timing_fields(self, measured: Measured, reference: Measured, *, own_reference: bool,
                       mat: float) -> dict[str, Any]:
        """The speedup with its uncertainty, and the step costs that explain it
        (definitions: :mod:`pytest_specdec.engine.timing`, :func:`metrics.ideal_speedup`).

        Costs are calibrated (probe units) before they are compared, then shown in
        milliseconds at this case's machine speed (its median probe)."""
        paired = bool(measured.paired_baseline)
        base_runs = measured.paired_baseline or reference.runs
        # one conversion of host-probe units for both runs (drafting's calibration), and
        # the session's typical wide-forward cost for pricing forwards by their width
        ref = Reference.of([r.timeline for r in (*base_runs, *measured.runs)], self._probed)
        scatter = self.round_scatter()
        if own_reference:
            estimate = SpeedupEstimate(1.0, 1.0, 0.0, 1.0, 1.0)
        else:
            estimate = speedup_estimate([r.timeline for r in base_runs],
                                        [r.timeline for r in measured.runs],
                                        len(self.problems), paired=paired, ref=ref,
                                        scatter=scatter)
        probe_s = median_round([r.timeline.probe_s for r in measured.runs])
        base_probe_s = median_round([r.timeline.probe_s for r in base_runs])
        host_s = [h for r in measured.runs if (h := r.timeline.host_probe_s)]
        base_host_s = [h for r in base_runs if (h := r.timeline.host_probe_s)]
        base_costs, own_costs = step_costs(base_runs, ref), step_costs(measured.runs, ref)

        def ms(units: float | None) -> float | None:
            return None if units is None else round(units * probe_s * 1e3, 3)

        ideal = verify_cost = None
        if base_costs is not None and own_costs is not None and not own_reference:
            ideal = ideal_speedup(mat, base_costs.forward, own_costs.forward, own_costs.draft)
            verify_cost = verify_steps(own_costs.forward, base_costs.forward)
        over_ideal = None if ideal is None else estimate.value / ideal
        return {
            "timing": self.config.timing,
            "speedup": round(estimate.value, 4),
            "speedup_raw": round(estimate.raw, 4),
            "speedup_noise": round(estimate.noise, 4),
            "round_scatter": None if scatter is None else round(scatter, 4),
            "speedup_problems_low": round(estimate.problems_low, 4),
            "speedup_problems_high": round(estimate.problems_high, 4),
            "probe_ms": round(probe_s * 1e3, 3),
            # > 1: the machine was slower during this case than during its baseline
            "machine_slowdown": round(probe_s / base_probe_s, 4) if base_probe_s > 0 else None,
            # the same for the host probe (Python, what drafting runs on)
            "host_slowdown": (round(median_round(host_s) / median_round(base_host_s), 4)
                              if host_s and base_host_s else None),
            # > 1: a wide forward cost more, in one-token forwards, than is typical of
            # the session so far (the figure forwards are priced at, by their width)
            "wide_slowdown": (round(own_wide / ref.wide, 4)
                              if (own_wide := wide_ratio([r.timeline for r in measured.runs]))
                              and ref.wide else None),
            "t_step_ms": ms(base_costs and base_costs.forward),
            "t_verify_ms": None if own_reference else ms(own_costs and own_costs.forward),
            "t_draft_ms": None if own_reference else ms(own_costs and own_costs.draft),
            "verify_width": (None if own_reference or own_costs is None
                             else round(own_costs.width, 2)),
            "verify_steps": None if verify_cost is None else round(verify_cost, 4),
            "ideal_speedup": None if ideal is None else round(ideal, 4),
            "measured_over_ideal": None if over_ideal is None else round(over_ideal, 4),
            "timing_flags": timing_flags(over_ideal, estimate.noise),
        }

    def check_target_intact(self, case_label: str) -> None:
        """Raise TargetChanged, naming `case_label` and what changed, if the loaded target
        differs from how it was loaded (see pytest_specdec.engine.integrity; ~50 ms for the
        default target on a CPU). The target is dropped first, so the next case reloads
        it through load_target: no case runs on weights an earlier one changed. The
        baselines measured so far were measured before the change and are kept."""
        if self._target is None or self._fingerprint is None:
            return
        changes = self._fingerprint.changes(self._target.model)
        if changes:
            size, self._target, self._fingerprint = self._fingerprint.size, None, None
            raise TargetChanged.of(case_label, changes, size)


def _instances_of(drafters: list[Any], batch: int, name: str) -> dict[str, str]:
    """The record's ``drafter_instances`` at batch > 1: ``shared`` when one instance
    served every row (the drafter, a hybrid included, declares ``concurrent_sequences``;
    :func:`~pytest_specdec.bench.runner.engine_batch_method` decides), ``per sequence``
    otherwise; nothing at batch 1."""
    if batch == 1 or not drafters:
        return {}
    shared = serves_concurrent_sequences(drafters[0], name)
    return {"drafter_instances": SHARED if shared else PER_SEQUENCE}


def _record_fields_of(drafters: list[Any]) -> dict[str, Any]:
    """The record fields of a case's drafters: the first one's, a hybrid's part counts
    added up over every row's instance (one per row of a batch)."""
    fields = drafter_record_fields(drafters[0])
    parts: dict[str, dict] = {}
    for drafter in drafters:
        for name, counts in drafter_record_fields(drafter).get("hybrid_parts", {}).items():
            total = parts.setdefault(name, {})
            for key, value in counts.items():
                total[key] = total.get(key, 0) + value
    if parts:
        fields["hybrid_parts"] = parts
    return fields
