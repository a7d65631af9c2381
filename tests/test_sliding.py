"""Tree verification on sliding-window targets (Gemma 3, Mistral, gpt-oss, Qwen2 with
sliding layers): output equal to plain decoding, which uses the model's own masks, with
contexts several windows long and trees deeper than the window; the exact path on
hand-built trees past the window; the cache after a branch equal to a fresh prefill;
rolled-back chains past the window; a real tree drafter; the refusals that remain."""

from __future__ import annotations

import pytest
import torch

from pytest_specdec.engine import GenerationRequest, generate, speculative_step
from pytest_specdec.engine.target import SLIDING, Target, wrap_model
from pytest_specdec.protocol.drafter import Draft, DraftError, DrafterBase
from pytest_specdec.protocol.sampling import Sampler
from test_tree import PROMPT, TREES, VOCAB, NoisyTree, _resolve, run

WINDOW = 5  # the prompt alone (7 tokens) is past it; trees up to 10 deep exceed it

#: per architecture: (config class, model class, layer types, extra config)
ARCHS = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               [SLIDING, "full_attention", SLIDING], {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", None, {}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", [SLIDING, "full_attention"],
                {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2}),
    # Qwen2's own switch: layers from max_window_layers on slide
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", None,
              {"use_sliding_window": True, "max_window_layers": 1}),
}


def sliding_model(arch: str, *, window: int = WINDOW, vocab_size: int = VOCAB, seed: int = 0):
    """A tiny random causal LM with sliding-window layers, built in memory. It has no
    EOS token, so every generation runs to its budget, several windows long."""
    import transformers

    config_name, model_name, layer_types, extra = ARCHS[arch]
    torch.manual_seed(seed)
    layers = len(layer_types) if layer_types else 2
    config = getattr(transformers, config_name)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=None, bos_token_id=0, pad_token_id=0, sliding_window=window,
        **({"layer_types": layer_types} if layer_types else {}), **extra)
    return getattr(transformers, model_name)(config).eval()


_TARGETS: dict[str, Target] = {}


def target_of(arch: str) -> Target:
    """The default tiny sliding target of an architecture, built once per test run
    (tests that alter a model build their own)."""
    if arch not in _TARGETS:
        _TARGETS[arch] = wrap_model(sliding_model(arch), name=f"tiny-{arch}-sliding")
    return _TARGETS[arch]


@pytest.fixture(scope="module", params=list(ARCHS))
def sliding(request) -> Target:
    return target_of(request.param)


def _sliding_layers(target: Target) -> list[bool]:
    return [t == SLIDING for t in target.layer_types()[0]]


def test_sliding_targets_verify_trees(sliding):
    layers = _sliding_layers(sliding)
    assert any(layers)  # each architecture really has sliding layers
    assert sliding.layer_types()[1] == WINDOW
    assert sliding.tree_support() == ""


def test_layer_types_are_read_as_the_model_reads_them():
    expected = {"gemma3": [True, False, True], "mistral": [True, True],
                "gpt_oss": [True, False], "qwen2": [False, True]}
    for arch, layers in expected.items():
        target = target_of(arch)
        assert _sliding_layers(target) == layers, arch
        cache = target.new_cache()
        assert [bool(layer.is_sliding) for layer in cache.layers] == layers, arch


# --- whole generations: output equals plain decoding --------------------------------------

def test_baseline_equals_decoding_without_a_cache(sliding):
    """The reference the tree tests compare with: the engine's plain decoding on the
    recording, trimmed sliding cache is what the model gives with no cache at all
    (every step a full forward through the model's own masks), past the window."""
    truth = run(sliding, max_new_tokens=24)
    tokens = list(PROMPT)
    with torch.inference_mode():
        for _ in range(24):
            logits = sliding.model(input_ids=torch.tensor([tokens]), use_cache=False).logits
            tokens.append(int(logits[0, -1].argmax()))
    assert truth == tokens[len(PROMPT):]


class Ladder(DrafterBase):
    """The true continuation, k deep, always as the second child after a wrong first
    one: every accepted path leaves the first branch and is longer than the window."""

    def __init__(self, truth):
        self.truth = truth

    def propose(self, context, k):
        done = len(context) - len(PROMPT)
        tokens, parents = [], []
        for token in self.truth[done:done + k]:
            parent = len(tokens) - 1 if tokens else -1
            tokens += [(token + 1) % VOCAB, token]
            parents += [parent, parent]
        return Draft(tuple(tokens), tuple(parents))


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_tree_output_equals_baseline_past_the_window(sliding, temperature):
    # 7 prompt + 48 new tokens: the context spans 11 windows; k=10 makes trees deeper
    # than the window, so a deep node must not see its oldest ancestors
    truth = run(sliding, max_new_tokens=48, temperature=temperature, seed=1)
    request = GenerationRequest(PROMPT, 48, Sampler(temperature, 1))
    out = generate(sliding, request, NoisyTree(truth, 1), k=10, drafter_name="noisy-tree")
    assert out.tokens == truth
    assert out.stats.mat > 1.5
    assert out.stats.drafted > out.stats.accepted
    deep = generate(sliding, request, Ladder(truth), k=10, drafter_name="ladder")
    assert deep.tokens == truth
    assert max(step.accepted for step in deep.steps) > WINDOW


