"""SpS: the draft language model (derive, save, load, vocabulary check, distillation)
and the drafter (its KV cache in step with the target's, coupled drafts, the adaptive
draft length), on tiny in-memory models."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import losses_over_steps, tiny_model
from pytest_specdec.drafters.sps import SpeculativeSampling, next_draft_length
from pytest_specdec.engine import GenerationRequest, generate, target_info
from pytest_specdec.engine.target import wrap_model
from pytest_specdec.models.draft_lm import (META_FILE, DraftModelError, check_vocab,
                                            derive_draft_model, load_draft_model, save_draft_model,
                                            trainable)
from pytest_specdec.models.weights import target_signature, weights_fit
from pytest_specdec.protocol.drafter import DraftRequest
from pytest_specdec.protocol.sampling import Sampler
from pytest_specdec.training.data import DistillData

PROMPT = (1, 17, 42, 7, 99, 3, 250, 12)


@pytest.fixture(scope="module")
def target():
    return wrap_model(tiny_model("llama"), name="tiny-llama")


@pytest.fixture(scope="module")
def same_folder(target, tmp_path_factory):
    """The target itself saved as a draft: it must agree with the target everywhere."""
    return save_draft_model(target.model, None, tmp_path_factory.mktemp("same"), target)


@pytest.fixture(scope="module")
def other_folder(target, tmp_path_factory):
    """An unrelated random draft of the same vocabulary."""
    return save_draft_model(tiny_model("llama", seed=1), None, tmp_path_factory.mktemp("other"),
                            target)


def drafter_for(target, folder, **options) -> SpeculativeSampling:
    drafter = SpeculativeSampling(model=str(folder), **options)
    with torch.inference_mode():
        drafter.attach(target_info(target))
    return drafter


def run(target, drafter=None, *, k=4, temperature=0.0, new=41, seed=3):
    request = GenerationRequest(PROMPT, new, Sampler(temperature, seed), group="p")
    return generate(target, request, drafter, k=k, drafter_name="sps")


# --------------------------------------------------------------------------- the draft model


def test_derive_copies_embeddings_first_layers_norm_and_head(target):
    draft = derive_draft_model(target.model, 1)
    assert draft.config.num_hidden_layers == 1 and len(draft.model.layers) == 1
    ours, theirs = draft.state_dict(), target.model.state_dict()
    assert set(ours) == {k for k in theirs if ".layers.1." not in k}
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    # every layer kept: the same model, the same logits
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(derive_draft_model(target.model, 2)(ids).logits,
                           target.model(ids).logits)


@pytest.mark.parametrize("layers", [0, 3, 1.0])
def test_derive_refuses_a_depth_the_target_does_not_have(target, layers):
    with pytest.raises(DraftModelError, match=rf"num_layers {layers!r} is not an int in \[1, 2\]"):
        derive_draft_model(target.model, layers)


def test_save_and_load_round_trip(target, tmp_path):
    draft = derive_draft_model(target.model, 1)
    folder = save_draft_model(draft, None, tmp_path / "d", target)
    config = json.loads((folder / "config.json").read_text())
    assert config["target"] == target_signature(target) == {
        "name": "tiny-llama", "hidden_size": 64, "vocab_size": 512, "num_layers": 2}
    meta = json.loads((folder / META_FILE).read_text())
    assert meta == {"kind": "sps", "target": target_signature(target), "num_layers": 1,
                    "derived_from": "tiny-llama"}
    info = target_info(target)
    assert weights_fit(folder, info) == ""
    loaded = load_draft_model(folder, info)
    assert loaded.config.num_hidden_layers == 1
    assert next(loaded.parameters()).dtype == info.dtype and not loaded.training
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, draft(ids).logits)


def test_a_draft_with_another_logits_width_is_a_clear_error(target, tmp_path):
    folder = save_draft_model(tiny_model("llama", vocab_size=256), None, tmp_path, target)
    with pytest.raises(DraftModelError, match="has 256 logits but the target has 512"):
        load_draft_model(folder, target_info(target))
    drafter = SpeculativeSampling(model=str(folder))
    with pytest.raises(DraftModelError, match="256 logits"):
        drafter.attach(target_info(target))


def test_a_missing_draft_folder_is_a_clear_error(target, tmp_path):
    with pytest.raises(DraftModelError, match="draft model folder '/nowhere/draft' does not exist"):
        load_draft_model("/nowhere/draft", target_info(target))


VOCAB = {"a": 0, "b": 1, "c": 2}
VOCAB_CASES = [
    # id, draft vocab, target vocab, widths, error (None: accepted)
    ("same", VOCAB, VOCAB, (3, 3), None),
    ("unknown-vocabularies-widths-agree", None, VOCAB, (3, 3), None),
    ("widths-differ", VOCAB, VOCAB, (4, 3), "has 4 logits but the target has 3"),
    ("sizes-differ", {**VOCAB, "d": 3}, VOCAB, (3, 3),
     "tokenizer has 4 tokens but the target's has 3"),
    ("a-token-differs", {"a": 0, "x": 1, "c": 2}, VOCAB, (3, 3),
     "differs from the target's at id 1: 'x' in the draft, 'b' in the target"),
    ("ids-swapped", {"a": 0, "b": 2, "c": 1}, VOCAB, (3, 3),
     "at id 1: 'c' in the draft, 'b' in the target"),
]


@pytest.mark.parametrize("draft_vocab, target_vocab, widths, error",
                         [c[1:] for c in VOCAB_CASES], ids=[c[0] for c in VOCAB_CASES])
def test_check_vocab(draft_vocab, target_vocab, widths, error):
    call = lambda: check_vocab(draft_vocab, target_vocab, draft_width=widths[0],  # noqa: E731
                               target_width=widths[1], draft="d")
    if error is None:
        call()
    else:
        with pytest.raises(DraftModelError, match=error):
            call()


def test_a_draft_tokenizer_unlike_the_targets_is_refused_on_load(target, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(512)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, "w0")))
    folder = save_draft_model(tiny_model("llama"), tokenizer, tmp_path, target)
    vocab = tokenizer.get_vocab()
    info = target_info(target)
    load_draft_model(folder, type(info)(**{**info.__dict__, "vocab": vocab}))  # same: loads
    renamed = {("zz" if t == "w7" else t): i for t, i in vocab.items()}
    with pytest.raises(DraftModelError, match="at id 7: 'w7' in the draft, 'zz' in the target"):
        load_draft_model(folder, type(info)(**{**info.__dict__, "vocab": renamed}))


def test_missing_default_weights_name_the_train_command(target, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    # a missing prerequisite, not a broken draft model (skipped in the default set)
    from pytest_specdec.protocol.drafter import MissingPrerequisite

    with pytest.raises(MissingPrerequisite, match="pytest-specdec train sps"):
        SpeculativeSampling().attach(target_info(target))


def test_default_weights_for_another_target_are_refused(target, tmp_path, monkeypatch):
    from pytest_specdec.models.weights import default_weights

    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path))
    info = target_info(target)
    other = wrap_model(tiny_model("llama", seed=2), name="tiny-llama")
    other.model.config.num_hidden_layers = 3  # what the signature reads
    save_draft_model(derive_draft_model(target.model, 1), None, default_weights("sps", info),
                     other)
    with pytest.raises(DraftModelError, match="does not fit target 'tiny-llama'.*train sps"):
        SpeculativeSampling().attach(info)


def test_training_steps_lower_the_loss_and_save_a_loadable_draft(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():  # peaked next-token distributions: a 1-layer draft is far off
        model.lm_head.weight.mul_(20)
    sharp = wrap_model(model, name="tiny-sharp")
    rows = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    data = DistillData(rows.tolist(), [8, 8])
    torch.manual_seed(0)
    draft = trainable(sharp, data, num_layers=1)
    assert draft.kind == "sps" and draft.hidden_layers == ()
    trained = {n for n, p in draft.module.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("layers.0.", "norm.")) for n in trained)
    assert not any(p.requires_grad for p in draft.draft.lm_head.parameters())
    batch = data.batch(sharp, draft.hidden_layers, [0, 1])
    losses = losses_over_steps(draft, batch, steps=6, lr=1e-3)
    assert losses[-1] < 0.5 * losses[0], losses
    draft.save(tmp_path)
    assert weights_fit(tmp_path, sharp) == ""
    loaded = load_draft_model(tmp_path, target_info(sharp))
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight,
                       draft.module["layers"][0].mlp.up_proj.weight.detach())


def test_unknown_training_options_are_named(target):
    with pytest.raises(DraftModelError, match=r"unknown sps training option\(s\) \['width'\]"):
        trainable(target, None, width=3)


# --------------------------------------------------------------------------- the drafter


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_a_draft_identical_to_the_target_accepts_every_token(target, same_folder, temperature):
    k = 4
    drafter = drafter_for(target, same_folder, adaptive=False, draft_length=k)
    out = run(target, drafter, k=k, temperature=temperature)
    assert out.tokens == run(target, k=k, temperature=temperature).tokens
    *steps, last = out.steps
    assert steps and all(s.drafted == s.accepted == k and s.emitted == k + 1 for s in steps)
    assert last.accepted == last.drafted  # the last step: what the budget or EOS leaves
    if out.stop == "budget":
        assert out.stats.new_tokens == 41 and len(out.steps) == 9  # 8 x 5 + 1


@pytest.mark.parametrize("temperature", [0.0, 0.6])
@pytest.mark.parametrize("adaptive", [False, True])
def test_lossless_with_a_different_draft(target, other_folder, temperature, adaptive):
    drafter = drafter_for(target, other_folder, adaptive=adaptive)
    for seed in (3, 4):  # two sequences through one instance
        out = run(target, drafter, k=6, temperature=temperature, seed=seed, new=20)
        assert out.tokens == run(target, k=6, temperature=temperature, seed=seed, new=20).tokens
        assert out.stats.drafted > 0


def test_rolled_back_cache_drafts_as_a_fresh_prefill(target, other_folder):
    """After drafts that were partly rejected, the draft cache holds exactly the context:
    the next draft equals a fresh drafter's on the whole context."""
    sampler = Sampler(0.6, 9)
    stepped = drafter_for(target, other_folder, adaptive=False, draft_length=3)
    stepped.begin(DraftRequest(PROMPT, "p", sampler=sampler))
    context = list(PROMPT)
    with torch.inference_mode():
        for keep in (0, 2, 3, 1):  # accept `keep` draft tokens, then a bonus token
            draft = stepped.propose(tuple(context), 3).tokens
            emitted = [*draft[:keep], (draft[keep] + 1) % 512 if keep < len(draft) else 5]
            stepped.accept(tuple(emitted))
            context += emitted
            assert stepped.cache.get_seq_length() == stepped.cached <= len(context) - 1
        fresh = drafter_for(target, other_folder, adaptive=False, draft_length=3)
        fresh.begin(DraftRequest(tuple(context), "p", sampler=sampler))
        assert stepped.propose(tuple(context), 3) == fresh.propose(tuple(context), 3)


