"""The distillation data's prompts: which problems or prompt files (:class:`DataSettings`),
in the benchmark's own formats, first rounds and multi-round's re-ask rounds."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pytest_specdec.bench.paradigms import MultiRound
from pytest_specdec.bench.problems import (DEFAULT_PROBLEMS, Problem, ProblemSetError,
                                           embedded_problems, load_problems)
from pytest_specdec.models.weights import TrainingError


def _bench_problems() -> int:
    """How many problems a default benchmark run uses (its --specdec-problems default):
    the problems the default training set holds out."""
    return DEFAULT_PROBLEMS


@dataclass(frozen=True)
class DataSettings:
    """How the distillation data are made; the cache is reused only when these match.

    Every prompt is generated greedily (T=0, the multi_round paradigm's temperature)
    for ``rounds`` rounds, each later round's prompt built exactly as multi_round builds
    it from the previous round's answer, and ``samples`` more times at ``temperature``
    (0.6, best_of_n's): the drafters see the target's own trajectories at both
    temperatures the default benchmark runs."""

    prompts: str = "embedded"        # "embedded", a .jsonl/.json file, or a HF dataset
    holdout: int = -1                # embedded problems skipped from the start; -1: the
    #                                  benchmark's default --specdec-problems
    limit: int = 0                   # at most this many prompts (0: all)
    max_new_tokens: int = 64         # the first 64 of each benchmark trajectory's 96: the
    #                                  head keeps its MAT at 2/3 of the data and step time
    rounds: int = 2                  # greedy rounds per problem (1 for plain prompts)
    samples: int = 1                 # sampled generations per prompt
    temperature: float = 0.6
    seed: int = 0
    split: str = "train"             # a Hugging Face dataset's split

    def check(self) -> None:
        for name in ("limit", "max_new_tokens", "rounds", "samples", "seed"):
            value = getattr(self, name)
            low = 1 if name in ("max_new_tokens", "rounds") else 0
            if type(value) is not int or value < low:
                raise TrainingError(f"{name} {value!r} must be an int >= {low}")
        if type(self.holdout) is not int or self.holdout < -1:
            raise TrainingError(f"holdout {self.holdout!r} must be an int >= 0 "
                                f"(or -1: the benchmark's default problem count)")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0
                and math.isfinite(self.temperature)):
            raise TrainingError(f"temperature {self.temperature!r} must be a number > 0 "
                                f"(the sampled generations' temperature)")


def training_prompts(settings: DataSettings) -> list[Problem | str]:
    """The prompt set: Problems (formatted as the benchmark formats them, multi-round
    capable) or plain user messages.

    - "embedded": the embedded problems after the first ``holdout`` (default: as many
      as a default benchmark run uses, so training never sees the benchmark's problems);
    - a .jsonl/.json file: rows that are strings or objects with a prompt, question,
      problem or text field (used as the user message as is);
    - otherwise a Hugging Face dataset ("owner/name[:config]", split ``settings.split``),
      read as problems (question and answer fields)."""
    settings.check()
    source = settings.prompts
    items: list[Problem | str]
    if source == "embedded":
        holdout = _bench_problems() if settings.holdout < 0 else settings.holdout
        problems = embedded_problems()
        if holdout >= len(problems):
            raise TrainingError(f"holdout {holdout} leaves none of the {len(problems)} "
                                f"embedded problems to train on")
        items = list(problems[holdout:])
    elif Path(source).suffix.lower() in (".jsonl", ".json") or Path(source).exists():
        items = _read_prompt_file(Path(source))
    else:
        try:
            items = list(load_problems(source, split=settings.split))
        except ProblemSetError as exc:
            raise TrainingError(f"prompts {source!r}: {exc}") from exc
    return items[:settings.limit] if settings.limit else items
PROMPT_FIELDS = ("prompt", "question", "problem", "text", "Question", "Problem")


def _read_prompt_file(path: Path) -> list[str]:
    if not path.is_file():
        raise TrainingError(f"prompt file {str(path)!r} not found (expected a .jsonl or "
                            f".json file of strings or objects with a "
                            f"{'/'.join(PROMPT_FIELDS)} field)")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
            if isinstance(rows, dict):
                rows = next((rows[k] for k in ("data", "rows", "prompts", "problems")
                             if isinstance(rows.get(k), list)), None)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TrainingError(f"prompt file {str(path)!r} is not readable JSON: {exc}") from exc
    if not isinstance(rows, list):
        raise TrainingError(f"prompt file {str(path)!r} holds no list of prompts")
    prompts = []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            row = next((row[k] for k in PROMPT_FIELDS if isinstance(row.get(k), str)), None)
        if not isinstance(row, str) or not row.strip():
            raise TrainingError(f"prompt file {str(path)!r}, row {i}: expected a string or "
                                f"an object with a {'/'.join(PROMPT_FIELDS)} text field")
        prompts.append(row)
    if not prompts:
        raise TrainingError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


class _Stop(Exception):
    """Ends the paradigm's run once it has asked for the round wanted."""


def round_prompt(problem: Problem, previous: Sequence[Any]) -> str:
    """The multi_round paradigm's prompt for round len(previous), given the earlier
    rounds' completions: built by the paradigm itself, so training sees its format."""
    asked: list[str] = []

    def generate(prompt: str, *, group: str, sample: int, round: int) -> Any:
        if round < len(previous):
            return previous[round]
        asked.append(prompt)
        raise _Stop

    try:
        MultiRound(rounds=len(previous) + 1).run(problem, generate)
    except _Stop:
        return asked[0]
    raise AssertionError("multi_round asked for no further round")  # pragma: no cover
