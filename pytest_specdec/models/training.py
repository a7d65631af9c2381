"""Offline training of model drafters by self-distillation from the target.

The data are the target's own generations over a prompt set (:class:`DistillData`,
made by :func:`generate_data` and cached as JSON by :func:`prepare_data`); a batch
carries the target's hidden states at the layers a drafter reads and its final normed
state, whose product with the output head is the target's logits
(:class:`DistillBatch`). A drafter kind supplies a :class:`Trainable` (its module, its
loss on a batch, how it saves itself); :func:`train` runs the loop: seeded, AdamW with
gradient clipping, a progress bar, a wall-time budget, resumable checkpoints in
safetensors, and final weights written atomically.

The default prompt set is the embedded problems minus the first ``holdout`` (the ones a
default benchmark run uses), so the drafters never train on the benchmark's own
problems; the benchmark's own prompt format (:func:`~pytest_specdec.paradigms.first_prompt`
through :meth:`Target.encode_prompt`, and multi-round's re-ask prompts) is kept.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from pytest_specdec.problems import Problem
    from pytest_specdec.target import Target

#: drafter kinds `pytest-specdec train` knows, and the module whose ``trainable`` builds each
KINDS = {"eagle3": "pytest_specdec.models.eagle3", "sps": "pytest_specdec.models.draft_lm"}
#: the data cache's file name, beside the kinds' weight folders (so every kind shares it)
DATA_FILE = "distill-data.json"
DATA_FORMAT = 1
CHECKPOINT_FORMAT = 1
#: per-kind defaults of the loop, sized so `make bench`'s `train KIND --if-missing` ends
#: within 10 minutes on a 2-core CPU for the embedded target (data generation included)
DEFAULT_STEPS = 600
DEFAULT_BATCH_SIZE = 4
DEFAULT_LR = 1e-3
DEFAULT_MAX_MINUTES = 9.0
DEFAULT_CHECKPOINT_EVERY = 100
WARMUP_STEPS = 20
CLIP_NORM = 1.0
#: precompute the target's states for the whole data set when they take at most this
#: many bytes (float32); larger sets compute them per batch
KEEP_STATES_BYTES = 2 << 30
#: batches' worth of sequences sorted by length together (less padding per batch)
BUCKET = 8


def _bench_problems() -> int:
    """How many problems a default benchmark run uses (its --specdec-problems default)."""
    from pytest_specdec.options import OPTIONS

    return int(next(o.default for o in OPTIONS if o.dest == "specdec_problems"))


class TrainingError(ValueError):
    """Training cannot run as asked; the message names the value and what is accepted."""


# ------------------------------------------------------------------------------ data


@dataclass
class DistillBatch:
    """One training batch of the target's generations and its states on them.

    B sequences, right-padded to T tokens. Position i's states are computed from tokens
    0..i (they predict token i+1).
    """

    input_ids: torch.Tensor       # [B, T] long (right-padded with 0)
    attention_mask: torch.Tensor  # [B, T] bool: not padding
    loss_mask: torch.Tensor       # [B, T] bool: positions i whose next token (i+1) the
    #                               target generated (not the prompt, not past the end)
    hidden: torch.Tensor          # [B, T, len(layers) * h] float32: the target's states at
    #                               `layers` (output_hidden_states indices, concatenated)
    final_hidden: torch.Tensor    # [B, T, h] float32: the final normed state; the target's
    #                               logits are final_hidden @ output_head.T


@dataclass
class DistillData:
    """The target's own generations over a prompt set: each sequence is a prompt (as the
    target formats it) followed by the tokens the target generated after it."""

    sequences: list[list[int]]
    prompt_lengths: list[int]
    _states: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.sequences) != len(self.prompt_lengths):
            raise TrainingError(f"{len(self.sequences)} sequences but "
                                f"{len(self.prompt_lengths)} prompt lengths")
        if not self.sequences:
            raise TrainingError("the distillation data hold no sequences")
        for i, (seq, n) in enumerate(zip(self.sequences, self.prompt_lengths)):
            if not 0 < n < len(seq):
                raise TrainingError(f"sequence {i}: prompt length {n} is not in "
                                    f"[1, {len(seq)}) (each needs a generated token)")

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def generated_tokens(self) -> int:
        return sum(len(s) - n for s, n in zip(self.sequences, self.prompt_lengths))

    def fingerprint(self) -> str:
        """A hash of the sequences and prompt lengths (a checkpoint names its data)."""
        digest = hashlib.sha256(json.dumps([self.sequences, self.prompt_lengths]).encode())
        return digest.hexdigest()[:16]

    def order(self, batch_size: int, seed: int) -> Iterator[list[int]]:
        """The endless stream of batch index lists. Each pass shuffles the sequences
        (seeded), sorts each run of BUCKET batches' worth by length and cuts it into
        batches, so a batch holds sequences of similar lengths (the default data pad to
        a mean width of 211 tokens instead of 255 at batch size 4), then shuffles the
        batches. A batch does not span two passes."""
        if type(batch_size) is not int or batch_size < 1:
            raise TrainingError(f"batch_size {batch_size!r} must be an int >= 1")
        rng = random.Random(seed)
        while True:
            perm = list(range(len(self.sequences)))
            rng.shuffle(perm)
            batches = []
            for at in range(0, len(perm), batch_size * BUCKET):
                run = sorted(perm[at:at + batch_size * BUCKET],
                             key=lambda i: len(self.sequences[i]))
                batches += [run[i:i + batch_size] for i in range(0, len(run), batch_size)]
            rng.shuffle(batches)
            yield from batches

    def batches(self, target: Target, layers: Sequence[int], *, batch_size: int, seed: int,
                start: int = 0, keep_bytes: int = KEEP_STATES_BYTES) -> Iterator[DistillBatch]:
        """Endless batches of `batch_size` sequences (fewer at the end of a pass), in an
        order shuffled by `seed`, skipping the first `start` batches (a resumed run sees
        the batches the uninterrupted one would).

        The target's states are computed once for the whole set, in fixed chunks, when
        they fit in `keep_bytes` (float32; the embedded target's default data take about
        0.3 GB), else per batch under no_grad. Either way a batch is the same on every
        run with the same seed."""
        layers = tuple(int(x) for x in layers)
        stream = self.order(batch_size, seed)
        for _ in range(start):
            next(stream)
        width = (len(layers) + 1) * _hidden_size(target)
        if self.tokens * width * 4 <= keep_bytes:
            self._precompute(target, layers, chunk=max(batch_size, 8))
        for indices in stream:
            yield self.batch(target, layers, indices)

    def _precompute(self, target: Target, layers: tuple[int, ...], *, chunk: int) -> None:
        key = (id(target), layers)
        if key in self._states:
            return
        by_length = sorted(range(len(self.sequences)), key=lambda i: len(self.sequences[i]))
        states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for at in range(0, len(by_length), chunk):
            indices = by_length[at:at + chunk]
            ids, attend = self._padded(indices)
            hidden, final = target_states(target, ids, attend, layers)
            for row, i in enumerate(indices):
                n = len(self.sequences[i])
                states[i] = (hidden[row, :n].clone(), final[row, :n].clone())
        self._states.clear()  # one layer set at a time
        self._states[key] = states

    def _padded(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [self.sequences[i] for i in indices]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attend = torch.zeros(len(seqs), width, dtype=torch.bool)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            attend[row, :len(seq)] = True
        return ids, attend

    def batch(self, target: Target, layers: Sequence[int], indices: Sequence[int]) -> DistillBatch:
        """The batch of the sequences at `indices` (see :class:`DistillBatch`)."""
        layers = tuple(int(x) for x in layers)
        ids, attend = self._padded(indices)
        loss_mask = torch.zeros_like(attend)
        for row, i in enumerate(indices):
            # position j predicts token j+1: the generated tokens are prompt_len..len-1
            loss_mask[row, self.prompt_lengths[i] - 1:len(self.sequences[i]) - 1] = True
        kept = self._states.get((id(target), layers))
        if kept is None:
            hidden, final = target_states(target, ids, attend, layers)
        else:
            width = ids.shape[1]
            hidden = torch.zeros(len(indices), width, kept[indices[0]][0].shape[-1])
            final = torch.zeros(len(indices), width, kept[indices[0]][1].shape[-1])
            for row, i in enumerate(indices):
                h, f = kept[i]
                hidden[row, :len(h)] = h
                final[row, :len(f)] = f
        return DistillBatch(input_ids=ids, attention_mask=attend, loss_mask=loss_mask,
                            hidden=hidden, final_hidden=final)


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _hidden_size(target: Target) -> int:
    return int(_text_config(target.model).hidden_size)


def target_states(target: Target, ids: torch.Tensor, attend: torch.Tensor,
                  layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's hidden states at `layers` (concatenated) and its final normed state,
    both float32 on the CPU, for right-padded `ids` (states at padding are meaningless)."""
    num_layers = int(_text_config(target.model).num_hidden_layers)
    for layer in layers:
        if not -num_layers - 1 <= int(layer) <= num_layers:
            raise TrainingError(f"layer {layer} is not in [{-num_layers - 1}, {num_layers}] "
                                f"(output_hidden_states indices of a {num_layers}-layer target)")
    with torch.no_grad():
        out = target.model(input_ids=ids.to(target.device),
                           attention_mask=attend.to(target.device).long(),
                           output_hidden_states=True, use_cache=False)
    states = out.hidden_states
    final = states[-1]
    hidden = torch.cat([states[int(layer)] for layer in layers], dim=-1) if layers \
        else final[..., :0]
    return hidden.float().cpu(), final.float().cpu()


