"""Problem sets and answer checking: embedded set, loaders, extraction, matching, voting."""

from __future__ import annotations

import json

import pytest

from pytest_specdec.bench.problems import (Problem, ProblemSetError, answers_match,
                                           embedded_problems, extract_answer, load_problems,
                                           majority_vote)


# --- embedded set -----------------------------------------------------------------------

def test_embedded_set_is_large_unique_and_integer_valued():
    problems = embedded_problems()
    assert len(problems) >= 40
    assert all(isinstance(p, Problem) for p in problems)
    assert len({p.key for p in problems}) == len(problems)
    assert len({p.question for p in problems}) == len(problems)
    assert [p.key for p in problems[:3]] == ["embedded-000", "embedded-001", "embedded-002"]
    for p in problems:
        assert str(int(p.answer)) == p.answer, p
        assert p.question.rstrip().endswith("?"), p


def test_embedded_set_is_deterministic_and_varied():
    first, second = embedded_problems(), embedded_problems()
    assert first == second
    assert first is not second
    assert len({p.answer for p in first}) >= 25


def test_embedded_answers_are_right_for_a_hand_checked_problem():
    # a fixed sample, checked by hand, guards the generators against silent drift
    problem = next(p for p in embedded_problems() if "rectangular garden" in p.question)
    assert problem.question.startswith("A rectangular garden measures 32 m by 25 m. A path 3 m")
    assert problem.answer == str((32 + 6) * (25 + 6) - 32 * 25)


def test_load_embedded_with_limit_mixes_templates():
    problems = load_problems("embedded", limit=10)
    assert problems == embedded_problems()[:10]
    assert len({p.question.split()[:2][1] for p in problems}) > 5


# --- extraction -------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (r"So the total is \boxed{42}.", "42"),
    (r"Half: $\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{\frac{a}{b}}} is it", r"\sqrt{\frac{a}{b}}"),
    (r"First \boxed{3}, but wait: \boxed{5}. Then 7 more words 9", "5"),
    (r"\boxed{\text{(C)}}", "(C)"),
    (r"\boxed{\$1,234.50}", "1234.5"),
    (r"\boxed{10\!000}", "10000"),
    (r"\boxed{}, the answer is 8", "8"),
    ("The answer is 17. Checking: 3 + 14 = 17, and 99 bottles.", "17"),
    ("Answer: 12\nBut 30 was a distractor", "12"),
    ("final answer: -3 degrees, from 5 - 8", "-3"),
    ("The answer is therefore 6, not 7", "6"),
    ("She earns 1,234 dollars.", "1234"),
    ("Total: 1,234,567", "1234567"),
    ("It drops to -15 overnight", "-15"),
    ("x-5 is not negative five; y is 2", "2"),
    ("The value is 42.0.", "42"),
    ("The ratio is 0.250", "0.25"),
    ("gain of +5", "5"),
    ("about .5 of it", "0.5"),
    ("no numbers here at all", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# --- matching and voting ----------------------------------------------------------------

@pytest.mark.parametrize("predicted, gold, expected", [
    ("42", "42", True),
    ("42.0", "42", True),
    ("1,234", "1234", True),
    ("+5", "5", True),
    ("0.5", "0.50", True),
    ("0.3333333", "0.33333333", True),
    (r"\frac{1}{2}", "0.5", True),
    ("1/2", r"\dfrac{1}{2}", True),
    (r"-\frac{3}{4}", "-0.75", True),
    (r"\text{(C)}", "(C)", True),
    ("$12$", "12", True),
    (r"\frac{1}{2}", r"\frac{1}{3}", False),
    ("41", "42", False),
    ("-42", "42", False),
    ("(1, 2)", "(1,2)", True),
    ("x", "y", False),
    (None, "42", False),
    ("", "", False),
])
def test_answers_match(predicted, gold, expected):
    assert answers_match(predicted, gold) is expected


def test_majority_vote_picks_most_common_after_normalisation():
    assert majority_vote(["7", "42.0", None, "42", "7", "1,000", "42"]) == "42"


def test_majority_vote_breaks_ties_by_first_occurrence():
    assert majority_vote([None, "9", "4", "4", "9"]) == "9"
    assert majority_vote(["4", "9", "9", "4"]) == "4"


def test_majority_vote_all_abstain():
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


# --- local files ------------------------------------------------------------------------

def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


MATH_ROWS = [
    {"problem": "What is $1+1$?", "solution": "...", "answer": "2", "level": 1},
    {"problem": "Simplify $2/4$.", "solution": "...", "answer": r"\frac{1}{2}", "level": 2},
    {"problem": "Name the letter.", "solution": "...", "answer": r"\text{(C)}", "level": 3},
]


def test_load_jsonl_math500_style(tmp_path):
    path = _write_jsonl(tmp_path / "math500.jsonl", MATH_ROWS)
    problems = load_problems(str(path))
    assert problems == [
        Problem("math500-000", "What is $1+1$?", "2"),
        Problem("math500-001", "Simplify $2/4$.", r"\frac{1}{2}"),
        Problem("math500-002", "Name the letter.", "(C)"),
    ]


def test_load_json_list_with_numeric_answers_and_limit(tmp_path):
    path = tmp_path / "aime.json"
    path.write_text(json.dumps([{"Question": f"Q{i}?", "Answer": 100 + i} for i in range(5)]))
    problems = load_problems(str(path), limit=2)
    assert [(p.key, p.question, p.answer) for p in problems] == [
        ("aime-000", "Q0?", "100"), ("aime-001", "Q1?", "101")]


def test_load_json_object_with_data_list_and_float_answer(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"meta": 1, "data": [{"question": "Q?", "answer": 3.0}]}))
    assert load_problems(str(path)) == [Problem("wrapped-000", "Q?", "3")]