def test_drafts_are_the_samplers_choices_on_the_draft_logits(target, same_folder):
    """A draft token at absolute position t is sampler.choose(draft logits, t): with the
    target as its own draft, the drafts are plain decoding's next tokens."""
    sampler = Sampler(0.6, 5)
    plain = run(target, temperature=0.6, seed=5, new=6).tokens
    drafter = drafter_for(target, same_folder, adaptive=False, draft_length=6)
    drafter.begin(DraftRequest(PROMPT, "p", sampler=sampler))
    with torch.inference_mode():
        assert drafter.propose(PROMPT, 6).tokens == tuple(plain)


ADAPTIVE_CASES = [
    # length, accepted, cap -> next (transformers 4.37's "heuristic" schedule)
    (5, 5, 32, 7),    # as many accepted as the length: 2 longer
    (5, 4, 32, 4),    # one fewer: 1 shorter
    (5, 0, 32, 4),
    (1, 0, 32, 1),    # never below 1
    (1, 1, 32, 3),
    (31, 31, 32, 32),  # never above the cap (the largest k)
    (7, 4, 32, 6),    # a draft cut short (k, budget, EOS), all 4 accepted: shorter
    (9, 9, 5, 5),     # a cap below the length: back within it
]


@pytest.mark.parametrize("length, accepted, cap, expected", ADAPTIVE_CASES)
def test_adaptive_length_follows_the_heuristic(length, accepted, cap, expected):
    assert next_draft_length(length, accepted, cap=cap) == expected