# ------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class DataSettings:
    """How the distillation data are made; the cache is reused only when these match.

    Every prompt is generated greedily (T=0, the multi_round paradigm's temperature)
    for ``rounds`` rounds, each later round's prompt built exactly as multi_round builds
    it from the previous round's answer, and ``samples`` more times at ``temperature``
    (0.6, best_of_n's): the drafters see the target's own trajectories at both
    temperatures the default benchmark runs."""

    prompts: str = "embedded"        # "embedded", a .jsonl/.json file, or a HF dataset
    holdout: int = -1                # embedded problems skipped from the start; -1: the
    #                                  benchmark's default --specdec-problems
    limit: int = 0                   # at most this many prompts (0: all)
    max_new_tokens: int = 96
    rounds: int = 2                  # greedy rounds per problem (1 for plain prompts)
    samples: int = 1                 # sampled generations per prompt
    temperature: float = 0.6
    seed: int = 0
    split: str = "train"             # a Hugging Face dataset's split

    def check(self) -> None:
        for name in ("limit", "max_new_tokens", "rounds", "samples", "seed"):
            value = getattr(self, name)
            low = 1 if name in ("max_new_tokens", "rounds") else 0
            if type(value) is not int or value < low:
                raise TrainingError(f"{name} {value!r} must be an int >= {low}")
        if type(self.holdout) is not int or self.holdout < -1:
            raise TrainingError(f"holdout {self.holdout!r} must be an int >= 0 "
                                f"(or -1: the benchmark's default problem count)")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0
                and math.isfinite(self.temperature)):
            raise TrainingError(f"temperature {self.temperature!r} must be a number > 0 "
                                f"(the sampled generations' temperature)")