def test_load_gsm8k_style_answer(tmp_path):
    path = _write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "How many?", "answer": "She has 3 + 4 = <<3+4=7>>7.\n#### 1,234"}])
    assert load_problems(str(path))[0].answer == "1234"


def test_explicit_fields_override_detection(tmp_path):
    path = _write_jsonl(tmp_path / "custom.jsonl", [
        {"problem": "ignored", "prompt_text": "Use me?", "answer": "1", "target": "9"}])
    problems = load_problems(str(path), question_field="prompt_text", answer_field="target")
    assert problems == [Problem("custom-000", "Use me?", "9")]


def test_missing_columns_error_names_fields_and_columns(tmp_path):
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"text": "Q?", "label": "1"}])
    with pytest.raises(ProblemSetError) as info:
        load_problems(str(path))
    message = str(info.value)
    assert "odd.jsonl" in message
    for looked_for in ("problem", "question", "Problem", "Question", "prompt"):
        assert repr(looked_for) in message
    assert "'text'" in message and "'label'" in message


def test_missing_answer_column_error_names_answer_fields(tmp_path):
    path = _write_jsonl(tmp_path / "noanswer.jsonl", [{"problem": "Q?", "label": "1"}])
    with pytest.raises(ProblemSetError, match="answer") as info:
        load_problems(str(path))
    assert "'expected_answer'" in str(info.value) and "'label'" in str(info.value)


def test_missing_requested_field_error(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", MATH_ROWS)
    with pytest.raises(ProblemSetError, match="'gold'") as info:
        load_problems(str(path), answer_field="gold")
    assert "'solution'" in str(info.value)


def test_missing_file_error_names_path(tmp_path):
    missing = tmp_path / "nowhere" / "problems.jsonl"
    with pytest.raises(ProblemSetError, match="nowhere"):
        load_problems(str(missing))


@pytest.mark.parametrize("limit", [0, -1])
def test_non_positive_limit_is_an_error(limit):
    with pytest.raises(ProblemSetError, match="limit"):
        load_problems("embedded", limit=limit)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ProblemSetError, match="no problems"):
        load_problems(str(path))


def test_bad_json_is_a_problem_set_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"problem": "Q?", "answer": "1"}\n{not json\n')
    with pytest.raises(ProblemSetError, match="line 2"):
        load_problems(str(path))


def test_unrecognised_source_is_an_error():
    with pytest.raises(ProblemSetError, match="unknown problem source"):
        load_problems("not a source")


def test_problem_set_error_is_a_value_error():
    assert issubclass(ProblemSetError, ValueError)


# --- Hugging Face datasets (offline: load_dataset is replaced) ---------------------------

def test_hugging_face_dataset_name(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, *args, **kwargs):
        calls.append((name, args, kwargs))
        return datasets.Dataset.from_list([
            {"id": "2024-I-1", "problem": "First AIME problem?", "answer": 204},
            {"id": "2024-I-2", "problem": "Second AIME problem?", "answer": 25},
            {"id": "2024-I-3", "problem": "Third AIME problem?", "answer": 809},
        ])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = load_problems("Maxwell-Jia/AIME_2024", split="train", limit=2)
    assert calls == [("Maxwell-Jia/AIME_2024", (), {"split": "train"})]
    assert problems == [
        Problem("AIME_2024-000", "First AIME problem?", "204"),
        Problem("AIME_2024-001", "Second AIME problem?", "25"),
    ]


def test_hugging_face_dataset_with_config(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, *args, **kwargs):
        calls.append((name, args, kwargs))
        return datasets.Dataset.from_list(
            [{"question": "How many?", "answer": "Work...\n#### 72"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = load_problems("openai/gsm8k:main")
    assert calls == [("openai/gsm8k", ("main",), {"split": "test"})]
    assert problems == [Problem("gsm8k-000", "How many?", "72")]


def test_hugging_face_load_failure_names_the_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def failing_load_dataset(name, *args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(ProblemSetError, match="HuggingFaceH4/MATH-500") as info:
        load_problems("HuggingFaceH4/MATH-500")
    assert "hub unreachable" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionError)


def test_hugging_face_missing_columns(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kwargs:
                        datasets.Dataset.from_list([{"Idx": 1, "text": "Q?"}]))
    with pytest.raises(ProblemSetError, match="'Idx', 'text'"):
        load_problems("someone/something")


def test_missing_datasets_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ProblemSetError, match="pip install datasets"):
        load_problems("owner/name")


def test_unsupported_local_file_is_an_error(tmp_path):
    path = tmp_path / "problems.csv"
    path.write_text("problem,answer\nQ?,1\n")
    with pytest.raises(ProblemSetError, match="problems.csv"):
        load_problems(str(path))
