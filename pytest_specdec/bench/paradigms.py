"""Test-time-scaling paradigms. A paradigm sees only a generate function (prompt text
in, completion out), so the same code runs plain decoding, speculative decoding and
Hugging Face's generate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from pytest_specdec.bench.problems import Problem, answers_match, extract_answer, majority_vote

ANSWER_INSTRUCTION = "Put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]


class GenerateFn(Protocol):
    """Generate one completion. (group, sample, round) identify the sequence: the seed
    of coupled sampling and the drafter's sharing both derive from them."""

    def __call__(self, prompt: str, *, group: str, sample: int, round: int) -> Completion: ...


@dataclass(frozen=True)
class SequenceAsk:
    """One sequence a batched paradigm asks for: its prompt and identity."""

    prompt: str
    group: str
    sample: int = 0
    round: int = 0


class GenerateManyFn(Protocol):
    """Generate the asked completions together (one batch), in order."""

    def __call__(self, asks: Sequence[SequenceAsk]) -> list[Completion]: ...


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@dataclass
class Outcome:
    """What a paradigm made of one problem."""

    problem: Problem
    completions: list[Completion] = field(default_factory=list)  # samples or rounds, in order
    final_answer: str | None = None

    @property
    def correct(self) -> bool:
        return answers_match(self.final_answer, self.problem.answer)


def first_prompt(problem: Problem) -> str:
    return f"{problem.question}\n{ANSWER_INSTRUCTION}"


def answer_part(text: str) -> str:
    """The answer after the reasoning: text after the last </think>, else all of it."""
    return text.rsplit("</think>", 1)[-1].strip()


@dataclass(frozen=True)
class MultiRound:
    """Multi-round thinking: round r+1 re-asks the question with round r's answer.

    As in the reference protocol: the prompt holds the question, the previous round's
    answer (the text after its reasoning) and a request to answer again. The final
    answer is the last round's.
    """

    rounds: int = 2
    name: str = "multi_round"
    default_temperature: float = 0.0

    @property
    def sequences_per_problem(self) -> int:
        return self.rounds

    def run(self, problem: Problem, generate: GenerateFn) -> Outcome:
        outcome = Outcome(problem)
        prompt = first_prompt(problem)
        for r in range(self.rounds):
            completion = generate(prompt, group=problem.key, sample=0, round=r)
            outcome.completions.append(completion)
            prompt = self.next_prompt(problem, completion)
        outcome.final_answer = extract_answer(outcome.completions[-1].text)
        return outcome

    def next_prompt(self, problem: Problem, completion: Completion) -> str:
        return (f"{problem.question}\n\nThe previous answer was:\n"
                f"{answer_part(completion.text)}\n\nPlease re-answer. {ANSWER_INSTRUCTION}")

    def run_batched(self, problems: Sequence[Problem], generate: GenerateManyFn,
                    batch: int) -> list[Outcome]:
        """The rounds of `batch` problems at a time decode together: round r of every
        problem of a chunk is one batch (round r + 1 needs round r's answer)."""
        outcomes = []
        for chunk in chunks(problems, batch):
            done = [Outcome(p) for p in chunk]
            prompts = [first_prompt(p) for p in chunk]
            for r in range(self.rounds):
                completions = generate([SequenceAsk(prompt, p.key, 0, r)
                                        for prompt, p in zip(prompts, chunk)])
                for outcome, completion in zip(done, completions):
                    outcome.completions.append(completion)
                prompts = [self.next_prompt(p, c) for p, c in zip(chunk, completions)]
            for outcome in done:
                outcome.final_answer = extract_answer(outcome.completions[-1].text)
            outcomes += done
        return outcomes


@dataclass(frozen=True)
class BestOfN:
    """Best-of-N: N independent samples of one question (one seed each), the final
    answer chosen by majority vote over their extracted answers."""

    n: int = 4
    name: str = "best_of_n"
    default_temperature: float = 0.6

    @property
    def sequences_per_problem(self) -> int:
        return self.n

    def run(self, problem: Problem, generate: GenerateFn) -> Outcome:
        outcome = Outcome(problem)
        prompt = first_prompt(problem)
        for s in range(self.n):
            outcome.completions.append(generate(prompt, group=problem.key, sample=s, round=0))
        outcome.final_answer = majority_vote([extract_answer(c.text) for c in outcome.completions])
        return outcome

    def run_batched(self, problems: Sequence[Problem], generate: GenerateManyFn,
                    batch: int) -> list[Outcome]:
        """The N samples of each problem decode together; with batch > N, several
        problems' samples share a batch (in problem order, then sample order)."""
        outcomes = [Outcome(p) for p in problems]
        asks = [SequenceAsk(first_prompt(p), p.key, s, 0) for p in problems for s in range(self.n)]
        completions = [c for chunk in chunks(asks, batch) for c in generate(chunk)]
        for i, outcome in enumerate(outcomes):
            outcome.completions = completions[i * self.n:(i + 1) * self.n]
            outcome.final_answer = majority_vote([extract_answer(c.text)
                                                  for c in outcome.completions])
        return outcomes


PARADIGM_NAMES = ("multi_round", "best_of_n")


def make_paradigm(name: str, *, rounds: int = 2, n: int = 4) -> MultiRound | BestOfN:
    if name == "multi_round":
        return MultiRound(rounds=rounds)
    if name == "best_of_n":
        return BestOfN(n=n)
    raise ValueError(f"unknown paradigm {name!r}; available: {', '.join(PARADIGM_NAMES)}")