def training_prompts(settings: DataSettings) -> list[Problem | str]:
    """The prompt set: Problems (formatted as the benchmark formats them, multi-round
    capable) or plain user messages.

    - "embedded": the embedded problems after the first ``holdout`` (default: as many
      as a default benchmark run uses, so training never sees the benchmark's problems);
    - a .jsonl/.json file: rows that are strings or objects with a prompt, question,
      problem or text field (used as the user message as is);
    - otherwise a Hugging Face dataset ("owner/name[:config]", split ``settings.split``),
      read as problems (question and answer fields)."""
    from pytest_specdec.problems import ProblemSetError, embedded_problems, load_problems

    settings.check()
    source = settings.prompts
    items: list[Problem | str]
    if source == "embedded":
        holdout = _bench_problems() if settings.holdout < 0 else settings.holdout
        problems = embedded_problems()
        if holdout >= len(problems):
            raise TrainingError(f"holdout {holdout} leaves none of the {len(problems)} "
                                f"embedded problems to train on")
        items = list(problems[holdout:])
    elif Path(source).suffix.lower() in (".jsonl", ".json") or Path(source).exists():
        items = _read_prompt_file(Path(source))
    else:
        try:
            items = list(load_problems(source, split=settings.split))
        except ProblemSetError as exc:
            raise TrainingError(f"prompts {source!r}: {exc}") from exc
    return items[:settings.limit] if settings.limit else items


PROMPT_FIELDS = ("prompt", "question", "problem", "text", "Question", "Problem")


