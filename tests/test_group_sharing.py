"""The group-sharing ablation on the default model: in multi-round thinking, round 2
of a problem repeats much of round 1, and a drafter that keeps the problem's earlier
sequences (SAM's group automaton, SuffixDecoding's global tree, PLD's share_group)
accepts more there than the same drafter without it. Outputs stay identical."""

from __future__ import annotations

import pytest

from pytest_specdec.bench.paradigms import make_paradigm
from pytest_specdec.bench.problems import load_problems
from pytest_specdec.bench.runner import DecodeSettings, engine_method, run_paradigm
from pytest_specdec.engine.metrics import mat_by_index
from pytest_specdec.protocol.registry import load_registry

# drafter, options with sharing, options without
ABLATIONS = [
    ("sam", {}, {"share_group": "false"}),
    ("pld", {"share_group": "true"}, {}),
]


def round_mats(target, name: str, options: dict[str, str]) -> tuple[list[float], str]:
    registered = load_registry().get(name)
    drafter = registered.create(**registered.convert_options(options))
    result = run_paradigm(target, make_paradigm("multi_round", rounds=2),
                          load_problems("embedded", limit=1),
                          engine_method(target, drafter, k=5, drafter_name=name),
                          DecodeSettings(temperature=0.0, seed=0, max_new_tokens=64, k=5))
    mats = mat_by_index((key[2], g.stats) for key, g in result.outputs.items())
    return mats, result.digest


@pytest.mark.parametrize("name, shared, alone", ABLATIONS, ids=[a[0] for a in ABLATIONS])
def test_sharing_raises_mat_of_round_two(default_target, name, shared, alone):
    with_sharing, digest_shared = round_mats(default_target, name, shared)
    without, digest_alone = round_mats(default_target, name, alone)
    assert digest_shared == digest_alone  # the same tokens, whatever the drafter knew
    assert with_sharing[0] == without[0]  # round 1 has nothing earlier to share
    assert with_sharing[1] > without[1]
