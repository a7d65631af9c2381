"""No case can change a later one: the whole target's fingerprint (integrity.py), the
session's check after every case (SpecdecSession.check_target_intact), and the real
suite under pytester with drafters that write to the target: to a lent tensor inside
attach (the engine's read-only rule), and to parameters and buffers they were never
lent, reached through ``gc`` (the fingerprint); either way the target is reloaded. The
cases after them must give the outputs they give without them.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from pytest_specdec.bench.session import SpecdecSession
from pytest_specdec.engine import GenerationRequest, generate
from pytest_specdec.engine.integrity import (KEY_BLOCK, PASS_WORDS, TARGET_INTACT, TargetChanged,
                                             TargetFingerprint, digest)
from pytest_specdec.engine.target import wrap_model
from conftest import tiny_model

PROMPT = (1, 17, 42, 99, 250, 3, 77)


def fresh():
    return wrap_model(tiny_model("llama"), name="tiny-llama")


@pytest.fixture
def model():
    return tiny_model("llama")


def next_float(x: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(x, torch.tensor(float("inf"), dtype=x.dtype))


# --------------------------------------------------------------------------- the fingerprint


def test_an_untouched_model_is_intact(model):
    fingerprint = TargetFingerprint.take(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([PROMPT]))  # a forward writes nothing
    assert fingerprint.changes(model) == []
    assert TargetFingerprint.take(model) == fingerprint
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert set(fingerprint.tensors) == names
    assert "model.rotary_emb.inv_freq" in names  # a non-persistent buffer is compared too


def write_one_ulp(m):
    w = m.model.layers[1].mlp.up_proj.weight.data
    w[5, 7] = next_float(w[5, 7])


def swap_rows(m):
    w = m.model.layers[0].self_attn.q_proj.weight.data
    w[[2, 9]] = w[[9, 2]]


def swap_columns(m):
    w = m.model.layers[0].self_attn.k_proj.weight.data
    w[:, [0, 3]] = w[:, [3, 0]]


@pytest.mark.parametrize("write, changed", [
    (write_one_ulp, "model.layers.1.mlp.up_proj.weight"),
    (swap_rows, "model.layers.0.self_attn.q_proj.weight"),
    (swap_columns, "model.layers.0.self_attn.k_proj.weight"),
    (lambda m: m.model.rotary_emb.inv_freq.mul_(3.0), "model.rotary_emb.inv_freq"),
    (lambda m: m.lm_head.weight.data.zero_(), "lm_head.weight"),
], ids=["one-ulp", "rows-swapped", "columns-swapped", "buffer", "through-data"])
def test_a_write_anywhere_is_named(model, write, changed):
    fingerprint = TargetFingerprint.take(model)
    with torch.no_grad():
        write(model)
    assert fingerprint.changes(model) == [changed]


def test_swapped_entries_of_a_vector_are_named(model):
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.arange(64.0))
    fingerprint = TargetFingerprint.take(model)
    with torch.no_grad():
        w = model.model.norm.weight.data
        w[[3, 40]] = w[[40, 3]]
    assert fingerprint.changes(model) == ["model.norm.weight"]


def test_a_tensor_set_back_bit_for_bit_is_intact(model):
    """A tensor written and set back: its version counter moved, its bits did not."""
    fingerprint = TargetFingerprint.take(model)
    weight = model.lm_head.weight
    saved, version = weight.detach().clone(), weight._version
    with torch.no_grad():
        weight.mul_(2.0)
        weight.copy_(saved)
    assert weight._version > version
    assert fingerprint.changes(model) == []


def test_added_removed_retyped_and_training_modes_are_named(model):
    fingerprint = TargetFingerprint.take(model)
    model.model.layers[1].train()  # dropout on: named once, at the top module that changed
    model.register_buffer("extra", torch.zeros(3))
    model.model.rotary_emb._buffers.pop("inv_freq")
    model.model.norm.to(torch.float64)
    assert fingerprint.changes(model) == [
        "model.norm.weight (dtype torch.float32 -> torch.float64)",
        "extra (added)",
        "model.rotary_emb.inv_freq (removed)",
        "model.layers.1 (training mode)",
    ]
    model.train()
    assert fingerprint.changes(model)[-1:] == ["the model (training mode)"]


def test_untying_a_weight_is_a_change():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, tie_word_embeddings=True)
    tied = transformers.LlamaForCausalLM(config).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    fingerprint = TargetFingerprint.take(tied)
    assert "lm_head.weight" not in fingerprint.tensors  # a tied weight is read once
    tied.lm_head.weight = torch.nn.Parameter(tied.lm_head.weight.detach().clone())
    assert fingerprint.changes(tied) == ["lm_head.weight (added)"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(model, dtype):
    model = model.to(dtype)
    fingerprint = TargetFingerprint.take(model)
    assert fingerprint.changes(model) == []
    with torch.no_grad():
        w = model.model.layers[0].mlp.down_proj.weight.data
        w[1, 2] = next_float(w[1, 2])
    assert fingerprint.changes(model) == ["model.layers.0.mlp.down_proj.weight"]


@pytest.mark.parametrize("tensor", [
    torch.tensor(3.5), torch.zeros(0, 4), torch.tensor([True, False, True]),
    torch.arange(12, dtype=torch.int64).reshape(3, 4), torch.randn(6, 5).t(),
    torch.randn(2, 3, 4), torch.randn(4, dtype=torch.complex64),
    torch.randn(3, dtype=torch.complex128),
], ids=["scalar", "empty", "bool", "int64", "transposed", "3d", "complex", "complex128"])
def test_the_digest_reads_any_tensor(tensor):
    value = digest(tensor)
    assert value.dtype == torch.int64 and value.shape == (1,)
    assert torch.equal(digest(tensor.clone()), value)
    if tensor.numel():
        changed, first = tensor.clone(), (0,) * tensor.dim()
        changed[first] = ~changed[first] if tensor.dtype == torch.bool else changed[first] + 1
        assert not torch.equal(digest(changed), value)


# Changes a linear digest (sums of the bits by row and column, weighted or not) can miss,
# each written to the tensor's bits: `words` is an integer view of them, [rows, columns]
# (a 0-d or 1-d tensor is one row), so a write goes to the tensor itself.

def _top(words):
    return torch.iinfo(words.dtype).min  # the top bit alone: a float's sign


def flip_all_signs(words):
    words.bitwise_xor_(_top(words))


def flip_a_row(words):
    words[0].bitwise_xor_(_top(words))


def flip_a_column(words):
    words[:, 0].bitwise_xor_(_top(words))


def opposite_pair(words):
    words[0, 0] += 1000
    words[-1, -1] -= 1000


def opposite_pair_in_a_column(words):
    words[0, -1] += 1000
    words[1, -1] -= 1000


def top_bits_in_pairs(words):
    """The top bit flipped in two elements of two rows and two columns: an even number
    in every row and column (adds 2^(bits-1) to each: an even count cancels mod 2^bits)."""
    words[:2, -2:].bitwise_xor_(_top(words))


def swap_two_rows(words):
    words[[0, 1]] = words[[1, 0]]


def swap_two_columns(words):
    words[:, [0, -1]] = words[:, [-1, 0]]


def one_ulp(words):
    words[-1, 0] += 1


# change -> (rows, columns) it needs
CHANGES = {flip_all_signs: (1, 1), flip_a_row: (1, 1), flip_a_column: (1, 1),
           opposite_pair: (1, 2), opposite_pair_in_a_column: (2, 1), top_bits_in_pairs: (2, 2),
           swap_two_rows: (2, 1), swap_two_columns: (1, 2), one_ulp: (1, 1)}

# name -> a tensor of that shape (a fresh random one for each dtype)
SHAPES = {
    "0-d": lambda dtype: torch.randn((), dtype=dtype),
    "1-d": lambda dtype: torch.randn(10, dtype=dtype),
    "2-d": lambda dtype: torch.randn(6, 8, dtype=dtype),
    "3-d": lambda dtype: torch.randn(4, 6, 8, dtype=dtype),
    "transposed": lambda dtype: torch.randn(8, 6, dtype=dtype).t(),  # non-contiguous
    "strided": lambda dtype: torch.randn(6, 16, dtype=dtype)[:, ::2],  # non-contiguous
}


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """An integer view of `tensor`'s bits, [shape[0], -1] (a 0-d or 1-d one as a row)."""
    ints = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
    words = tensor.view(ints) if tensor.dim() else tensor.reshape(1).view(ints)
    return words.view(1, -1) if words.dim() == 1 else words.flatten(1)