def _read_prompt_file(path: Path) -> list[str]:
    if not path.is_file():
        raise TrainingError(f"prompt file {str(path)!r} not found (expected a .jsonl or "
                            f".json file of strings or objects with a "
                            f"{'/'.join(PROMPT_FIELDS)} field)")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
            if isinstance(rows, dict):
                rows = next((rows[k] for k in ("data", "rows", "prompts", "problems")
                             if isinstance(rows.get(k), list)), None)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TrainingError(f"prompt file {str(path)!r} is not readable JSON: {exc}") from exc
    if not isinstance(rows, list):
        raise TrainingError(f"prompt file {str(path)!r} holds no list of prompts")
    prompts = []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            row = next((row[k] for k in PROMPT_FIELDS if isinstance(row.get(k), str)), None)
        if not isinstance(row, str) or not row.strip():
            raise TrainingError(f"prompt file {str(path)!r}, row {i}: expected a string or "
                                f"an object with a {'/'.join(PROMPT_FIELDS)} text field")
        prompts.append(row)
    if not prompts:
        raise TrainingError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


class _Stop(Exception):
    pass


def round_prompt(problem: Problem, previous: Sequence[Any]) -> str:
    """The multi_round paradigm's prompt for round len(previous), given the earlier
    rounds' completions: built by the paradigm itself, so training sees its format."""
    from pytest_specdec.paradigms import MultiRound

    asked: list[str] = []

    def generate(prompt: str, *, group: str, sample: int, round: int) -> Any:
        if round < len(previous):
            return previous[round]
        asked.append(prompt)
        raise _Stop

    try:
        MultiRound(rounds=len(previous) + 1).run(problem, generate)
    except _Stop:
        return asked[0]
    raise AssertionError("multi_round asked for no further round")  # pragma: no cover


# ------------------------------------------------------------------------------ generation


def generate_batched(target: Target, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     temperature: float, seed: int, batch_size: int = 16,
                     progress: bool = False, desc: str = "generating") -> list[list[int]]:
    """The target's continuations of `prompts` (each up to and including its first EOS),
    generated with transformers' generate in left-padded batches of similar lengths;
    greedy at temperature 0, else plain temperature sampling (no top-k/top-p, as the
    benchmark samples), seeded per batch."""
    from tqdm.auto import tqdm

    tok = target.tokenizer
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    pad = pad if pad is not None else (min(target.eos_ids) if target.eos_ids else 0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) \
        if temperature > 0 else dict(do_sample=False)
    for number, chunk in enumerate(tqdm(chunks, desc=desc, disable=not progress, unit="batch")):
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attend = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]):] = torch.tensor(list(prompts[i]), dtype=torch.long)
            attend[row, width - len(prompts[i]):] = 1
        torch.manual_seed(seed * 100_003 + number)
        with torch.inference_mode():
            generated = target.model.generate(
                input_ids=ids.to(target.device), attention_mask=attend.to(target.device),
                max_new_tokens=max_new_tokens, pad_token_id=pad,
                eos_token_id=sorted(target.eos_ids) or None, **sampling)
        for row, i in enumerate(chunk):
            tokens = generated[row, width:].tolist()
            ends = [j for j, t in enumerate(tokens) if t in target.eos_ids]
            out[i] = tokens[:ends[0] + 1] if ends else tokens
    return out


