"""Shared fixtures: tiny random models built in memory, a tiny model folder on disk
for plugin runs, and the embedded default target (converted once, then cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n auto``) each worker takes one intra-op
    thread: workers already share the cores, and OpenMP threads spinning beside another
    worker's make a small CPU machine several times slower, not faster."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _not_an_xdist_worker_to_child_runs():
    """A pytest run a test starts (pytester) is no xdist worker, whatever this one is:
    pytest-benchmark reads PYTEST_XDIST_WORKER and would disable its benchmarks. (A
    MonkeyPatch of its own: the test's `monkeypatch` must be undone before the test's
    other fixtures are torn down, as without this fixture.)"""
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("PYTEST_XDIST_")]:
            patch.delenv(name)
        yield


def tiny_model(arch: str = "llama", *, vocab_size: int = 512, seed: int = 0):
    """A 2-layer random causal LM; a decode step costs a few milliseconds."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, eos_token_id=vocab_size - 1,
                  bos_token_id=0, pad_token_id=0)
    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma"}
    if arch not in names:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(names)}")
    config = getattr(transformers, f"{names[arch]}Config")(**common)
    return getattr(transformers, f"{names[arch]}ForCausalLM")(config).eval()


def leaking_previous_row(real_mask):
    """The batched engine's mask builder (``batch._mask``), made to leak: each row also
    sees the previous row's columns (an off-by-one between sequences)."""

    def leaky(target, cache, fed, width, positions):
        if cache.columns:
            leaked = cache.valid.clone()
            leaked[1:] |= cache.valid[:-1]
            cache.valid, kept = leaked, cache.valid
            try:
                return real_mask(target, cache, fed, width, positions)
            finally:
                cache.valid = kept
        return real_mask(target, cache, fed, width, positions)

    return leaky


def small_config(report_dir: Path, **changes):
    """A SpecdecConfig for a session run in-process on a tiny target: Best-of-N, 2
    problems × 2 samples of 6 tokens, T=0, one timed round, no peers; `changes`
    override any field."""
    import dataclasses

    from pytest_specdec.bench.config import SpecdecConfig

    base = SpecdecConfig(
        target="", device="cpu", dtype="float32", trust_remote_code=False, drafters=None,
        paradigms=("best_of_n",), dataset="embedded", dataset_split="test", problems=2,
        max_new_tokens=6, n=2, rounds=2, temperatures=(0.0,), seed=0, k=None,
        timed_rounds=1, report_dir=report_dir, peers=(), strict=False, tie_margin=None,
        step_timeout=0.0, compare=None, compare_fail=())
    return dataclasses.replace(base, **changes)


def losses_over_steps(trainable, batch, *, steps: int, lr: float) -> list[float]:
    """The loss at each of `steps` AdamW steps of a model drafter's trainable on one
    batch (its trained parameters only): a few steps must lower it."""
    optimizer = torch.optim.AdamW([p for p in trainable.module.parameters() if p.requires_grad],
                                  lr=lr)
    losses = []
    for _ in range(steps):
        loss = trainable.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


SUITE = Path(__file__).resolve().parents[1] / "suites" / "test_cases.py"
#: A hand-written run in pytest-benchmark's saved format (see tests/test_report.py).
STORED_RUN = Path(__file__).parent / "data" / "run_pld.json"
#: Its summary table: every expected figure can be checked by hand.
STORED_SUMMARY = [
    ["drafter", "multi_round T=0", "best_of_n T=0.6"],
    ["baseline", "1.00x · MAT 1.00", "1.00x · MAT 1.00"],
    ["pld", "2.00x · MAT 2.29", "1.60x · MAT 1.60"],
    ["hf_generate", "1.00x · MAT 1.00", "1.00x · MAT 1.00"],
    ["hf_pld", "1.25x · MAT 2.00", "1.28x · MAT 1.28"],
]


@pytest.fixture
def records() -> list[dict]:
    """The stored run's case records."""
    from pytest_specdec.reporting import load_records

    return load_records([STORED_RUN])


@pytest.fixture
def run_data() -> dict:
    """The stored run's JSON, to be altered by a test."""
    import json

    return json.loads(STORED_RUN.read_text(encoding="utf-8"))


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester dir holding the real suite, with the environment the subprocess needs:
    the same converted-model cache as this process (nothing is converted twice)."""
    from pytest_specdec.engine.target import cache_dir

    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(cache_dir()))
    # one intra-op thread: on a small, busy CPU machine OpenMP spinning makes a
    # 1-second run take 40 seconds; results do not depend on it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # one baseline round, unless a test asks for more on its command line (argparse
    # keeps the last value): the round scatter is tested in-process (test_timing.py),
    # and two more rounds in every subprocess cost the whole suite about half a minute
    monkeypatch.setenv("PYTEST_ADDOPTS", "--specdec-baseline-rounds 1")
    pytester.makepyfile(test_cases=SUITE.read_text(encoding="utf-8"))
    return pytester


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def target(request):
    """A tiny random target of each architecture tree verification is tested on."""
    from pytest_specdec.engine.target import wrap_model

    return wrap_model(tiny_model(request.param), name=f"tiny-{request.param}")


@pytest.fixture(scope="module")
def llama():
    from pytest_specdec.engine.target import wrap_model

    return wrap_model(tiny_model("llama"), name="tiny-llama")


@pytest.fixture
def tiny_target():
    from pytest_specdec.engine.target import wrap_model

    return wrap_model(tiny_model("llama"), name="tiny-llama")


@pytest.fixture(scope="session")
def embedded_folder() -> Path:
    from pytest_specdec.engine.target import embedded_folder as folder

    return folder()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_folder) -> Path:
    """A tiny random Llama saved with the embedded tokenizer: a real model folder that
    loads through --specdec-target in a second or so."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_folder)
    folder = tmp_path_factory.mktemp("tiny-model")
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def default_target(embedded_folder):
    from pytest_specdec.engine.target import load_target

    return load_target("embedded", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def default_bf16(embedded_folder):
    """The default model in bfloat16: a trained model, whose logits depend on context
    as a random tiny one's hardly do, and whose rounding shows half precision's flips."""
    from pytest_specdec.engine.target import load_target

    return load_target("embedded", device="cpu", dtype="bfloat16")
