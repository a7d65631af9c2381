"""Running one paradigm over a problem set with one decoding method.

A *method* turns (prompt ids, group, sample, round) into a Generation: the engine
with or without a drafter, or a peer implementation. The runner builds the generate
function a paradigm sees, and collects every output and its statistics.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

from pytest_specdec.bench.paradigms import (BestOfN, Completion, MultiRound, Outcome,
                                            SequenceAsk)
from pytest_specdec.bench.problems import Problem
from pytest_specdec.bench.progress import ProgressMeter
from pytest_specdec.engine.batch import generate_batch
from pytest_specdec.engine.guard import attach
from pytest_specdec.engine.loop import Generation, GenerationRequest, generate
from pytest_specdec.engine.metrics import SpecDecodingStats, accuracy, output_digest
from pytest_specdec.engine.target import Target
from pytest_specdec.engine.timing import Timeline, forward_load
from pytest_specdec.protocol.drafter import Drafter, serves_concurrent_sequences
from pytest_specdec.protocol.sampling import Sampler

#: (problem key, sample, round): one generated sequence of a paradigm run
SequenceKey = tuple[str, int, int]


def sequence_seed(base_seed: int, group: str, sample: int, round: int) -> int:
    """The coupled-sampling seed of one sequence: a pure function of its identity, so
    every method (and every process) samples sequence (group, sample, round) alike."""
    digest = hashlib.sha256(f"{base_seed}|{group}|{sample}|{round}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass(frozen=True)
class DecodeSettings:
    temperature: float
    seed: int
    max_new_tokens: int
    k: int = 0

    def request(self, prompt_ids: Sequence[int], group: str, sample: int, round: int) -> GenerationRequest:
        sampler = Sampler(self.temperature, sequence_seed(self.seed, group, sample, round))
        return GenerationRequest(tuple(prompt_ids), self.max_new_tokens, sampler,
                                 group=group, sample=sample, round=round)


#: decodes one request; the runner times nothing itself but the whole run
Method = Callable[[GenerationRequest], Generation]
#: decodes several requests together (one batch), in order
BatchMethod = Callable[[Sequence[GenerationRequest]], list[Generation]]
#: the per-step token count a method that ``reports_tokens`` is handed (``on_tokens=``)
TokenSink = Callable[[int], None]


def _call(method: Callable, requests: object, sink: TokenSink | None) -> object:
    """method(requests), with the meter's per-step sink if the method reports tokens
    (our engine's; a peer's or a test's method is called as before)."""
    if sink is None or not getattr(method, "reports_tokens", False):
        return method(requests)
    return method(requests, on_tokens=sink)


def engine_method(target: Target, drafter: Drafter | None, *, k: int, drafter_name: str,
                  step_timeout: float = 0.0, exact: bool = False) -> Method:
    """Our engine; one drafter instance serves every sequence of the run, so it can
    share what it learns across the samples and rounds of a problem. step_timeout
    bounds each call into the drafter (seconds, 0: no limit); exact selects the
    row-invariant forwards of exact mode (see engine.generate). The drafter is attached
    to the target here, before any sequence is timed (a model drafter loads its
    weights in ``attach``)."""
    if drafter is not None:
        attach(target, drafter, drafter_name, step_timeout=step_timeout)

    def decode(request: GenerationRequest, on_tokens: TokenSink | None = None) -> Generation:
        return generate(target, request, drafter, k=k, drafter_name=drafter_name,
                        step_timeout=step_timeout, exact=exact, on_tokens=on_tokens)

    decode.reports_tokens = True  # type: ignore[attr-defined]
    return decode


def engine_batch_method(target: Target, make_drafter: Callable[[], Drafter] | None, *,
                        batch: int, k: int, drafter_name: str,
                        step_timeout: float = 0.0, exact: bool = False) -> BatchMethod:
    """Our batched engine (:func:`pytest_specdec.batch.generate_batch`): one drafter
    instance per row of the batch (a drafter serves one open sequence at a time), made
    and attached here, before any batch is timed; row i of every batch is served by
    instance i, so each instance sees its row's sequences one after another. A drafter
    that declares ``concurrent_sequences`` is made once and serves every row (it opens
    a handle per sequence), so it sees all of a case's sequences, as at batch 1. exact:
    exact mode's forwards, as in :func:`engine_method`."""
    slots: list[Drafter] = []
    concurrent = False
    if make_drafter is not None:
        slots = [make_drafter()]
        concurrent = serves_concurrent_sequences(slots[0], drafter_name)
        slots += [] if concurrent else [make_drafter() for _ in range(batch - 1)]
        for drafter in slots:
            attach(target, drafter, drafter_name, step_timeout=step_timeout)

    def decode(requests: Sequence[GenerationRequest],
               on_tokens: TokenSink | None = None) -> list[Generation]:
        drafters = (slots * len(requests) if concurrent else slots[:len(requests)]) \
            if slots else None
        return generate_batch(target, requests, drafters, k=k, drafter_name=drafter_name,
                              step_timeout=step_timeout, exact=exact, on_tokens=on_tokens)

    decode.drafters = slots  # type: ignore[attr-defined]
    decode.reports_tokens = True  # type: ignore[attr-defined]
    return decode


@dataclass
class RunResult:
    outputs: dict[SequenceKey, Generation] = field(default_factory=dict)
    # what each sequence was asked: its prompt (in multi-round, built from the earlier
    # rounds' own outputs) and its sampler; the losslessness check replays them
    requests: dict[SequenceKey, GenerationRequest] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    stats: SpecDecodingStats = field(default_factory=SpecDecodingStats)
    wall_s: float = 0.0  # the run's seconds, calibration probes excluded
    # the run cut into segments by calibration probes (see pytest_specdec.engine.timing)
    timeline: Timeline = field(default_factory=Timeline)
    # per output (in order), the timeline segment it was decoded in: its own at batch
    # 1, its batch's at batch > 1
    segment_of: list[int] = field(default_factory=list)
    batch: int = 1

    @property
    def accuracy(self) -> float:
        return accuracy(o.correct for o in self.outcomes)

    @property
    def digest(self) -> str:
        return output_digest(g.tokens for g in self.outputs.values())


def run_paradigm(target: Target, paradigm: MultiRound | BestOfN, problems: Sequence[Problem],
                 method: Method, settings: DecodeSettings,
                 progress: Callable[[str], None] | None = None,
                 probe: Callable[[], float] | None = None,
                 meter: ProgressMeter | None = None) -> RunResult:
    """Run the paradigm on every problem; wall_s covers the whole run end to end, but
    for the calibration `probe` (see :mod:`pytest_specdec.engine.timing`), which runs before
    every sequence and after the last, untimed. `progress` gets a line per problem (the
    session logs it), `meter` every finished sequence (the live progress line) and,
    from a method that reports them, the tokens of every step."""
    result = RunResult(timeline=Timeline(probe))
    if meter is not None:
        meter.start(paradigm.name, len(problems) * paradigm.sequences_per_problem, len(problems))
    current = 0  # the problem being run

    def generate_fn(prompt: str, *, group: str, sample: int, round: int) -> Completion:
        result.timeline.cut(current)
        request = settings.request(target.encode_prompt(prompt), group, sample, round)
        sink = meter.decoding(1, request.max_new_tokens) if meter is not None else None
        generation = _call(method, request, sink)
        result.requests[(group, sample, round)] = request
        result.outputs[(group, sample, round)] = generation
        result.segment_of.append(len(result.timeline.probes) - 1)
        result.stats.merge(generation.stats)
        if meter is not None:
            meter.add(1, current + 1, len(generation.tokens))
        return Completion(target.decode(generation.tokens), tuple(generation.tokens))

    for current, problem in enumerate(problems):
        if progress is not None:
            progress(f"{paradigm.name}: problem {current + 1}/{len(problems)} ({problem.key})")
        result.outcomes.append(paradigm.run(problem, generate_fn))
    return _finished(result)


def _finished(result: RunResult) -> RunResult:
    result.timeline.finish()
    # drafting is calibrated by the host probes (see pytest_specdec.engine.timing)
    result.timeline.assign_drafting(result.segment_of,
                                    [g.stats.drafter_s for g in result.outputs.values()])
    # per-segment forwards: the check for stalls the probes missed (Timeline.stall_units)
    result.timeline.assign_forwards(result.segment_of,
                                    [len(g.steps) for g in result.outputs.values()])
    # the target's forwards are priced at their width (timing.width_factor)
    result.timeline.assign_forward_load(result.segment_of,
                                        [forward_load(g.steps) for g in result.outputs.values()])
    # per-sequence wall times add up to less than the run (prompt encoding, decoding
    # text): the run's own clock is the figure that counts
    result.wall_s = result.timeline.wall_s
    result.stats.wall_s = result.wall_s
    return result


def run_paradigm_batched(target: Target, paradigm: MultiRound | BestOfN,
                         problems: Sequence[Problem], method: BatchMethod,
                         settings: DecodeSettings, batch: int,
                         progress: Callable[[str], None] | None = None,
                         probe: Callable[[], float] | None = None,
                         meter: ProgressMeter | None = None) -> RunResult:
    """As :func:`run_paradigm`, with the paradigm's sequences decoded `batch` at a time
    (``paradigm.run_batched``); the probe runs before every batch and after the last,
    and each batch's segment belongs to the first problem in it; `meter` counts a
    batch's sequences when it finishes."""
    result = RunResult(timeline=Timeline(probe), batch=batch)
    index = {problem.key: i for i, problem in enumerate(problems)}
    if meter is not None:
        meter.start(paradigm.name, len(problems) * paradigm.sequences_per_problem, len(problems))

    def generate_many(asks: Sequence[SequenceAsk]) -> list[Completion]:
        first = index[asks[0].group]
        if progress is not None:
            progress(f"{paradigm.name}: problem {first + 1}/{len(problems)}, a batch of "
                     f"{len(asks)}")
        result.timeline.cut(first)
        requests = [settings.request(target.encode_prompt(a.prompt), a.group, a.sample, a.round)
                    for a in asks]
        sink = meter.decoding(len(requests), settings.max_new_tokens) \
            if meter is not None else None
        generations = _call(method, requests, sink)
        completions = []
        for ask, request, generation in zip(asks, requests, generations):
            key = (ask.group, ask.sample, ask.round)
            result.requests[key], result.outputs[key] = request, generation
            result.segment_of.append(len(result.timeline.probes) - 1)
            result.stats.merge(generation.stats)
            completions.append(Completion(target.decode(generation.tokens),
                                          tuple(generation.tokens)))
        if meter is not None:
            meter.add(len(asks), index[asks[-1].group] + 1,
                      sum(len(g.tokens) for g in generations))
        return completions

    result.outcomes = paradigm.run_batched(problems, generate_many, batch)
    # in the order batch 1 decodes them (problem, then sample, then round), so a run's
    # output digest does not depend on the batch size
    keys = list(result.outputs)
    order = sorted(range(len(keys)), key=lambda i: (index[keys[i][0]], keys[i][1], keys[i][2]))
    result.outputs = {keys[i]: result.outputs[keys[i]] for i in order}
    result.requests = {keys[i]: result.requests[keys[i]] for i in order}
    result.segment_of = [result.segment_of[i] for i in order]
    return _finished(result)