def generate_data(target: Target, settings: DataSettings = DataSettings(), *,
                  batch_size: int = 48, progress: bool = False) -> DistillData:
    """Self-distillation data: the target's own generations over the prompt set (see
    :class:`DataSettings` for which generations)."""
    from pytest_specdec.paradigms import Completion, first_prompt
    from pytest_specdec.problems import Problem

    items = training_prompts(settings)
    sequences: list[list[int]] = []
    lengths: list[int] = []

    def add(prompt_ids: list[int], generated: list[int]) -> None:
        if generated:
            sequences.append(list(prompt_ids) + list(generated))
            lengths.append(len(prompt_ids))

    def encode(text: str) -> list[int]:
        return list(target.encode_prompt(text))

    texts = [first_prompt(x) if isinstance(x, Problem) else x for x in items]
    first = [encode(t) for t in texts]
    common = dict(max_new_tokens=settings.max_new_tokens, batch_size=batch_size,
                  progress=progress)
    history: list[list[Any]] = [[] for _ in items]
    owners = list(range(len(items)))  # the item each prompt of this round belongs to
    prompts = first
    for r in range(settings.rounds):
        outs = generate_batched(target, prompts, temperature=0.0, seed=settings.seed,
                                desc=f"greedy round {r}", **common)
        for owner, p, g in zip(owners, prompts, outs):
            add(p, g)
            history[owner].append(Completion(text=target.decode(g), token_ids=tuple(g)))
        # later rounds re-ask the problems (a plain prompt has no question to re-ask)
        owners = [o for o in owners if isinstance(items[o], Problem)]
        if r + 1 == settings.rounds or not owners:
            break
        prompts = [encode(round_prompt(items[o], history[o])) for o in owners]
    for s in range(settings.samples):
        outs = generate_batched(target, first, temperature=settings.temperature,
                                seed=settings.seed + 1 + s, desc=f"sampled T={settings.temperature}"
                                f" #{s}", **common)
        for p, g in zip(first, outs):
            add(p, g)
    return DistillData(sequences, lengths)


