"""Per-step drafting cost at growing context lengths: incremental drafters stay flat.

Run: ``pytest benchmarks/`` (add ``--benchmark-save=NAME`` to keep the numbers). Each
timing case puts a drafter mid-sequence after L tokens of context and times rounds of
propose + accept steps; ``test_cost_does_not_grow`` then compares the longest context
with the shortest. Hugging Face's rescanning prompt lookup runs beside them for
contrast and is not gated.
"""

from __future__ import annotations

import statistics
import time

import pytest

from benchmarks.conftest import COST_KEY, length_label
from benchmarks.propose_cost import RescanPromptLookup, SteadyState, synthetic_stream
from pytest_specdec.protocol.registry import load_registry

#: The n-gram drafters whose step must cost the same at any context length.
CONSTANT_COST = ("pld", "sam", "suffix", "pia", "rest")
CONTRAST = "hf_rescan_pld"
STEP_MARGIN = 4096  # stream tokens past the longest context, for the timed steps


def make_drafter(name: str):
    if name == CONTRAST:
        return RescanPromptLookup()
    return load_registry().get(name).create()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "context_length" in metafunc.fixturenames:
        lengths = metafunc.config.getoption("cost_lengths")
        metafunc.parametrize("context_length", lengths, ids=[length_label(n) for n in lengths])


@pytest.fixture(scope="module")
def stream(request) -> list[int]:
    return synthetic_stream(max(request.config.getoption("cost_lengths")) + STEP_MARGIN)


@pytest.fixture(scope="module")
def history(request) -> list[int]:
    """The earlier sample every measured sequence follows (another stream)."""
    return synthetic_stream(request.config.getoption("cost_history"), seed=1)


@pytest.mark.parametrize("name", [*CONSTANT_COST, CONTRAST])
def test_step_cost(name, context_length, stream, history, benchmark, request):
    config = request.config
    steps = config.getoption("cost_steps")
    if name == CONTRAST:  # its steps cost up to ~0.1 s at long contexts
        steps = max(1, steps // 20)
    state = SteadyState(make_drafter(name), stream, context_length, history)
    started = time.perf_counter()
    state.begin()
    begin_s = time.perf_counter() - started
    per_step: list[float] = []

    def timed_round() -> None:
        t0 = time.perf_counter()
        state.steps(steps)
        per_step.append((time.perf_counter() - t0) / steps)

    state.steps(10)  # warm-up: caches, lazy structures
    benchmark.pedantic(timed_round, rounds=config.getoption("cost_rounds"), iterations=1)
    median = statistics.median(per_step)
    nodes = state.drafted / state.steps_run
    config.stash[COST_KEY][(name, context_length)] = (median, nodes)
    benchmark.extra_info.update({
        "drafter": name, "context_length": context_length, "step_s_median": median,
        "draft_nodes_per_step": nodes, "begin_s": begin_s,
        "acceptance_rate": state.accepted / max(state.drafted, 1)})
    # the stream repeats itself: a drafter that never proposes measures nothing
    assert state.drafted > 0, f"{name} proposed nothing on a repetitive stream"


@pytest.mark.parametrize("name", CONSTANT_COST)
def test_cost_does_not_grow(name, request):
    config = request.config
    lengths = config.getoption("cost_lengths")
    costs = config.stash[COST_KEY]
    missing = [length_label(n) for n in (lengths[0], lengths[-1]) if (name, n) not in costs]
    assert not missing, f"{name}: no step cost measured at {', '.join(missing)} (run those cases too)"
    ratio = costs[(name, lengths[-1])][0] / costs[(name, lengths[0])][0]
    limit = config.getoption("cost_max_ratio")
    assert ratio <= limit, (f"{name}: a step costs {ratio:.2f}x as much at "
                            f"{length_label(lengths[-1])} tokens as at {length_label(lengths[0])} "
                            f"(limit {limit}): the drafter rescans its context")
