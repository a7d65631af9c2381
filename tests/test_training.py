"""Training model drafters (pytest_specdec.training.loop): distillation batches, the
prompt set and its generations, the loop (loss falls, resume, time budget, atomic
weights) and the `pytest-specdec train` command, all on tiny in-memory models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.models import trainable as mt
from pytest_specdec.models import weights as mw
from pytest_specdec.training import data as td
from pytest_specdec.training import loop as t
from pytest_specdec.training import prompts as tp


@pytest.fixture(scope="module")
def target():
    return wrap_model(tiny_model("llama"), name="tiny-llama")


SEQUENCES = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
PROMPTS = [2, 1, 3]


def toy_data(n: int = 12, seed: int = 0) -> td.DistillData:
    """n runs of 6..13 consecutive token ids (learnable: the next id is this one + 1)
    from random starts below 20, prompts of 2..4 tokens."""
    rng = torch.Generator().manual_seed(seed)
    sequences, prompts = [], []
    for i in range(n):
        start = int(torch.randint(1, 20, (1,), generator=rng))
        sequences.append(list(range(start, start + 6 + i % 8)))
        prompts.append(2 + i % 3)
    return td.DistillData(sequences, prompts)


class Toy:
    """A Trainable: a dropout + linear head from the target's layer-1 state to the next
    token (cross-entropy at the loss mask); dropout makes the torch RNG matter."""

    kind = "toy"
    hidden_layers = (1,)

    def __init__(self, target, data, *, width: int = 64, fail_at: int | None = None):
        self.target = target
        self.module = torch.nn.Sequential(torch.nn.Dropout(0.1),
                                          torch.nn.Linear(width, target.vocab_size))
        self.fail_at, self.calls = fail_at, 0

    def loss(self, batch: mt.DistillBatch) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt  # an interruption between two checkpoints
        logits = self.module(batch.hidden)[:, :-1]
        labels = batch.input_ids[:, 1:]
        mask = batch.loss_mask[:, :-1]
        return torch.nn.functional.cross_entropy(logits[mask], labels[mask])

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.module.state_dict().items()},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(
            {"target": mw.target_signature(self.target)}), encoding="utf-8")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------------------ batches


def test_batch_holds_the_documented_tensors(target):
    data = td.DistillData([list(s) for s in SEQUENCES], list(PROMPTS))
    batch = data.batch(target, (0, 2), [0, 1, 2])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 0, 0], [13, 14, 15, 16, 0]]
    assert batch.attention_mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2,
                                             [True] * 4 + [False]]
    # position i is in the loss when token i + 1 was generated (not prompt, not padding)
    assert batch.loss_mask.tolist() == [[False, True, True, True, False],
                                        [True, True, False, False, False],
                                        [False, False, True, False, False]]
    assert batch.hidden.shape == (3, 5, 2 * 64) and batch.hidden.dtype == torch.float32
    assert batch.final_hidden.shape == (3, 5, 64) and batch.final_hidden.dtype == torch.float32
    # the final normed state times the output head is the target's logits
    with torch.no_grad():
        out = target.model(torch.tensor([SEQUENCES[0]]), output_hidden_states=True)
        head = target.model.get_output_embeddings().weight
    torch.testing.assert_close(batch.final_hidden[0] @ head.T, out.logits[0])
    torch.testing.assert_close(batch.hidden[0, :, :64], out.hidden_states[0][0])
    torch.testing.assert_close(batch.hidden[0, :, 64:], out.hidden_states[2][0])
    # right padding leaves the shorter sequences' states as they are alone
    with torch.no_grad():
        alone = target.model(torch.tensor([SEQUENCES[1]]), output_hidden_states=True)
    torch.testing.assert_close(batch.final_hidden[1, :3], alone.hidden_states[-1][0])


def test_no_layers_gives_an_empty_hidden_and_negative_layers_count_from_the_end(target):
    data = td.DistillData([list(s) for s in SEQUENCES], list(PROMPTS))
    assert data.batch(target, (), [0]).hidden.shape == (1, 5, 0)
    last = data.batch(target, (-1,), [0])
    torch.testing.assert_close(last.hidden, last.final_hidden)
    with pytest.raises(mw.TrainingError, match=r"layer 3 is not in \[-3, 2\]"):
        data.batch(target, (3,), [0])


@pytest.mark.parametrize("keep_bytes", [0, td.KEEP_STATES_BYTES])
def test_batches_are_seeded_passes_and_skip_to_start(target, keep_bytes):
    data = toy_data(7)
    stream = data.order(3, seed=4)
    first_pass = [next(stream) for _ in range(3)]
    assert sorted(len(b) for b in first_pass) == [1, 3, 3]  # never spanning two passes
    assert sorted(i for b in first_pass for i in b) == list(range(7))
    assert [next(stream) for _ in range(3)] != first_pass  # a fresh permutation per pass
    assert list(data.order(3, seed=4).__next__()) == first_pass[0]
    whole = data.batches(target, (1,), batch_size=3, seed=4, keep_bytes=keep_bytes)
    batches = [next(whole) for _ in range(5)]
    resumed = data.batches(target, (1,), batch_size=3, seed=4, start=3, keep_bytes=keep_bytes)
    for expected in batches[3:]:
        got = next(resumed)
        assert torch.equal(got.input_ids, expected.input_ids)
        assert torch.equal(got.hidden, expected.hidden)


def test_batches_group_similar_lengths():
    data = td.DistillData([[1] * n for n in range(2, 34)], [1] * 32)  # lengths 2..33
    stream = data.order(4, seed=0)
    batches = [next(stream) for _ in range(8)]
    assert sorted(i for b in batches for i in b) == list(range(32))
    # 32 sequences = one bucket of 8 batches: each batch is 4 consecutive lengths
    assert sorted(sorted(b) for b in batches) == [list(range(i, i + 4)) for i in range(0, 32, 4)]
    assert batches != sorted(batches)  # in shuffled order


def test_precomputed_states_match_per_batch_states(target):
    data = toy_data(9)
    kept = next(data.batches(target, (1, 2), batch_size=4, seed=1))
    fresh = next(toy_data(9).batches(target, (1, 2), batch_size=4, seed=1, keep_bytes=0))
    mask = kept.attention_mask
    assert torch.equal(mask, fresh.attention_mask)
    torch.testing.assert_close(kept.hidden[mask], fresh.hidden[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept.final_hidden[mask], fresh.final_hidden[mask],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sequences, prompts, message", [
    ([[1, 2, 3]], [3], r"sequence 0: prompt length 3 is not in \[1, 3\)"),
    ([[1, 2, 3]], [0], r"sequence 0: prompt length 0"),
    ([[1, 2]], [1, 1], "1 sequences but 2 prompt lengths"),
    ([], [], "no sequences"),
])
def test_bad_data_are_refused(sequences, prompts, message):
    with pytest.raises(mw.TrainingError, match=message):
        td.DistillData(sequences, prompts)


# ------------------------------------------------------------------------------ prompts


def test_default_prompts_leave_out_the_benchmarks_problems():
    from pytest_specdec.bench.problems import embedded_problems

    problems = embedded_problems()
    prompts = tp.training_prompts(tp.DataSettings())
    assert tp._bench_problems() == 2  # the --specdec-problems default
    assert [p.key for p in prompts] == [p.key for p in problems[2:]]
    assert [p.key for p in tp.training_prompts(tp.DataSettings(holdout=5, limit=2))] == \
        ["embedded-005", "embedded-006"]
    with pytest.raises(mw.TrainingError, match="holdout 50 leaves none of the 50"):
        tp.training_prompts(tp.DataSettings(holdout=50))


def test_prompt_files(tmp_path):
    lines = tmp_path / "p.jsonl"
    lines.write_text('"plain"\n{"prompt": "a"}\n\n{"question": "b", "answer": "1"}\n')
    assert tp.training_prompts(tp.DataSettings(prompts=str(lines))) == ["plain", "a", "b"]
    listing = tmp_path / "p.json"
    listing.write_text(json.dumps({"prompts": [{"text": "x"}, "y"]}))
    assert tp.training_prompts(tp.DataSettings(prompts=str(listing), limit=1)) == ["x"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"other": 1}\n')
    with pytest.raises(mw.TrainingError, match="row 0: expected a string or an object"):
        tp.training_prompts(tp.DataSettings(prompts=str(bad)))
    with pytest.raises(mw.TrainingError, match="prompt file .*missing.jsonl' not found"):
        tp.training_prompts(tp.DataSettings(prompts=str(tmp_path / "missing.jsonl")))


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", 0, "max_new_tokens 0 must be an int >= 1"),
    ("rounds", 0, "rounds 0 must be an int >= 1"),
    ("samples", -1, "samples -1 must be an int >= 0"),
    ("temperature", 0.0, "temperature 0.0 must be a number > 0"),
    ("holdout", -2, "holdout -2 must be an int >= 0"),
])
def test_bad_data_settings_are_named(field, value, message):
    with pytest.raises(mw.TrainingError, match=message):
        tp.DataSettings(**{field: value}).check()


def test_round_prompt_is_the_multi_round_paradigms(target):
    from pytest_specdec.bench.paradigms import Completion, MultiRound, first_prompt
    from pytest_specdec.bench.problems import embedded_problems

    problem = embedded_problems()[3]
    answers = [Completion("Thinking... \\boxed{7}", (1,)), Completion("again", (2,))]
    asked = []

    def generate(prompt, *, group, sample, round):
        asked.append(prompt)
        return answers[round]

    MultiRound(rounds=2).run(problem, generate)
    assert tp.round_prompt(problem, []) == first_prompt(problem) == asked[0]
    assert tp.round_prompt(problem, answers[:1]) == asked[1]
    assert "The previous answer was:\nThinking... \\boxed{7}" in asked[1]


@pytest.fixture(scope="module")
def chat_target(tiny_model_dir):
    from pytest_specdec.engine.target import load_target

    return load_target(str(tiny_model_dir), device="cpu", dtype="float32")


def test_generate_data_greedy_rounds_and_samples(chat_target, tmp_path, monkeypatch):
    from pytest_specdec.bench.paradigms import first_prompt

    settings = tp.DataSettings(limit=2, max_new_tokens=4, rounds=2, samples=1, seed=3)
    data = td.generate_data(chat_target, settings, batch_size=2)
    problems = tp.training_prompts(settings)
    firsts = [chat_target.encode_prompt(first_prompt(p)) for p in problems]
    # round 0 greedy, round 1 greedy (re-asked), one sample: 2 problems each
    assert len(data.sequences) == 6
    for k in (0, 1, 4, 5):
        assert data.sequences[k][:data.prompt_lengths[k]] == firsts[k % 2]
    for k in (0, 1):  # greedy: the model's own argmax continuation, one token at a time
        ids = list(firsts[k])
        for _ in range(len(data.sequences[k]) - len(ids)):
            with torch.no_grad():
                ids.append(int(chat_target.model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert data.sequences[k] == ids
    assert "The previous answer was" in chat_target.tokenizer.decode(
        data.sequences[2][:data.prompt_lengths[2]])
    # the cache: written once, reused for the same target and settings
    path = tmp_path / "d" / td.DATA_FILE
    made = td.prepare_data(chat_target, path, settings, batch_size=2)
    assert made == data  # seeded: the same generations
    monkeypatch.setattr(td, "generate_data", lambda *a, **k: pytest.fail("regenerated"))
    assert td.prepare_data(chat_target, path, settings) == data
    assert json.loads(path.read_text())["target"] == mw.target_signature(chat_target)


# ------------------------------------------------------------------------------ the loop


def test_a_few_steps_lower_the_loss(target, tmp_path):
    result = t.train(Toy, target, output=tmp_path / "w", steps=40, lr=3e-2, batch_size=4,
                     data=toy_data(), progress=False, max_minutes=None)
    assert result.steps_done == 40 and result.stopped == "steps"
    assert result.loss < 0.75 * result.first_loss  # seeded: 6.26 -> 4.15
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == \
        ["config.json", "model.safetensors", "training.json"]
    record = json.loads((tmp_path / "w" / "training.json").read_text())
    assert record["steps_done"] == 40 and record["kind"] == "toy" and record["seed"] == 0
    # what besides the inputs decides the bits: the build, the instruction set, the CPU
    assert record["torch"] == torch.__version__ and record["torch_threads"] == 2
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(record["cpu"], str) and record["cpu"]
    # nothing left behind: no temp folders, no checkpoint once all steps are done
    assert [p.name for p in tmp_path.iterdir()] == ["w"]


def test_resume_gives_the_weights_of_an_uninterrupted_run(target, tmp_path):
    common = dict(steps=12, lr=1e-2, batch_size=4, progress=False, max_minutes=None,
                  checkpoint_every=5, seed=7)
    t.train(Toy, target, output=tmp_path / "whole", data=toy_data(), **common)
    with pytest.raises(KeyboardInterrupt):  # interrupted at step 8: the checkpoint is at 5
        t.train(lambda tg, d: Toy(tg, d, fail_at=8), target, output=tmp_path / "cut",
                data=toy_data(), **common)
    state = json.loads((tmp_path / "cut.checkpoint" / "state.json").read_text())
    assert state["step"] == 5
    assert not (tmp_path / "cut").exists()
    result = t.train(Toy, target, output=tmp_path / "cut", data=toy_data(), resume=True, **common)
    assert result.steps_done == 12
    assert json.loads((tmp_path / "cut" / "training.json").read_text())["resumed_from"] == 5
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert whole.keys() == cut.keys()
    for name in whole:
        assert torch.equal(whole[name], cut[name]), name
    assert not (tmp_path / "cut.checkpoint").exists()


def test_the_time_budget_stops_saves_and_resumes(target, tmp_path):
    common = dict(lr=1e-2, batch_size=4, progress=False, data=toy_data())
    result = t.train(Toy, target, output=tmp_path / "w", steps=10, max_minutes=1e-9, **common)
    assert (result.steps_done, result.stopped) == (1, "time")  # at least one step
    assert (tmp_path / "w" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "w.checkpoint" / "state.json").read_text())["step"] == 1
    result = t.train(Toy, target, output=tmp_path / "w", steps=10, max_minutes=None,
                     resume=True, **common)
    assert (result.steps_done, result.stopped) == (10, "steps")


def test_resume_refuses_a_checkpoint_of_other_settings(target, tmp_path):
    common = dict(lr=1e-2, progress=False, data=toy_data(), steps=5)
    t.train(Toy, target, output=tmp_path / "w", max_minutes=1e-9, batch_size=4, **common)
    with pytest.raises(mw.TrainingError, match=r"other batch_size \(4, not 2\)"):
        t.train(Toy, target, output=tmp_path / "w", resume=True, batch_size=2, **common)


@pytest.mark.parametrize("values, message", [
    ({"steps": 0}, "steps 0 must be an int >= 1"),
    ({"batch_size": 0}, "batch_size 0 must be an int >= 1"),
    ({"lr": -1.0}, "lr -1.0 must be a number > 0"),
    ({"max_minutes": -1}, "max_minutes -1 must be a number >= 0"),
    ({"seed": -3}, "seed -3 must be an int >= 0"),
])
def test_bad_loop_values_are_named(target, tmp_path, values, message):
    with pytest.raises(mw.TrainingError, match=message):
        t.train(Toy, target, output=tmp_path / "w", data=toy_data(), progress=False, **values)


def test_unknown_kind_is_named():
    with pytest.raises(mw.TrainingError, match="drafter kind 'medusa' is not one of eagle3, sps"):
        t.trainable_factory("medusa")
    with pytest.raises(mw.TrainingError, match="'medusa' is not one of"):
        mw.default_weights("medusa", "x")


def test_default_weights_and_weights_fit(target, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    assert mw.default_weights("eagle3", "SmolLM2-135M-Instruct") == \
        tmp_path / "smollm2-135m-instruct-fp32" / "drafters" / "eagle3"
    assert mw.default_weights("sps", target) == tmp_path / "drafters" / "tiny-llama" / "sps"
    folder = tmp_path / "w"
    assert "has no config.json and model.safetensors" in mw.weights_fit(folder, target)
    Toy(target, None).save(_made(folder))
    assert mw.weights_fit(folder, target) == ""
    other = wrap_model(tiny_model("llama", vocab_size=256), name="tiny-llama")
    assert "names target" in mw.weights_fit(folder, other)


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ------------------------------------------------------------------------------ the command


@pytest.mark.parametrize("argv, message", [
    (["train", "medusa"], "invalid choice: 'medusa'"),
    (["train", "eagle3", "--steps", "0"], "expected an integer >= 1, got '0'"),
    (["train", "sps", "--lr", "-1"], "expected a number > 0, got '-1'"),
    (["train", "sps", "--max-minutes", "soon"], "expected a number >= 0, got 'soon'"),
    (["train", "sps", "--batch-size", "x"], "expected an integer >= 1, got 'x'"),
    (["train", "sps", "--option", "9x=1"], "expected KEY=VALUE with KEY a name, got '9x=1'"),
])
def test_cli_refuses_bad_values(argv, message, capsys):
    from pytest_specdec.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_if_missing_skips_fitting_weights_and_trains_otherwise(
        chat_target, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from pytest_specdec.cli import main

    calls = []
    monkeypatch.setattr(t, "train", lambda kind, target, **kw: calls.append((kind, kw)) or
                        t.TrainResult(kind, kw["output"], 3, 3, "steps", 1.0, 2.0, 0.1, 0.03))
    folder = tmp_path / "w"
    Toy(chat_target, None).save(_made(folder))
    argv = ["train", "sps", "--target", str(tiny_model_dir), "--output", str(folder)]
    assert main(argv + ["--if-missing"]) == 0
    assert "nothing to do (--if-missing)" in capsys.readouterr().out and calls == []
    assert main(argv + ["--if-missing", "--steps", "3", "--option", "layers=2"]) == 0
    assert calls == []  # still there: still nothing to do
    (folder / "model.safetensors").unlink()
    assert main(argv + ["--if-missing", "--steps", "3", "--option", "layers=2"]) == 0
    (kind, kw), = calls
    assert (kind, kw["steps"], kw["output"], kw["options"]) == ("sps", 3, folder, {"layers": 2})
    assert "wrote" in capsys.readouterr().out


def test_cli_if_missing_keeps_weights_trained_otherwise_and_says_how(
        chat_target, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from dataclasses import asdict

    from pytest_specdec.cli import main
    from pytest_specdec.training.prompts import DataSettings

    calls = []
    monkeypatch.setattr(t, "train", lambda *a, **kw: calls.append(kw))
    folder = tmp_path / "w"
    Toy(chat_target, None).save(_made(folder))
    saved = (folder / "model.safetensors").read_bytes()
    this_commit = dict(t.kind_defaults("sps"), seed=0, options={},
                       torch_threads=t.DEFAULT_THREADS, data_settings=asdict(DataSettings()))
    older = dict(this_commit, steps=240, data_settings=dict(this_commit["data_settings"],
                                                            max_new_tokens=96))
    unrecorded = {k: v for k, v in this_commit.items() if k != "data_settings"}
    argv = ["train", "sps", "--target", str(tiny_model_dir), "--output", str(folder),
            "--if-missing"]
    for record, note in [
            (this_commit, None),
            (older, "(steps 240 (not 200), data_settings.max_new_tokens 96 (not 64))"),
            (unrecorded, "(data_settings not recorded)")]:
        (folder / "training.json").write_text(json.dumps(dict(record, complete=True,
                                                              steps_done=record["steps"])))
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert "nothing to do (--if-missing)" in out
        if note is None:
            assert "other settings" not in err
        else:
            assert f"note: they were trained with other settings than this command's {note}" \
                   in err and "without --if-missing retrains them, replacing them" in err
    assert calls == [] and (folder / "model.safetensors").read_bytes() == saved


@pytest.mark.parametrize("recorded, wanted, differs", [
    ({"steps": 200, "options": {"layers": 2}}, {"steps": 200, "options": {"layers": 2}}, ""),
    ({"steps": 240}, {"steps": 200}, "steps 240 (not 200)"),
    ({"options": {"layers": 2, "width": 8}}, {"options": {"layers": 2}},
     "options.width 8 (not None)"),
    ({"options": {"layers": 2}}, {"options": {"layers": 2, "width": 8}},
     "options.width None (not 8)"),
    ({"options": {"layers": 2}}, {"options": {}}, "options {'layers': 2} (not {})"),
    ({}, {"data_settings": {"rounds": 2}}, "data_settings not recorded"),
])
def test_trained_otherwise_names_each_setting_that_differs(tmp_path, recorded, wanted, differs):
    (tmp_path / "training.json").write_text(json.dumps(recorded))
    assert mw.trained_otherwise(tmp_path, wanted) == differs
    assert mw.trained_otherwise(tmp_path / "none", wanted) == ""


def test_cli_names_a_bad_prompt_source(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from pytest_specdec.cli import main

    monkeypatch.setattr(t, "trainable_factory", lambda kind: (kind, Toy))

    argv = ["train", "sps", "--target", str(tiny_model_dir), "--output", str(tmp_path / "w"),
            "--prompts", str(tmp_path / "none.jsonl"), "--no-progress"]
    assert main(argv) == 2
    assert "none.jsonl' not found" in capsys.readouterr().err
    assert main(argv[:-3] + ["--holdout", "60"]) == 2
    assert "holdout 60 leaves none of the 50" in capsys.readouterr().err


def test_cli_trains_end_to_end(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from pytest_specdec.cli import main

    monkeypatch.setattr(t, "trainable_factory", lambda kind: (kind, Toy))
    out = tmp_path / "drafters" / "sps"
    argv = ["train", "sps", "--target", str(tiny_model_dir), "--output", str(out),
            "--prompt-limit", "2", "--max-new-tokens", "3", "--rounds", "1", "--samples", "1",
            "--steps", "3", "--batch-size", "2", "--no-progress"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    record = json.loads((out / "training.json").read_text())
    assert (record["steps_done"], record["sequences"], record["batch_size"]) == (3, 4, 2)
    assert (record["data_settings"]["max_new_tokens"], record["data_settings"]["rounds"]) == (3, 1)
    cached = json.loads((tmp_path / "drafters" / td.DATA_FILE).read_text())
    assert cached["settings"]["max_new_tokens"] == 3 and len(cached["sequences"]) == 4
    # the data cache, the target's states captured while generating them, the weights
    assert sorted(p.name for p in (tmp_path / "drafters").iterdir()) == \
        [td.DATA_FILE, td.states_path(Path(td.DATA_FILE)).name, "sps"]


def test_each_checkpoint_says_how_far_the_run_is_and_how_long_is_left(target, tmp_path):
    messages: list[str] = []
    t.train(Toy, target, output=tmp_path / "w", steps=12, lr=1e-2, batch_size=4,
            progress=False, max_minutes=None, checkpoint_every=5, data=toy_data(),
            log=messages.append)
    told = [m for m in messages if "checkpoint saved" in m]
    assert [m.split(" after ")[0] for m in told] == ["toy: step 5/12", "toy: step 10/12"]
    assert all(" to go; checkpoint saved (an interrupted run resumes from it when run again)"
               in m for m in told)