def test_adaptive_length_through_the_engine(target, same_folder, other_folder):
    """A draft the target always accepts grows 5, 7, 9, ... up to k; one it rejects
    shrinks to 1; the length carries over to the instance's next sequence."""
    agreeing = drafter_for(target, same_folder)
    out = run(target, agreeing, k=9, new=28)
    # 6 + 8 + 10 emitted, then the budget leaves room for 3 drafts: cut short, shorter
    assert [s.drafted for s in out.steps] == [5, 7, 9, 3]
    assert agreeing.length == 8
    assert run(target, agreeing, k=9, new=12).steps[0].drafted == 8
    rejecting = drafter_for(target, other_folder)
    out = run(target, rejecting, k=9, new=16)
    # the schedule, step by step: each step's length from the previous step's outcome
    expected = [5]
    for step in out.steps[:-1]:
        expected.append(next_draft_length(expected[-1], step.accepted, cap=9))
    assert [s.drafted for s in out.steps] == [min(n, 16 - e - 1) for n, e in zip(
        expected, [sum(s.emitted for s in out.steps[:i]) for i in range(len(out.steps))])]
    assert rejecting.length == 1


@pytest.mark.parametrize("options, error", [
    ({"draft_length": 0}, "draft_length must be an int >= 1, got 0"),
    ({"max_depth": 0}, "max_depth must be an int >= 1, got 0"),
])
def test_bad_options_are_named(options, error):
    with pytest.raises(ValueError, match=error):
        SpeculativeSampling(**options)


def test_report_note_names_the_draft(target, tmp_path):
    """The report's row says which draft ran: a named model, or one derived here."""
    from pytest_specdec.models.draft_lm import derived_note

    folder = save_draft_model(derive_draft_model(target.model, 1), None, tmp_path / "d", target)
    assert drafter_for(target, folder).report_note == f"draft model {folder}"
    (folder / "training.json").write_text(json.dumps(
        {"steps_done": 440, "steps": 600, "stopped": "time", "loss": 0.3296}))
    assert derived_note(folder) == (
        "derived from tiny-llama (its first 1 of 2 layers, its embeddings and head), "
        "self-distilled on the target's own generations, 440/600 steps (stopped by the "
        "time budget), final loss 0.33")