class WrongLast(DrafterBase):
    """The true continuation with its last token wrong: every step rolls one back."""

    def __init__(self, truth):
        self.truth = truth

    def propose(self, context, k):
        done = len(context) - len(PROMPT)
        chain = self.truth[done:done + k]
        return Draft((*chain[:-1], (chain[-1] + 1) % VOCAB)) if chain else Draft()


def test_chains_roll_back_past_the_window(sliding):
    truth = run(sliding, max_new_tokens=40)
    out = generate(sliding, GenerationRequest(PROMPT, 40, Sampler()), WrongLast(truth), k=4)
    assert out.tokens == truth
    assert out.stats.drafted > out.stats.accepted > 0


# --- hand-built trees after a context several windows long --------------------------------

_TRUTH: dict[tuple[str, int], list[int]] = {}


def _long_context(target: Target, done: int = 20) -> tuple[list[int], list[int], object]:
    """PROMPT + `done` baseline tokens, all but the last cached; and the tokens after."""
    key = (target.name, done)
    if key not in _TRUTH:
        _TRUTH[key] = run(target, max_new_tokens=done + 10)
    truth = _TRUTH[key]
    context = [*PROMPT, *truth[:done]]
    cache = target.new_cache()
    with torch.inference_mode():
        target.forward(context[:-1], cache)
    return context, truth[done:], cache


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
@pytest.mark.parametrize("tokens, parents, path, emitted", [c[1:] for c in TREES],
                         ids=[c[0] for c in TREES])
def test_tree_accepts_exactly_the_expected_path_past_the_window(arch, tokens, parents, path,
                                                                emitted):
    target = target_of(arch)
    context, after, cache = _long_context(target)
    draft = Draft(_resolve(tokens, after), parents)
    with torch.inference_mode():
        step = speculative_step(target, Sampler(), cache, context, len(context) - 1, draft)
    assert step.emitted == list(_resolve(emitted, after))
    assert [draft.tokens[i] for i in path] == step.emitted[:-1]
    assert cache.get_seq_length() == len(context) + len(path)


def test_cache_after_a_branch_equals_a_fresh_prefill(sliding):
    """Past the window, a path off the first branch is moved into place in every
    layer: the next logits, and every key and value a layer still holds, are those of
    a cache built from scratch over the same tokens."""
    context, after, cache = _long_context(sliding)
    x = _resolve(("x",), after)[0]
    with torch.inference_mode():
        step = speculative_step(sliding, Sampler(), cache, context, len(context) - 1,
                                Draft((x, after[0], x, after[1]), (-1, -1, 1, 1)))
        assert step.emitted == after[:3]
        context = [*context, *step.emitted]
        fresh = sliding.new_cache()
        expected, _ = sliding.forward(context[:-1], fresh)
        for kind, mine, theirs in zip(_sliding_layers(sliding), cache.layers, fresh.layers):
            held = mine.keys.shape[-2]
            # a sliding layer keeps at least what its window needs; a full one everything
            assert held >= WINDOW - 1 if kind else held == len(context) - 1
            for name in ("keys", "values"):
                torch.testing.assert_close(getattr(mine, name),
                                           getattr(theirs, name)[..., -held:, :],
                                           rtol=1e-5, atol=1e-5)
        after_tree, _ = sliding.forward(context[-1:], cache)
        from_scratch, _ = sliding.forward(context[-1:], fresh)
    torch.testing.assert_close(after_tree[-1], from_scratch[-1], rtol=1e-4, atol=1e-4)


def test_probes_past_the_window_see_what_a_chain_would(sliding):
    """Lookahead's probes go through the same masks: a probe chain on the true path,
    deeper than the window, chooses the true next tokens; none is ever accepted."""
    context, after, cache = _long_context(sliding)
    probes = tuple(after[:WINDOW + 1])
    draft = Draft((after[0],), probe_tokens=probes, probe_parents=tuple(range(-1, WINDOW)))
    with torch.inference_mode():
        step = speculative_step(sliding, Sampler(), cache, context, len(context) - 1, draft)
    assert step.emitted == after[:2]
    assert step.probe_choices == tuple(after[1:WINDOW + 2])
    assert cache.get_seq_length() == len(context) + 1