def fits(change, shape: str) -> bool:
    rows, columns = as_rows(SHAPES[shape](torch.float32)).shape
    return CHANGES[change][0] <= rows and CHANGES[change][1] <= columns


CASES = [pytest.param(change, shape, dtype, id=f"{change.__name__}-{shape}-{str(dtype)[6:]}")
         for dtype in (torch.float32, torch.bfloat16, torch.float16)
         for shape in SHAPES for change in CHANGES if fits(change, shape)]


@pytest.mark.parametrize("change, shape, dtype", CASES)
def test_a_change_built_to_cancel_in_linear_sums_changes_the_digest(change, shape, dtype):
    torch.manual_seed(0)
    tensor = SHAPES[shape](dtype)
    words = as_rows(tensor)
    assert words.data_ptr() == tensor.data_ptr()  # a view: writes reach the tensor
    before, saved = digest(tensor), tensor.clone()
    change(words)
    assert not torch.equal(tensor.view(words.dtype), saved.view(words.dtype))
    assert not torch.equal(digest(tensor), before)
    tensor.copy_(saved)  # the same bits again: the same digest
    assert torch.equal(digest(tensor), before)


def test_the_table_meets_every_change_in_each_shape_that_has_room_for_it():
    """A 0-d tensor meets the changes of one element; a 1-d one those within a row too;
    the others every change; each in the three dtypes."""
    per_shape = {shape: sum(1 for p in CASES if p.values[1] == shape) // 3 for shape in SHAPES}
    assert per_shape == {"0-d": 4, "1-d": 6, "2-d": 9, "3-d": 9, "transposed": 9, "strided": 9}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_equal_bits_give_equal_digests(dtype):
    torch.manual_seed(1)
    base = torch.randn(8, 6, dtype=dtype)
    view = base.t()
    ints = {2: torch.int16, 4: torch.int32}[base.element_size()]
    same = [base.clone(), base.reshape(6, 8), base.view(ints), base.reshape(-1)]
    if dtype != torch.float32:  # another 2-byte float: the same bits, another meaning
        same.append(base.view(torch.float16 if dtype == torch.bfloat16 else torch.bfloat16))
    for other in same:
        assert torch.equal(digest(other), digest(base))
    assert not view.is_contiguous()
    assert torch.equal(digest(view), digest(view.contiguous()))
    assert torch.equal(digest(view.view(ints)), digest(view.contiguous()))
    assert not torch.equal(digest(view), digest(base))  # the same words, other positions


def test_large_tensors_read_in_passes_give_the_digest_of_one_pass(monkeypatch):
    """A CPU reads a pass of part of a key block at a time, an accelerator several whole
    blocks as rows (each its own multiplier): both give the same number, for a tensor
    longer than a block and for a non-contiguous one."""
    torch.manual_seed(2)
    long = torch.randn(3 * KEY_BLOCK + 7)
    wide = torch.randn(KEY_BLOCK // 512 + 3, 600).t()  # rows of 600, non-contiguous
    digests = []
    for per_pass in (1 << 18, KEY_BLOCK, 2 * KEY_BLOCK, 4 * KEY_BLOCK):
        monkeypatch.setitem(PASS_WORDS, "cpu", per_pass)
        digests.append((digest(long), digest(wide)))
    for got in digests[1:]:
        assert torch.equal(got[0], digests[0][0]) and torch.equal(got[1], digests[0][1])
    assert torch.equal(digests[0][1], digest(wide.contiguous()))


def test_swapped_key_blocks_change_the_digest():
    """Two whole key blocks swapped put each word at a position with the same key: the
    blocks' multipliers still differ."""
    torch.manual_seed(3)
    tensor = torch.randn(2, KEY_BLOCK)
    swapped = tensor.flip(0)
    assert not torch.equal(digest(swapped), digest(tensor))


def test_the_digest_does_not_depend_on_threads(model):
    """Integer sums wrap around: the same bits give the same digest in any order."""
    weight = model.model.embed_tokens.weight
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = digest(weight)
        torch.set_num_threads(2)
        two = digest(weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


# --------------------------------------------------------------------------- the session


def session(loads: list) -> SpecdecSession:
    def load():
        loads.append(fresh())
        return loads[-1]

    return SpecdecSession(config=None, registry=None, problems=[], load_target=load)


def test_an_intact_target_passes_and_nothing_is_loaded_to_check(model):
    loads: list = []
    s = session(loads)
    s.check_target_intact("pld on multi_round")  # nothing loaded yet: nothing to check
    assert loads == []
    target = s.target
    generate(target, GenerationRequest(PROMPT, 8))
    s.check_target_intact("pld on multi_round")
    assert s.target is target and len(loads) == 1


def test_a_changed_target_fails_the_case_by_name_and_is_reloaded():
    loads: list = []
    s = session(loads)
    clean = generate(s.target, GenerationRequest(PROMPT, 12)).tokens
    damaged = s.target.model
    with torch.no_grad():
        for layer in damaged.model.layers:
            layer.mlp.down_proj.weight.data.mul_(-3.0)
        damaged.model.rotary_emb.inv_freq.mul_(3.0)
    assert generate(s.target, GenerationRequest(PROMPT, 12)).tokens != clean
    with pytest.raises(TargetChanged) as caught:
        s.check_target_intact("evil on multi_round")
    error = caught.value
    assert (error.case, error.rule) == ("evil on multi_round", TARGET_INTACT)
    assert error.changes == ("model.layers.0.mlp.down_proj.weight",
                             "model.layers.1.mlp.down_proj.weight", "model.rotary_emb.inv_freq")
    total = len(TargetFingerprint.take(damaged).tensors) + len(list(damaged.modules()))
    assert str(error) == (
        "case 'evil on multi_round' broke the rule 'the target is left unchanged': it changed "
        "model.layers.0.mlp.down_proj.weight, model.layers.1.mlp.down_proj.weight, "
        f"model.rotary_emb.inv_freq (3 of the {total} parameters, buffers and module modes "
        "compared); the target was dropped, the next case runs on a fresh load")
    # the next case gets a fresh load, fingerprinted again, and the clean output
    assert s.target is not None and len(loads) == 2 and s.target.model is not damaged
    assert generate(s.target, GenerationRequest(PROMPT, 12)).tokens == clean
    s.check_target_intact("pld on multi_round")


def test_a_message_names_the_first_few_and_counts_the_rest():
    error = TargetChanged.of("x", [f"p{i}" for i in range(8)], 100)
    assert "it changed p0, p1, p2, p3, p4 and 3 more (8 of the 100 " in str(error)


class FindsTheModel:
    """A drafter that is lent nothing, finds the target model through ``gc`` in attach
    and writes to a parameter and a buffer: the engine cannot see it, the session's
    check after the case does."""

    needs = frozenset()

    def __init__(self, victim_id):
        # only the test's own target: other models alive in this process (the session
        # fixtures' default targets) must stay intact for the tests after this one
        self.victim_id = victim_id

    def attach(self, info):
        for found in gc.get_objects():
            if id(found) == self.victim_id:
                with torch.no_grad():
                    found.model.layers[0].mlp.down_proj.weight.data.mul_(-3.0)
                    found.model.rotary_emb.inv_freq.mul_(3.0)

    def begin(self, request):
        pass

    def propose(self, context, k):
        from pytest_specdec.protocol.drafter import Draft

        return Draft()

    def accept(self, tokens):
        pass

    def end(self):
        pass


def test_a_drafter_that_reaches_past_what_it_was_lent_fails_and_later_cases_are_intact():
    loads: list = []
    s = session(loads)
    clean = generate(s.target, GenerationRequest(PROMPT, 12)).tokens
    generate(s.target, GenerationRequest(PROMPT, 12), FindsTheModel(id(s.target.model)), k=3)
    with pytest.raises(TargetChanged) as caught:
        s.check_target_intact("finds on multi_round")
    assert caught.value.changes == ("model.layers.0.mlp.down_proj.weight",
                                    "model.rotary_emb.inv_freq")
    assert generate(s.target, GenerationRequest(PROMPT, 12)).tokens == clean
    s.check_target_intact("pld on multi_round")


# --------------------------------------------------------------------------- the real suite


HOSTILE_CONFTEST = '''
import gc

import torch
import transformers

from pytest_specdec.protocol.drafter import Draft, DrafterBase


class Quiet(DrafterBase):
    def propose(self, context, k):
        return Draft()


class WritesLentInAttach(Quiet):
    """Keeps the lent output head and halves it in attach, before any sequence."""

    needs = frozenset({"output_head"})

    def attach(self, info):
        self.head = info.output_head
        with torch.no_grad():
            self.head.mul_(0.5)


def _models():
    """Every causal LM alive in the process: the target, and a dropped one not yet freed."""
    return [o for o in gc.get_objects() if type(o).__name__.endswith("ForCausalLM")
            and isinstance(o, transformers.PreTrainedModel)]


def _named(tensors, suffix):
    """The first tensor whose name ends with `suffix` (whatever the model's nesting)."""
    return next(t for name, t in tensors if name.endswith(suffix))


class ReachesAWeight(Quiet):
    """Lent nothing; finds the target through gc and writes through .data (no version
    bump) to a layer's weight."""

    def attach(self, info):
        for model in _models():
            _named(model.named_parameters(), "layers.0.mlp.down_proj.weight").data.mul_(-3.0)


class ReachesABuffer(Quiet):
    """Lent nothing; finds the target through gc in attach and writes to its rotary
    buffer in the middle of a sequence."""

    def attach(self, info):
        self.models = _models()

    def accept(self, tokens):
        for model in self.models:
            _named(model.named_buffers(), "rotary_emb.inv_freq").mul_(1.5)


def pytest_specdec_register_drafters(config):
    return {"writes_lent_in_attach": WritesLentInAttach, "reaches_a_weight": ReachesAWeight,
            "reaches_a_buffer": ReachesABuffer}
'''


def run_suite(suite, tiny_model_dir, reports: Path, *drafters: str):
    args = ["-p", "no:cacheprovider", "--specdec-target", str(tiny_model_dir),
            "--specdec-problems", "1", "--specdec-max-new-tokens", "8", "--specdec-rounds", "2",
            "--specdec-paradigm", "multi_round", "--specdec-no-peer", "--benchmark-disable",
            "--specdec-report-dir", str(reports), "-rf", "--tb=short"]
    for name in drafters:
        args += ["--specdec-drafter", name]
    result = suite.runpytest_subprocess(*args, timeout=300)
    (report,) = reports.glob("specdec-*.json")
    records = json.loads(report.read_text(encoding="utf-8"))["records"]
    return result, {r["drafter"]: r for r in records}


def test_in_the_suite_no_case_changes_a_later_one(suite, tiny_model_dir, tmp_path):
    suite.makeconftest(HOSTILE_CONFTEST)
    _, clean = run_suite(suite, tiny_model_dir, tmp_path / "clean", "pld")
    hostile = ["writes_lent_in_attach", "reaches_a_weight", "reaches_a_buffer"]
    result, records = run_suite(suite, tiny_model_dir, tmp_path / "hostile",
                                "pld", *hostile, "pld:max_ngram=2")
    result.assert_outcomes(passed=3, failed=3)
    failed = sorted(line.split()[1].split("::")[1] for line in result.outlines
                    if line.startswith("FAILED "))
    assert failed == sorted(f"test_speculative[{h}-multi_round]" for h in hostile)
    result.stdout.fnmatch_lines_random([
        "*DraftError: drafter 'writes_lent_in_attach' broke the rule 'the target's tensors "
        "are read-only': attach wrote to the target's output_head",
        "*TargetChanged: case 'reaches_a_weight on multi_round' broke the rule 'the target is "
        "left unchanged': it changed model.layers.0.mlp.down_proj.weight (1 of the *",
        "*TargetChanged: case 'reaches_a_buffer on multi_round' broke the rule 'the target is "
        "left unchanged': it changed model.rotary_emb.inv_freq (1 of the *",
    ])
    # the cases before and after them: the outputs a run without them has
    assert set(records) == {"baseline", "pld", "pld:max_ngram=2"}
    for name in records:
        assert records[name]["lossless"] == "exact"
        assert records[name]["output_sha256"] == clean["baseline"]["output_sha256"], name
    assert records["pld"]["output_sha256"] == clean["pld"]["output_sha256"]
