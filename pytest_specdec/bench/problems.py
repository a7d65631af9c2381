"""Problem sets for test-time-scaling workloads, and answer checking.

Problems come from an embedded set of generated word problems (offline, deterministic),
a local JSON/JSONL file, or a Hugging Face dataset. Answers are compared after
normalisation, numerically where both sides are numbers.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Sequence

QUESTION_FIELDS = ("problem", "question", "Problem", "Question", "prompt")
ANSWER_FIELDS = ("answer", "Answer", "solution_answer", "final_answer", "expected_answer")
JSON_LIST_KEYS = ("data", "rows", "problems")


@dataclass(frozen=True)
class Problem:
    key: str        # stable id, e.g. "embedded-007" or "<dataset>-<index>"
    question: str
    answer: str     # gold answer as text, normalised (see normalise_answer)


class ProblemSetError(ValueError):
    """A problem source could not be read or does not hold usable problems."""


# --------------------------------------------------------------------------------------
# Embedded problems: one small generator per template, each returning (question, answer).
# --------------------------------------------------------------------------------------

#: How many problems a default benchmark run uses (``--specdec-problems``' default).
DEFAULT_PROBLEMS = 2
PROBLEMS_PER_TEMPLATE = 5
EMBEDDED_SEED = 20_250_601

_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Femi", "Grace", "Hiro", "Ines", "Jonas")


def _machines_packing(rng: random.Random) -> tuple[str, int]:
    rate_a, rate_b = rng.randint(12, 45), rng.randint(12, 45)
    solo_hours, joint_hours = rng.randint(2, 5), rng.randint(3, 8)
    total = rate_a * solo_hours + (rate_a + rate_b) * joint_hours
    question = (
        f"Machine A packs {rate_a} boxes per hour and machine B packs {rate_b} boxes per "
        f"hour. Machine A works alone for {solo_hours} hours, then machine B joins it and "
        f"both keep working until {total} boxes have been packed in all. "
        f"How many boxes did machine B pack?"
    )
    return question, rate_b * joint_hours


def _parent_and_child_ages(rng: random.Random) -> tuple[str, int]:
    parent, child = rng.sample(_NAMES, 2)
    child_age, factor, years = rng.randint(4, 15), rng.randint(2, 5), rng.randint(3, 12)
    parent_age = factor * child_age
    age_sum = parent_age + child_age + 2 * years
    question = (
        f"{parent} is {factor} times as old as {child}. In {years} years, the sum of "
        f"their ages will be {age_sum}. How old is {parent} now, in years?"
    )
    return question, parent_age


def _acid_mixture(rng: random.Random) -> tuple[str, int]:
    while True:
        litres_a, litres_b = rng.randrange(10, 65, 5), rng.randrange(10, 65, 5)
        percent_a, percent_b = rng.randrange(5, 100, 5), rng.randrange(5, 100, 5)
        acid = litres_a * percent_a + litres_b * percent_b
        if percent_a != percent_b and acid % (litres_a + litres_b) == 0:
            break
    question = (
        f"A chemist mixes {litres_a} litres of a solution that is {percent_a}% acid with "
        f"{litres_b} litres of a solution that is {percent_b}% acid. What is the acid "
        f"concentration of the mixture, as a percentage?"
    )
    return question, acid // (litres_a + litres_b)


def _path_around_garden(rng: random.Random) -> tuple[str, int]:
    length, width, path = rng.randint(12, 40), rng.randint(5, 25), rng.randint(1, 4)
    area = (length + 2 * path) * (width + 2 * path) - length * width
    question = (
        f"A rectangular garden measures {length} m by {width} m. A path {path} m wide runs "
        f"all the way around the outside of the garden. What is the area of the path, "
        f"in square metres?"
    )
    return question, area


def _theatre_seats(rng: random.Random) -> tuple[str, int]:
    rows, first, step = rng.randint(8, 30), rng.randint(10, 24), rng.randint(1, 4)
    total = rows * (2 * first + (rows - 1) * step) // 2
    question = (
        f"A theatre has {rows} rows of seats. The first row has {first} seats, and each "
        f"row after that has {step} more {'seat' if step == 1 else 'seats'} than the row "
        f"in front of it. "
        f"How many seats does the theatre have in total?"
    )
    return question, total


def _club_officers(rng: random.Random) -> tuple[str, int]:
    members, committee = rng.randint(6, 13), rng.randint(2, 4)
    ways = members * (members - 1) * math.comb(members - 2, committee)
    question = (
        f"A club has {members} members. It must choose a president, a different member as "
        f"treasurer, and a committee of {committee} further members who hold neither "
        f"office. In how many different ways can this be done?"
    )
    return question, ways


def _two_remainders(rng: random.Random) -> tuple[str, int]:
    while True:
        mod_a, mod_b = rng.randint(3, 13), rng.randint(3, 13)
        if mod_a != mod_b and math.gcd(mod_a, mod_b) == 1:
            break
    rem_a, rem_b = rng.randrange(mod_a), rng.randrange(mod_b)
    lower = rng.randint(50, 900)
    answer = next(n for n in range(lower + 1, lower + 1 + mod_a * mod_b)
                  if n % mod_a == rem_a and n % mod_b == rem_b)
    question = (
        f"What is the smallest integer greater than {lower} that leaves a remainder of "
        f"{rem_a} when divided by {mod_a} and a remainder of {rem_b} when divided by {mod_b}?"
    )
    return question, answer


def _change_in_cents(rng: random.Random) -> tuple[str, int]:
    buyer = rng.choice(_NAMES)
    notebooks, notebook_cents = rng.randint(2, 6), rng.randint(120, 480)
    pens, pen_cents = rng.randint(2, 9), rng.randint(45, 195)
    cost = notebooks * notebook_cents + pens * pen_cents
    bill = next(b for b in (10, 20, 50, 100) if b * 100 > cost)
    question = (
        f"{buyer} buys {notebooks} notebooks at ${notebook_cents / 100:.2f} each and "
        f"{pens} pens at ${pen_cents / 100:.2f} each, and pays with a ${bill} bill. "
        f"How many cents of change does {buyer} receive?"
    )
    return question, bill * 100 - cost


def _train_distance(rng: random.Random) -> tuple[str, int]:
    speed_kmh = 18 * rng.randint(3, 10)
    minutes, seconds = rng.randint(1, 9), rng.randint(5, 55)
    metres = speed_kmh * 5 // 18 * (60 * minutes + seconds)
    question = (
        f"A train travels at a constant {speed_kmh} km/h. How many metres does it cover in "
        f"{minutes} minutes and {seconds} seconds?"
    )
    return question, metres


def _digit_sum_count(rng: random.Random) -> tuple[str, int]:
    upper, digit_sum = rng.randint(150, 999), rng.randint(5, 16)
    count = sum(1 for n in range(1, upper + 1) if sum(map(int, str(n))) == digit_sum)
    question = (
        f"How many integers from 1 to {upper}, inclusive, have digits that add up to "
        f"exactly {digit_sum}?"
    )
    return question, count


EMBEDDED_TEMPLATES: tuple[Callable[[random.Random], tuple[str, int]], ...] = (
    _machines_packing,
    _parent_and_child_ages,
    _acid_mixture,
    _path_around_garden,
    _theatre_seats,
    _club_officers,
    _two_remainders,
    _change_in_cents,
    _train_distance,
    _digit_sum_count,
)


def embedded_problems() -> list[Problem]:
    """The built-in set: PROBLEMS_PER_TEMPLATE problems from each template, interleaved
    (so any prefix mixes templates). Identical on every call and every machine."""
    rngs = [random.Random(EMBEDDED_SEED + i) for i in range(len(EMBEDDED_TEMPLATES))]
    seen: set[str] = set()
    problems: list[Problem] = []
    for _ in range(PROBLEMS_PER_TEMPLATE):
        for template, rng in zip(EMBEDDED_TEMPLATES, rngs):
            question, answer = template(rng)
            while question in seen:
                question, answer = template(rng)
            seen.add(question)
            problems.append(Problem(f"embedded-{len(problems):03d}", question, str(answer)))
    return problems


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

_HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(?::[\w.-]+)?$")


def load_problems(source: str, *, limit: int | None = None, split: str = "test",
                  question_field: str | None = None,
                  answer_field: str | None = None) -> list[Problem]:
    """Load problems from "embedded", a local .json/.jsonl file, or a Hugging Face
    dataset "owner/name" (optionally "owner/name:config", e.g. "openai/gsm8k:main").

    `limit` keeps the first `limit` problems. Raises ProblemSetError on any bad input.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise ProblemSetError(f"limit must be a positive integer or None, got {limit!r}")
    if source == "embedded":
        problems = embedded_problems()
        return problems[:limit] if limit is not None else problems

    path = Path(source)
    if path.suffix.lower() in (".json", ".jsonl") or path.exists():
        if not path.exists():
            raise ProblemSetError(f"problem file not found: {source!r}")
        if not path.is_file() or path.suffix.lower() not in (".json", ".jsonl"):
            raise ProblemSetError(
                f"problem source {source!r} is not a .json or .jsonl file")
        rows, columns = _read_local_rows(path)
        short_name = path.stem
    elif _HF_NAME.match(source):
        rows, columns = _read_hf_rows(source, split)
        short_name = source.split(":")[0].rsplit("/", 1)[-1]
    else:
        raise ProblemSetError(
            f"unknown problem source {source!r}: expected 'embedded', a path to an "
            f"existing .json/.jsonl file, or a Hugging Face dataset name 'owner/name'")

    q_field = _pick_field(source, columns, question_field, QUESTION_FIELDS, "question")
    a_field = _pick_field(source, columns, answer_field, ANSWER_FIELDS, "answer")
    problems = []
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            break
        problems.append(Problem(
            key=f"{short_name}-{index:03d}",
            question=_question_text(source, index, row, q_field),
            answer=_gold_answer_text(source, index, row, a_field),
        ))
    if not problems:
        raise ProblemSetError(f"problem source {source!r} holds no problems")
    return problems