def test_sliding_layers_stay_bounded_without_rollbacks():
    """Plain decoding never crops: the sliding layers drop what their window no longer
    needs before each forward, so they hold window - 1 positions plus the new ones."""
    target = target_of("gemma3")
    cache = target.new_cache()
    with torch.inference_mode():
        target.forward(list(range(1, 30)), cache)
        for token in (5, 6, 7):
            target.forward([token], cache)
    for kind, layer in zip(_sliding_layers(target), cache.layers):
        assert layer.keys.shape[-2] == (WINDOW if kind else 32)
    assert cache.get_seq_length() == 32


def test_a_sliding_cache_that_does_not_record_the_past_is_refused_clearly():
    from transformers import DynamicCache

    target = target_of("mistral")
    context, after, _ = _long_context(target)
    cache = DynamicCache(config=target.model.config)  # trims to the window on update
    x = _resolve(("x",), after)[0]
    with torch.inference_mode():
        target.forward(context[:-1], cache)
        with pytest.raises(RuntimeError, match="does not record past states"):
            speculative_step(target, Sampler(), cache, context, len(context) - 1,
                             Draft((x, after[0]), (-1, -1)))


# --- a real tree drafter ------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gemma3", "gpt_oss"])
@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_suffix_decoding_is_lossless_on_sliding_targets(arch, temperature):
    from pytest_specdec.drafters.suffix import SuffixDecoding

    # a small vocabulary makes the texts share contexts, so the tries branch; sample 2
    # repeats the seed of sample 0, so its drafts are accepted, through trees too
    target = wrap_model(sliding_model(arch, window=6, vocab_size=32), name=arch)
    drafter = SuffixDecoding(max_spec_offset=4)
    prompt = (1, 7, 4, 9, 3, 5, 2)
    trees = accepted_in_trees = 0
    baselines = {}
    for sample, seed in enumerate([100, 101, 100]):
        request = GenerationRequest(prompt, 32, Sampler(temperature, seed), group="p",
                                    sample=sample)
        if seed not in baselines:
            baselines[seed] = generate(target, request)
        speculative = generate(target, request, drafter, k=8, drafter_name="suffix")
        assert speculative.tokens == baselines[seed].tokens
        in_trees = [step for step in speculative.steps if step.drafted > step.depth]
        trees += len(in_trees)
        accepted_in_trees += sum(step.accepted for step in in_trees)
    assert trees > 0 and accepted_in_trees > 0


@pytest.mark.parametrize("arch", ["gemma3", "mistral", "gpt_oss"])
@pytest.mark.parametrize("name", ["suffix", "pia", "rest", "recycling", "lookahead"])
def test_every_tree_drafter_is_lossless_on_sliding_targets(arch, name):
    # each built-in tree drafter as registered (its own defaults), three samples of one
    # problem (the later ones can draft from the earlier), contexts many windows long
    from pytest_specdec.protocol.registry import load_registry

    target = wrap_model(sliding_model(arch, window=6, vocab_size=32), name=arch)
    drafter = load_registry().get(name).create()
    prompt = (1, 7, 4, 9, 3, 5, 2)
    drafted = 0
    for sample, seed in enumerate([100, 101, 100]):
        for temperature in (0.0, 0.6):
            request = GenerationRequest(prompt, 24, Sampler(temperature, seed), group="p",
                                        sample=sample)
            baseline = generate(target, request)
            speculative = generate(target, request, drafter, k=6, drafter_name=name)
            assert speculative.tokens == baseline.tokens, (sample, temperature)
            drafted += sum(step.drafted for step in speculative.steps)
    assert drafted > 0  # the drafts were verified, not empty


# --- what is still refused -----------------------------------------------------------------

def test_layer_types_without_a_tree_mask_are_named():
    model = sliding_model("gemma3")
    model.config.layer_types = ["chunked_attention", "full_attention", SLIDING]
    reason = wrap_model(model, name="chunked").tree_support()
    assert "['chunked_attention'] layers, for which no tree mask is built" in reason


def test_a_sliding_tree_on_flash_attention_is_refused_and_names_the_target():
    model = sliding_model("gemma3")
    model.config._attn_implementation = "flash_attention_2"
    target = wrap_model(model, name="tiny-gemma3-fa2")
    assert "'flash_attention_2' takes no custom mask" in target.tree_support()
    model.config._attn_implementation = "sdpa"
    truth = run(target, max_new_tokens=8)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(DraftError, match="tree drafts need a target that can verify them") as info:
        run(target, NoisyTree(truth, 0), max_new_tokens=8)
    assert "tiny-gemma3-fa2" in str(info.value) and "noisy" not in str(info.value)
