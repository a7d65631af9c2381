"""A benchmark run's settings, as the pytest options resolve them
(:func:`pytest_specdec.plugin.options.read_config`); the session and the machine
description read them here, below the plugin that parses them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pytest_specdec.protocol.spec import DrafterSpec


@dataclass(frozen=True)
class SpecdecConfig:
    """The resolved options of a session."""

    target: str
    device: str
    dtype: str
    trust_remote_code: bool
    drafters: tuple[DrafterSpec, ...] | None  # None: every registered drafter
    paradigms: tuple[str, ...]
    dataset: str
    dataset_split: str
    problems: int
    max_new_tokens: int
    n: int
    rounds: int
    temperatures: tuple[float, ...] | None  # None: each paradigm's default
    seed: int
    k: int | None  # None: each drafter's own max_depth (drafter.draft_depth)
    timed_rounds: int
    report_dir: Path
    peers: tuple[str, ...]  # the peer cases to run (PEER_NAMES)
    strict: bool
    tie_margin: float | None  # None: measured on the target (lossless.measure_tie_margin)
    step_timeout: float  # seconds; 0: no limit
    compare: Path | None
    compare_fail: tuple[tuple[str, float], ...]
    # --specdec-lossless exact: row-invariant forwards, equality in every dtype
    exact: bool = False
    depth_profile: str = "reference"  # --specdec-depth-profile (drafter.DEPTH_PROFILES)
    ablations: bool = False  # --specdec-ablations: the default set's ablation variants too
    timing: str = "calibrated"  # --specdec-timing (timing.TIMING_MODES)
    # --specdec-baseline-rounds: a baseline's timed rounds (at least timed_rounds); their
    # spread is the session's round scatter (speedup.round_scatter). 1 here, so a config
    # built in code times as it asks; the option's default is BASELINE_ROUNDS
    baseline_rounds: int = 1
    batches: tuple[int, ...] = (1,)  # --specdec-batch: every case at each size
    batch_explicit: bool = False  # --specdec-batch was given: case ids name the size
    profile: str = "default"  # --specdec-profile (profiles.PROFILES)
    # --specdec-drafter was given: a drafter whose weights are missing fails its cases
    # (the default set's, or a profile's, are skipped with the command that trains them)
    drafters_named: bool = False
    # the start-of-session estimate (bench.estimate): a given decode-step cost in ms
    # (None: measured on the loaded target), and the speedup assumed for a case that no
    # earlier report measured (None: bench.estimate's priors)
    step_ms: float | None = None
    expected_speedup: float | None = None  # None: the estimate's priors
    # --specdec-engine: the decode path (engine.compiled.ENGINES), "auto" resolved by
    # resolve_engine for the target's device, or "both" (a case on each)
    engine: str = "auto"

    @property
    def baseline_timed_rounds(self) -> int:
        """A baseline's timed rounds: ``--specdec-baseline-rounds``, at least
        ``--specdec-timed-rounds`` (the session times them, the estimate prices them)."""
        return max(self.baseline_rounds, self.timed_rounds)