def prepare_data(target: Target, path: Path, settings: DataSettings = DataSettings(), *,
                 batch_size: int = 48, progress: bool = False,
                 log: Callable[[str], None] = lambda m: None) -> DistillData:
    """The distillation data from the cache at `path` when it was made for this target
    with these settings, else generated and written there (atomically)."""
    settings.check()
    path = Path(path)
    wanted = {"format": DATA_FORMAT, "target": target_signature(target),
              "settings": asdict(settings)}
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if all(cached.get(k) == v for k, v in wanted.items()):
                log(f"reusing the distillation data in {path} "
                    f"({len(cached['sequences'])} sequences)")
                return DistillData(cached["sequences"], cached["prompt_lengths"])
            log(f"the distillation data in {path} were made differently; regenerating")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log(f"the distillation data in {path} are unreadable ({exc}); regenerating")
    started = time.perf_counter()
    data = generate_data(target, settings, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - started
    log(f"generated {len(data.sequences)} sequences ({data.generated_tokens} generated "
        f"tokens) in {seconds:.0f} s")
    record = dict(wanted, seconds=round(seconds, 1), sequences=data.sequences,
                  prompt_lengths=data.prompt_lengths)
    _write_atomic(path, json.dumps(record).encode())
    return data


def _write_atomic(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ trainables


@runtime_checkable
class Trainable(Protocol):
    """What a drafter kind hands the training loop."""

    kind: str                       # "eagle3" | "sps"
    hidden_layers: tuple[int, ...]  # which target states batch.hidden holds
    module: torch.nn.Module         # the parameters optimised

    def loss(self, batch: DistillBatch) -> torch.Tensor:
        """A scalar, differentiable loss on one batch."""
        ...

    def save(self, folder: Path) -> None:
        """Write model.safetensors and config.json (naming the target it fits) to folder."""
        ...


TrainableFactory = Callable[..., Trainable]


def trainable_factory(kind: str | TrainableFactory) -> tuple[str, TrainableFactory]:
    """The kind's name and its ``trainable(target, data, **options)`` factory."""
    if callable(kind):
        return getattr(kind, "kind", getattr(kind, "__name__", "custom")), kind
    if kind not in KINDS:
        raise TrainingError(f"drafter kind {kind!r} is not one of {', '.join(KINDS)}")
    try:
        module = importlib.import_module(KINDS[kind])
    except ImportError as exc:
        raise TrainingError(f"drafter kind {kind!r}: cannot import {KINDS[kind]} "
                            f"({exc})") from exc
    factory = getattr(module, "trainable", None)
    if factory is None:
        raise TrainingError(f"drafter kind {kind!r}: {KINDS[kind]} has no trainable()")
    return kind, factory


# ------------------------------------------------------------------------------ the loop


@dataclass
class TrainResult:
    """What a run did: the steps done (of those asked), why it stopped, the last loss
    (mean of the last 10 steps), the wall time of the steps (`seconds`), of preparing
    the data (`data_seconds`: generating them or reading the cache) and of the
    target's states (`states_seconds`: computed before the first step)."""

    kind: str
    output: Path
    steps_done: int
    steps: int
    stopped: str           # "steps" | "time" | "skipped"
    loss: float | None
    first_loss: float | None
    seconds: float
    seconds_per_step: float | None
    data_seconds: float = 0.0
    states_seconds: float = 0.0


def checkpoint_folder(output: Path) -> Path:
    """Where a run on `output` keeps its resumable checkpoint: ``OUTPUT.checkpoint``."""
    output = Path(output)
    return output.with_name(output.name + ".checkpoint")


def _trained_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, *, step: int, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Model (trained parameters) and optimizer state in safetensors, the step, the RNG
    states and `meta` in state.json; written to a temp folder, then swapped in."""
    from safetensors.torch import save_file

    folder = Path(folder)
    params = _trained_parameters(module)
    tensors = {name: p.detach().cpu().contiguous().clone() for name, p in params.items()}
    state = optimizer.state_dict()
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_plain: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                opt_tensors[f"{index}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                opt_plain.setdefault(str(index), {})[key] = value
    opt_tensors["torch_rng"] = torch.get_rng_state()
    py_state = random.getstate()
    record = dict(meta, format=CHECKPOINT_FORMAT, step=step,
                  param_groups=state["param_groups"], optimizer_plain=opt_plain,
                  python_rng=[py_state[0], list(py_state[1]), py_state[2]],
                  parameters=list(params))
    staging = _staging(folder)
    try:
        save_file(tensors, str(staging / "model.safetensors"))
        save_file(opt_tensors, str(staging / "optimizer.safetensors"))
        (staging / "state.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_checkpoint(folder: Path, *, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote (module, optimizer, RNG states);
    returns its state.json."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        record = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "model.safetensors"))
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError) as exc:
        raise TrainingError(f"checkpoint {folder} is unreadable: {exc}") from exc
    params = _trained_parameters(module)
    if set(record.get("parameters", ())) != set(params) or set(tensors) != set(params):
        raise TrainingError(f"checkpoint {folder} holds parameters that do not match the "
                            f"model being trained (another kind or configuration?)")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise TrainingError(f"checkpoint {folder}: parameter {name} has shape "
                                    f"{tuple(tensors[name].shape)}, the model {tuple(p.shape)}")
            p.copy_(tensors[name])
    torch.set_rng_state(opt_tensors.pop("torch_rng"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in opt_tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in record.get("optimizer_plain", {}).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})
    version, internal, gauss = record["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return record


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _staging(folder: Path) -> Path:
    """A temp folder beside `folder` (mkdtemp's 0700 widened to what the umask allows)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=_ensure(folder.parent)))
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _swap_in(staging: Path, folder: Path) -> None:
    """Replace `folder` by `staging`: a reader sees the old folder, none, or the new one,
    never a half-written one."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(folder, old)
    os.replace(staging, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_weights(trainable: Trainable, output: Path, record: dict[str, Any]) -> None:
    """The trainable's final weights (``trainable.save``) plus training.json (`record`),
    written to a temp folder beside `output`, then swapped in."""
    output = Path(output)
    staging = _staging(output)
    try:
        was_training = trainable.module.training
        trainable.module.eval()
        try:
            trainable.save(staging)
        finally:
            trainable.module.train(was_training)
        missing = [n for n in ("config.json", "model.safetensors") if not (staging / n).is_file()]
        if missing:
            raise TrainingError(f"{trainable.kind}'s save() wrote no {' or '.join(missing)}")
        (staging / "training.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        _swap_in(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train(kind: str | TrainableFactory, target: Target, *, output: Path,
          steps: int = DEFAULT_STEPS, seed: int = 0, lr: float = DEFAULT_LR,
          batch_size: int = DEFAULT_BATCH_SIZE, max_minutes: float | None = DEFAULT_MAX_MINUTES,
          resume: bool = False, progress: bool = True, data: DistillData | None = None,
          data_settings: DataSettings | None = None, data_path: Path | None = None,
          checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
          options: dict[str, Any] | None = None,
          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> TrainResult:
    """Train `kind`'s drafter on the target's own generations and write its weights to
    `output` (atomically; plus training.json recording the run).

    `kind` is "eagle3" or "sps" (their modules' ``trainable``) or any
    ``trainable(target, data, **options)`` factory. `data` defaults to
    :func:`prepare_data` at `data_path` (default: ``OUTPUT/../distill-data.json``, which
    the kinds' default folders share). Seeded (python and torch RNGs, the batch order);
    AdamW with a linear warm-up of the learning rate over the first steps and gradient
    clipping at norm 1; a checkpoint every `checkpoint_every` steps in
    ``OUTPUT.checkpoint`` (safetensors + state.json), from which `resume` continues with
    the same batches and RNG states, so a resumed run ends with the weights of an
    uninterrupted one. `max_minutes` bounds the call's wall time from its start, data
    generation and the target's states included (None or 0: no bound): when it runs
    out the run stops cleanly after the current step (it does at least one), saves
    the weights and keeps the checkpoint for `resume`; a run that finishes its steps
    removes the checkpoint.
    """
    from tqdm.auto import tqdm

    clock = time.monotonic()  # the budget covers the data and the states too
    output = Path(output)
    _check_loop_values(steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                       max_minutes=max_minutes, checkpoint_every=checkpoint_every)
    name, factory = trainable_factory(kind)
    data_started = time.perf_counter()
    if data is None:
        data = prepare_data(target, Path(data_path) if data_path else output.parent / DATA_FILE,
                            data_settings or DataSettings(seed=seed), progress=progress, log=log)
    data_seconds = time.perf_counter() - data_started
    random.seed(seed)
    torch.manual_seed(seed)
    trainable = factory(target, data, **(options or {}))
    name = str(getattr(trainable, "kind", name))
    module = trainable.module
    params = list(_trained_parameters(module).values())
    if not params:
        raise TrainingError(f"{name}'s trainable has no parameters that require grad")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    meta = {"kind": name, "seed": seed, "batch_size": batch_size,
            "data": data.fingerprint(), "target": target_signature(target)}
    checkpoint = checkpoint_folder(output)
    start = 0
    if resume and (checkpoint / "state.json").is_file():
        record = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
        differs = [k for k, v in meta.items() if record.get(k) != v]
        if differs:
            raise TrainingError(
                f"checkpoint {checkpoint} was made with other "
                + ", ".join(f"{k} ({record.get(k)!r}, not {meta[k]!r})" for k in differs)
                + "; run without --resume to start over")
        start = int(load_checkpoint(checkpoint, module=module, optimizer=optimizer)["step"])
        log(f"resuming {name} from step {start} ({checkpoint})")
    elif resume:
        log(f"no checkpoint in {checkpoint}: starting {name} from step 0")
    if start > steps:
        raise TrainingError(f"the checkpoint is at step {start}, past --steps {steps}")
    module.train()
    batches = data.batches(target, trainable.hidden_layers, batch_size=batch_size, seed=seed,
                           start=start)
    deadline = clock + max_minutes * 60 if max_minutes else math.inf
    started = time.perf_counter()
    states_seconds = 0.0  # the first batch computes the whole set's states (if they fit)
    losses: list[float] = []
    first_loss = None
    step = start
    stopped = "steps"
    bar = tqdm(total=steps, initial=start, desc=f"train {name}", disable=not progress,
               unit="step", dynamic_ncols=True)
    try:
        while step < steps:
            if time.monotonic() >= deadline and step > start:  # at least one step
                stopped = "time"
                break
            fetched = time.perf_counter()
            batch = next(batches)
            if step == start:
                states_seconds = time.perf_counter() - fetched
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / WARMUP_STEPS)
            loss = trainable.loss(batch)
            if not torch.isfinite(loss):
                raise TrainingError(f"{name}: the loss is {loss.item()} at step {step}; "
                                    f"try a lower --lr than {lr}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            optimizer.step()
            step += 1
            value = float(loss.detach())
            first_loss = value if first_loss is None else first_loss
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
            if step % checkpoint_every == 0 and step < steps:
                save_checkpoint(checkpoint, step=step, module=module, optimizer=optimizer,
                                meta=meta)
    finally:
        bar.close()
    seconds = time.perf_counter() - started - states_seconds
    done = step - start
    result = TrainResult(kind=name, output=output, steps_done=step, steps=steps, stopped=stopped,
                         loss=sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                         first_loss=first_loss, seconds=round(seconds, 2),
                         seconds_per_step=round(seconds / done, 4) if done else None,
                         data_seconds=round(data_seconds, 2),
                         states_seconds=round(states_seconds, 2))
    record = dict(meta, steps_done=step, steps=steps, stopped=stopped, lr=lr,
                  loss=result.loss, first_loss=first_loss, seconds=result.seconds,
                  seconds_per_step=result.seconds_per_step, data_seconds=result.data_seconds,
                  states_seconds=result.states_seconds, resumed_from=start,
                  sequences=len(data.sequences), generated_tokens=data.generated_tokens)
    save_weights(trainable, output, record)
    if step < steps:
        save_checkpoint(checkpoint, step=step, module=module, optimizer=optimizer, meta=meta)
        log(f"stopped at step {step} of {steps} (the {max_minutes}-minute budget); "
            f"--resume continues from {checkpoint}")
    else:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return result


def _check_loop_values(*, steps: Any, seed: Any, lr: Any, batch_size: Any, max_minutes: Any,
                       checkpoint_every: Any) -> None:
    for name, value, low in (("steps", steps, 1), ("seed", seed, 0),
                             ("batch_size", batch_size, 1), ("checkpoint_every", checkpoint_every, 1)):
        if type(value) is not int or value < low:
            raise TrainingError(f"{name} {value!r} must be an int >= {low}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise TrainingError(f"lr {lr!r} must be a number > 0 (e.g. {DEFAULT_LR})")
    if max_minutes is not None and not (isinstance(max_minutes, (int, float))
                                        and math.isfinite(max_minutes) and max_minutes >= 0):
        raise TrainingError(f"max_minutes {max_minutes!r} must be a number >= 0 (0: no limit)")


# ------------------------------------------------------------------------------ weights


def default_weights(kind: str, info: Any) -> Path:
    """Where `pytest-specdec train KIND` writes the default weights for a target:
    beside the converted embedded model, ``cache_dir()/smollm2-135m-instruct-fp32/
    drafters/KIND`` for the embedded target; for any other target, a folder named after
    it under ``cache_dir()/drafters``. `info` is a TargetInfo or a Target (its ``name``)."""
    from pytest_specdec.target import EMBEDDED_NAME, cache_dir

    if kind not in KINDS:
        raise TrainingError(f"drafter kind {kind!r} is not one of {', '.join(KINDS)}")
    name = str(getattr(info, "name", info))
    if name == EMBEDDED_NAME:
        return cache_dir() / "smollm2-135m-instruct-fp32" / "drafters" / kind
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "target"
    return cache_dir() / "drafters" / safe / kind


def target_signature(target: Any) -> dict[str, Any]:
    """What names the target a drafter's weights fit: its name, hidden_size, vocab_size
    and num_layers, from a TargetInfo or a Target. Trainables write it into config.json
    under the key ``"target"``; :func:`weights_fit` compares it."""
    if hasattr(target, "hidden_size"):  # TargetInfo
        return {"name": str(target.name), "hidden_size": int(target.hidden_size),
                "vocab_size": int(target.vocab_size), "num_layers": int(target.num_layers)}
    text = _text_config(target.model)
    return {"name": str(target.name), "hidden_size": int(text.hidden_size),
            "vocab_size": int(target.vocab_size), "num_layers": int(text.num_hidden_layers)}


def weights_fit(folder: Path, target: Any) -> str:
    """"" when `folder` holds weights (config.json + model.safetensors) whose config's
    ``"target"`` matches :func:`target_signature` of `target`; else why not."""
    folder = Path(folder)
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        return f"{folder} has no config.json and model.safetensors"
    try:
        written = json.loads(config_path.read_text(encoding="utf-8")).get("target")
    except (OSError, ValueError, AttributeError) as exc:
        return f"{config_path} is not a JSON object: {exc}"
    wanted = target_signature(target)
    if written != wanted:
        return f"{config_path} names target {written!r}, not {wanted!r}"
    return ""


def training_summary(folder: str | Path) -> str:
    """One line on how the weights in `folder` were trained (from its ``training.json``):
    for the report's row of a drafter whose weights were made here."""
    try:
        info = json.loads((Path(folder) / "training.json").read_text(encoding="utf-8"))
        text = (f"self-distilled on the target's own generations, {info['steps_done']}/"
                f"{info['steps']} steps")
    except (OSError, ValueError, KeyError, TypeError):
        return "self-distilled on the target's own generations (no training.json)"
    if info.get("stopped") == "time":
        text += " (stopped by the time budget)"
    if isinstance(info.get("loss"), (int, float)):
        text += f", final loss {info['loss']:.3g}"
    return text
