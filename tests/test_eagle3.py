"""EAGLE-3: the head's shapes and its inference/training agreement, dynamic trees on
hand-worked tables, the three published checkpoint layouts (written here with random
weights, then loaded and drafted from through the engine, lossless), the error when
weights are missing, and a few training steps lowering the loss."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import losses_over_steps
from pytest_specdec.drafters.eagle3 import Eagle3
from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.models.eagle3 import (LAYOUTS, CheckpointError, Eagle3Config, Eagle3Head,
                                          HeadCache, check_fits, eagle_layers, load_checkpoint,
                                          save_checkpoint, trainable)
from pytest_specdec.models.tree import dynamic_tree, grow
from pytest_specdec.protocol.drafter import DraftError
from pytest_specdec.protocol.sampling import Sampler


# -- trees ----------------------------------------------------------------------------

def table_expand(table, calls):
    """A fake draft model: children by candidate index."""
    def expand(frontier, tree):
        calls.append(list(frontier))
        return [table[node] for node in frontier]
    return expand


FIRST = [(10, -0.1), (11, -1.0)]
# candidates: 0:10 (-0.1)  1:11 (-1.0)
# level 2:    2:20<0 (-0.3)  3:21<0 (-2.1)  4:22<1 (-1.1)  5:23<1 (-4.0); frontier [2, 4]
# level 3:    6:30<2 (-0.8)  7:31<2 (-0.9)  8:32<4 (-1.11)  9:33<4 (-6.1)
TABLE = {0: [(20, -0.2), (21, -2.0)], 1: [(22, -0.1), (23, -3.0)],
         2: [(30, -0.5), (31, -0.6)], 4: [(32, -0.01), (33, -5.0)]}


@pytest.mark.parametrize("levels, budget, tokens, parents, frontiers", [
    (1, 5, (10, 11), (-1, -1), []),
    (2, 3, (10, 11, 20), (-1, -1, 0), [[0, 1]]),
    (2, 4, (10, 11, 20, 22), (-1, -1, 0, 1), [[0, 1]]),
    (3, 5, (10, 11, 20, 30, 31), (-1, -1, 0, 2, 2), [[0, 1], [2, 4]]),
    (3, 7, (10, 11, 20, 22, 30, 31, 32), (-1, -1, 0, 1, 2, 2, 3), [[0, 1], [2, 4]]),
    (3, 1, (10,), (-1,), [[0, 1], [2, 4]]),
])
def test_dynamic_tree_table(levels, budget, tokens, parents, frontiers):
    calls: list = []
    got = dynamic_tree(FIRST, table_expand(TABLE, calls), top_k=2, levels=levels, budget=budget)
    assert got == (tokens, parents)
    assert calls == frontiers


def test_tree_scores_are_cumulative():
    tree = grow(FIRST, table_expand(TABLE, []), top_k=2, levels=3)
    assert tree.parents == [-1, -1, 0, 0, 1, 1, 2, 2, 4, 4]
    assert tree.depths == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert tree.scores == pytest.approx([-0.1, -1.0, -0.3, -2.1, -1.1, -4.0, -0.8, -0.9, -1.11, -6.1])
    assert tree.ancestors(8) == [4, 1]


def test_tree_ties_go_to_the_earlier_candidate_and_top_k_bounds_children():
    first = [(5, -1.0), (6, -1.0), (7, -1.0)]
    assert dynamic_tree(first, table_expand({}, []), top_k=2, levels=1, budget=1) == ((5,), (-1,))
    chain = dynamic_tree([(1, -0.5), (2, -0.6)],
                         table_expand({0: [(3, -0.1), (4, -0.2)], 1: [(5, 0.0)]}, []),
                         top_k=1, levels=3, budget=8)
    assert chain == ((1, 3, 5), (-1, 0, 1))


def test_a_child_is_never_taken_without_its_parent():
    # a rising score (impossible for log-probabilities, but the rule must hold anyway)
    got = dynamic_tree([(1, -2.0), (2, -0.5)],
                       table_expand({0: [(3, 1.9)], 1: [(4, -3.0)]}, []),
                       top_k=2, levels=2, budget=2)
    assert got == ((1, 2), (-1, -1))


# -- the head -------------------------------------------------------------------------

def tiny_config(**changes) -> Eagle3Config:
    options = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, draft_vocab_size=128,
                   rope_theta=10000.0, hidden_layers=eagle_layers(2))
    options.update(changes)
    return Eagle3Config(**options)


def random_head(seed: int = 1, **changes) -> Eagle3Head:
    torch.manual_seed(seed)
    head = Eagle3Head(tiny_config(**changes), embeddings=torch.randn(512, 64))
    head.set_vocabulary(range(0, 512, 4))
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for name, p in head.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return head.eval()


def test_head_shapes_and_vocabulary_mapping():
    head = random_head()
    assert head.fc.weight.shape == (64, 3 * 64)
    assert head.midlayer.self_attn.q_proj.weight.shape == (4 * 16, 2 * 64)
    assert head.midlayer.self_attn.k_proj.weight.shape == (2 * 16, 2 * 64)
    assert head.lm_head.weight.shape == (128, 64)
    assert head.target_ids()[:3].tolist() == [0, 4, 8]
    assert head.d2t[:3].tolist() == [0, 3, 6]
    assert int(head.t2d.sum()) == 128 and bool(head.t2d[8]) and not bool(head.t2d[9])
    cache = HeadCache()
    out = head.step(head.fuse(torch.randn(5, 192)), torch.arange(5), torch.arange(5), cache)
    assert out.shape == (5, 64) and cache.length == 5
    assert head.logits(out).shape == (5, 128)
    cache.crop(3)
    assert cache.length == 3
    steps = head.unrolled(torch.randn(2, 7, 192), torch.randint(0, 512, (2, 7)),
                          torch.ones(2, 7, dtype=torch.bool), steps=3)
    assert [tuple(s.shape) for s in steps] == [(2, 7, 128)] * 3


@torch.no_grad()
def test_training_time_test_matches_tree_inference():
    """Step 0 of the unrolled head is the head over the context; step 1 at position i is
    a depth-2 tree node: the head's own output at i, the token after next, at position
    i + 1, seeing the context up to i and itself."""
    head = random_head()
    states, ids = torch.randn(1, 6, 192), torch.randint(0, 512, (1, 6))
    unrolled = head.unrolled(states, ids, torch.ones(1, 6, dtype=torch.bool), steps=2)
    cache = HeadCache()
    out = head.step(head.fuse(states[0, :5]), ids[0, 1:6], torch.arange(5), cache)
    torch.testing.assert_close(head.logits(out), unrolled[0][0, :5], rtol=1e-4, atol=1e-4)
    i = 2
    cache.crop(i + 1)
    visible = torch.ones(1, i + 2, dtype=torch.bool)
    node = head.step(out[i:i + 1], ids[0, i + 2:i + 3], torch.tensor([i + 1]), cache, visible)
    torch.testing.assert_close(head.logits(node)[0], unrolled[1][0, i], rtol=1e-4, atol=1e-4)


# -- checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("layout, bin_file", [("safeailab", True), ("safeailab", False),
                                              ("specforge", False), ("speculators", False)])
def test_checkpoint_layouts_round_trip(tmp_path, layout, bin_file):
    head = random_head(hidden_layers=(2, 1, 1))
    folder = save_checkpoint(head, tmp_path / layout, layout=layout, bin_file=bin_file)
    assert (folder / ("pytorch_model.bin" if bin_file else "model.safetensors")).is_file()
    config = json.loads((folder / "config.json").read_text())
    if layout == "specforge":  # SGLang names decoder layer outputs: index - 1
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 0, 0]
    if layout == "speculators":
        assert config["eagle_aux_hidden_state_layer_ids"] == [2, 1, 1]
        assert config["transformer_layer_config"]["hidden_size"] == 64
    loaded, found = load_checkpoint(folder, embeddings=head.lent_embeddings)
    assert found == layout
    # the SafeAILab release names no layers: EAGLE's (2, L // 2, L - 3) of the target
    assert loaded.config.hidden_layers == (None if layout == "safeailab" else (2, 1, 1))
    assert torch.equal(loaded.d2t, head.d2t) and torch.equal(loaded.t2d, head.t2d)
    x, tokens = torch.randn(4, 192), torch.tensor([1, 5, 9, 400])
    with torch.no_grad():
        a = head.step(head.fuse(x), tokens, torch.arange(4), HeadCache())
        b = loaded.step(loaded.fuse(x), tokens, torch.arange(4), HeadCache())
    torch.testing.assert_close(a, b)


def test_sglang_layer_ids_are_decoder_outputs(tmp_path):
    head = random_head()
    folder = save_checkpoint(head, tmp_path / "sf", layout="specforge")
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_layers"]  # as SpecForge writes it
    config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [0, 1, 1]
    (folder / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(folder, embeddings=head.lent_embeddings)[0].config.hidden_layers == (1, 2, 2)


def test_checkpoint_errors_name_the_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    head = random_head()
    folder = save_checkpoint(head, tmp_path / "c", layout="specforge")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["fc.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks fc\.weight"):
        load_checkpoint(folder)
    weights["fc.weight"] = torch.zeros(64, 100)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"fc\.weight has shape \(64, 100\)"):
        load_checkpoint(folder)
    weights["fc.weight"], weights["extra.bias"] = torch.zeros(64, 192), torch.zeros(3)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"extra\.bias"):
        load_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has none of model.safetensors"):
        load_checkpoint(folder)


def test_check_fits_names_the_mismatch(tiny_target):
    from pytest_specdec.engine import target_info

    info = target_info(tiny_target)
    check_fits(random_head(), info, "here")
    with pytest.raises(CheckpointError, match="vocab_size 1024 does not fit"):
        check_fits(random_head(vocab_size=1024), info, "here")
    with pytest.raises(CheckpointError, match="fuses states 32 wide"):
        check_fits(random_head(target_hidden_size=32), info, "here")
    with pytest.raises(CheckpointError, match=r"layer 7 is not in \[0, 2\]"):
        check_fits(random_head(hidden_layers=(1, 2, 7)), info, "here")


# -- drafting through the engine ------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_drafts_from_each_layout_are_lossless(tmp_path, tiny_target, layout, temperature):
    folder = save_checkpoint(random_head(), tmp_path / layout, layout=layout,
                             bin_file=layout == "safeailab")
    request = GenerationRequest(prompt_ids=tuple(range(5, 25)), max_new_tokens=24,
                                sampler=Sampler(temperature, seed=3))
    plain = generate(tiny_target, request)
    drafter = Eagle3(model=str(folder), depth=3, top_k=4, total_tokens=16)
    spec = generate(tiny_target, request, drafter, k=4, drafter_name="eagle3")
    assert spec.tokens == plain.tokens
    assert drafter.layout == layout and drafter.hidden_layers == eagle_layers(2)
    # the first step is the prompt's own forward (no states yet); then 15-node trees,
    # shallow ones for a random head (its near-uniform log-probabilities favour width)
    assert spec.steps[0].drafted == 0 and max(s.drafted for s in spec.steps) == 15
    assert 2 <= max(s.depth for s in spec.steps) <= 4


def test_missing_default_weights_name_the_train_command(tmp_path, monkeypatch, tiny_target):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    request = GenerationRequest(prompt_ids=(1, 2, 3), max_new_tokens=4)
    with pytest.raises(DraftError, match="pytest-specdec train eagle3"):
        generate(tiny_target, request, Eagle3(), k=4, drafter_name="eagle3")


@pytest.mark.parametrize("options, message", [
    ({"top_k": 0}, "top_k must be an int >= 1"),
    ({"total_tokens": 1}, "total_tokens must be an int >= 2"),
    ({"total_tokens": 300}, "exceeds 257"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        Eagle3(**options)


# -- training -------------------------------------------------------------------------

def test_training_steps_lower_the_loss_and_the_weights_draft(tmp_path, monkeypatch, tiny_target):
    from pytest_specdec.models.weights import default_weights, weights_fit
    from pytest_specdec.training.data import DistillData

    sequences, lengths = [], []
    for seed in range(4):
        prompt = tuple(range(3 + seed, 13 + seed))
        out = generate(tiny_target, GenerationRequest(prompt, 20, Sampler(0.8, seed))).tokens
        sequences.append([*prompt, *out])
        lengths.append(len(prompt))
    data = DistillData(sequences, lengths)
    job = trainable(tiny_target, data, draft_vocab_size=96, steps=3, seed=0)
    assert job.kind == "eagle3" and job.hidden_layers == eagle_layers(2)
    assert job.head.t2d[[t for s in sequences for t in s[10:]]].all()  # generated ids drafted
    batch = next(data.batches(tiny_target, job.hidden_layers, batch_size=4, seed=0))
    losses = losses_over_steps(job, batch, steps=8, lr=3e-3)
    assert losses[-1] < losses[0]
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    from pytest_specdec.engine import target_info

    folder = default_weights("eagle3", target_info(tiny_target))
    job.save(folder)
    assert weights_fit(folder, tiny_target) == ""
    request = GenerationRequest(prompt_ids=tuple(sequences[0][:10]), max_new_tokens=12)
    drafter = Eagle3()
    spec = generate(tiny_target, request, drafter, k=8, drafter_name="eagle3")
    assert spec.tokens == generate(tiny_target, request).tokens
    # the report says the default head was trained here (saved without train(): no log)
    assert drafter.report_note == ("head trained here: self-distilled on the target's own "
                                   "generations (no training.json)")


def _full_step_losses(job, batch):
    """The training-time-test losses computed at every position (the loss's definition,
    without the active-window shortcut)."""
    head = job.head
    t = batch.input_ids.shape[1]
    final = batch.final_hidden.float()
    target_p = torch.softmax(final @ job.output_head.float().T, dim=-1)
    choice = (final @ job.full_output_head.float().T).argmax(-1)
    in_vocab = head.t2d[choice]
    outputs = head.unrolled(batch.hidden, batch.input_ids, batch.attention_mask, job.steps)
    losses = []
    for j, logits in enumerate(outputs):
        shift = 1 + j
        valid = torch.zeros_like(batch.loss_mask)
        p = torch.zeros_like(target_p)
        valid[:, :t - shift] = batch.loss_mask[:, shift:] & in_vocab[:, shift:]
        p[:, :t - shift] = target_p[:, shift:]
        per_position = -(p * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
        losses.append((per_position * valid).sum() / valid.sum().clamp(min=1))
    return losses


@pytest.mark.parametrize("stored", [False, True])
def test_active_window_losses_equal_the_full_unroll(tiny_target, stored):
    """The loss unrolls only the positions a loss reaches: the same values (and
    gradients) as unrolling every position; the stored target choice gives the same
    vocabulary mask as computing it."""
    from pytest_specdec.training.data import DistillData

    sequences = [list(range(3, 3 + n)) for n in (30, 18, 25)]
    data = DistillData(sequences, [14, 3, 20])
    job = trainable(tiny_target, data, draft_vocab_size=96, steps=4, seed=0)
    batch = next(data.batches(tiny_target, job.hidden_layers, batch_size=3, seed=0))
    if not stored:
        batch.target_choice = None
    with torch.no_grad():
        fast, full = job.step_losses(batch), _full_step_losses(job, batch)
    for a, b in zip(fast, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    head = job.head.fc.weight
    grads = []
    for losses in (job.step_losses(batch), _full_step_losses(job, batch)):
        head.grad = None
        sum(losses).backward()
        grads.append(head.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