def _read_local_rows(path: Path) -> tuple[list[dict], list[str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProblemSetError(f"cannot read problem file {str(path)!r}: {exc}") from exc
    if path.suffix.lower() == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ProblemSetError(
                    f"{str(path)!r} line {line_no} is not valid JSON: {exc}") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProblemSetError(f"{str(path)!r} is not valid JSON: {exc}") from exc
        if isinstance(data, dict):
            list_key = next((k for k in JSON_LIST_KEYS if isinstance(data.get(k), list)), None)
            if list_key is None:
                raise ProblemSetError(
                    f"{str(path)!r} holds an object without a list under any of "
                    f"{', '.join(map(repr, JSON_LIST_KEYS))}")
            data = data[list_key]
        if not isinstance(data, list):
            raise ProblemSetError(f"{str(path)!r} must hold a JSON list of objects")
        rows = data
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ProblemSetError(
                f"{str(path)!r} row {index} is a {type(row).__name__}, not an object")
    if not rows:
        raise ProblemSetError(f"problem source {str(path)!r} holds no problems")
    columns = list(dict.fromkeys(key for row in rows[:1] for key in row))
    return rows, columns


def _read_hf_rows(source: str, split: str) -> tuple[Iterable[dict], list[str]]:
    try:
        import datasets
    except ImportError as exc:
        raise ProblemSetError(
            f"loading the Hugging Face dataset {source!r} needs the 'datasets' package: "
            f"pip install datasets") from exc
    name, _, config = source.partition(":")
    try:
        if config:
            dataset = datasets.load_dataset(name, config, split=split)
        else:
            dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, not found, bad split, ...: all reported the same way
        raise ProblemSetError(
            f"could not load Hugging Face dataset {source!r} (split {split!r}): "
            f"{type(exc).__name__}: {exc}") from exc
    columns = list(getattr(dataset, "column_names", None) or [])
    if not columns:
        first = next(iter(dataset), None)
        if first is None:
            raise ProblemSetError(f"problem source {source!r} holds no problems")
        columns = list(first)
    return dataset, columns


def _pick_field(source: str, columns: list[str], requested: str | None,
                candidates: tuple[str, ...], role: str) -> str:
    looked_for = (requested,) if requested else candidates
    for name in looked_for:
        if name in columns:
            return name
    raise ProblemSetError(
        f"problem source {source!r} has no {role} column: looked for "
        f"{', '.join(map(repr, looked_for))}; columns present: "
        f"{', '.join(map(repr, columns)) or '(none)'}")


def _question_text(source: str, index: int, row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ProblemSetError(
            f"problem source {source!r} row {index}: {field!r} must be non-empty text, "
            f"got {value!r}")
    return value.strip()


def _gold_answer_text(source: str, index: int, row: dict, field: str) -> str:
    value = row.get(field)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ProblemSetError(
            f"problem source {source!r} row {index}: {field!r} must be text or a number, "
            f"got {value!r}")
    text = str(value)
    if "####" in text:  # GSM8K: worked solution, then "#### <answer>"
        text = text.rsplit("####", 1)[1]
    answer = normalise_answer(text)
    if not answer:
        raise ProblemSetError(
            f"problem source {source!r} row {index}: {field!r} is empty")
    return answer


# --------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------

# A number as written in text: optional sign (not glued to a word), thousands commas,
# decimals. The digits must not continue another number.
_NUMBER = re.compile(
    r"(?:(?<![\w.])[-+])?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
    r"|(?:(?<![\w.])[-+])?(?<![\d.])\.\d+"
)
_WHOLE_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_ANSWER_PHRASE = re.compile(r"answer\s+is|answer\s*:", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{")
_FRACTION = re.compile(r"(-?)\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(-?\d+)\s*\}")
_SLASH_FRACTION = re.compile(r"(-?\d+)\s*/\s*(-?\d+)")


def _braced(text: str, open_at: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[open_at] == "{", and the index after
    its closing brace; None when unbalanced."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i], i + 1
    return None


def _unwrap_text_commands(text: str) -> str:
    while (match := _TEXT_WRAPPER.search(text)) is not None:
        group = _braced(text, match.end() - 1)
        if group is None:
            break
        content, end = group
        text = text[:match.start()] + content + text[end:]
    return text


def _normalise_number(text: str) -> str:
    value = Decimal(text.replace(",", "").lstrip("+"))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalise_answer(text: str) -> str:
    """The comparable form of an answer: without surrounding whitespace, "$", a trailing
    period, `\\text{}` wrappers, `\\!` and `\\,`; numbers canonical ("1,234.0" -> "1234")."""
    text = _unwrap_text_commands(text)
    text = text.replace("\\!", "").replace("\\,", "").replace("\\$", "").replace("$", "")
    text = text.strip().rstrip(".").strip()
    if _WHOLE_NUMBER.fullmatch(text):
        try:
            return _normalise_number(text)
        except InvalidOperation:
            pass
    return text


def _boxed_contents(text: str) -> list[str]:
    contents = []
    for match in _BOXED.finditer(text):
        end = match.end()
        if text.startswith("{", end):
            group = _braced(text, end)
            if group is not None:
                contents.append(group[0])
        else:  # "\boxed 5"
            token = re.match(r"[^\s$]+", text[end:])
            if token:
                contents.append(token.group(0))
    return contents


def extract_answer(text: str) -> str | None:
    """The final answer in a model's output, normalised: the last non-empty `\\boxed{}`,
    else the number after the last "answer is"/"answer:", else the last number."""
    for content in reversed(_boxed_contents(text)):
        answer = normalise_answer(content)
        if answer:
            return answer
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        number = _NUMBER.search(text, phrases[-1].end())
        if number is not None:
            return normalise_answer(number.group(0))
    numbers = _NUMBER.findall(text)
    return normalise_answer(numbers[-1]) if numbers else None


def _numeric_value(answer: str) -> Fraction | None:
    """The value of a normalised answer that is a plain number or a simple fraction."""
    compact = answer.replace(" ", "")
    if _WHOLE_NUMBER.fullmatch(compact):
        try:
            return Fraction(Decimal(compact.replace(",", "")))
        except (InvalidOperation, ValueError):
            return None
    for pattern in (_FRACTION, _SLASH_FRACTION):
        match = pattern.fullmatch(compact)
        if match is None:
            continue
        sign, num, den = match.groups() if pattern is _FRACTION else ("", *match.groups())
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign else value
    return None


def answers_match(predicted: str | None, gold: str) -> bool:
    """Whether a predicted answer equals the gold one: the same normalised text (spaces
    ignored), or the same number (within 1e-6; simple fractions count as numbers)."""
    if predicted is None:
        return False
    pred, ref = normalise_answer(predicted), normalise_answer(gold)
    if pred.replace(" ", "") == ref.replace(" ", ""):
        return bool(pred)
    pred_value, ref_value = _numeric_value(pred), _numeric_value(ref)
    if pred_value is None or ref_value is None:
        return False
    return abs(float(pred_value - ref_value)) < 1e-6


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common answer after normalisation (None and empty answers abstain);
    ties go to the answer seen first. None when every answer abstains."""
    normalised = [normalise_answer(a) for a in answers if a is not None]
    counts = Counter(a for a in normalised if a)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in normalised if counts.get(a) == best)
