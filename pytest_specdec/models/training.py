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

import contextlib
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
DATA_FORMAT = 2  # 2: sampled generations by coupled sampling (generate_rows)
CHECKPOINT_FORMAT = 1
#: per-kind defaults of the loop, sized so `make bench`'s `train KIND --if-missing` ends
#: within 10 minutes on a 2-core CPU for the embedded target (data generation included)
DEFAULT_STEPS = 600
DEFAULT_BATCH_SIZE = 4
DEFAULT_LR = 1e-3
#: the default kinds' own loop defaults (see README "Training model drafters")
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "eagle3": {"steps": 240, "lr": 1e-3, "batch_size": 4},
    "sps": {"steps": 200, "lr": 1e-3, "batch_size": 4},
}
#: no wall-clock limit by default: a run does its steps (see train())
DEFAULT_MAX_MINUTES: float | None = None
#: torch threads of a training run, whatever the machine has (see torch_threads())
DEFAULT_THREADS = 2
DEFAULT_CHECKPOINT_EVERY = 50
WARMUP_STEPS = 20
FINAL_LR_RATIO = 0.1
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
    target_choice: torch.Tensor | None = None  # [B, T] long: the target's argmax id at
    #                               each position where it is known (at least every
    #                               loss_mask position), else -1; None: not known


@dataclass
class StoredStates:
    """The target's states over a whole data set, kept in memory (and cached on disk
    beside the data): the concatenation of every sequence's positions, in order;
    sequence i is rows offsets[i]..offsets[i + 1]."""

    layers: tuple[int, ...]   # output_hidden_states indices of `hidden`'s blocks (>= 0)
    hidden: torch.Tensor      # [N, len(layers) * h] float32
    final: torch.Tensor       # [N, h] float32
    choice: torch.Tensor      # [N] long, -1 where not known
    offsets: list[int]

    def covers(self, layers: Sequence[int]) -> bool:
        return all(layer in self.layers for layer in layers)

    def columns(self, layers: Sequence[int]) -> torch.Tensor | None:
        """The `hidden` columns of `layers` in that order (None: all, as stored)."""
        if tuple(layers) == self.layers:
            return None
        h = self.final.shape[-1]
        return torch.cat([torch.arange(self.layers.index(x) * h, (self.layers.index(x) + 1) * h)
                          for x in layers]) if layers else torch.zeros(0, dtype=torch.long)


@dataclass
class DistillData:
    """The target's own generations over a prompt set: each sequence is a prompt (as the
    target formats it) followed by the tokens the target generated after it."""

    sequences: list[list[int]]
    prompt_lengths: list[int]
    _states: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    stored: StoredStates | None = field(default=None, init=False, repr=False, compare=False)

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

    def attach_states(self, layers: Sequence[int], hidden: Sequence[torch.Tensor],
                      final: Sequence[torch.Tensor], choice: Sequence[torch.Tensor]) -> None:
        """Keep the target's states of every sequence (each [len, ...], as
        :func:`generate_rows` captures them): :meth:`batches` then computes none."""
        lengths = [len(s) for s in self.sequences]
        for name, parts in (("hidden", hidden), ("final", final), ("choice", choice)):
            if [int(p.shape[0]) for p in parts] != lengths:
                raise TrainingError(f"the {name} states do not cover the sequences' positions")
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        self.stored = StoredStates(tuple(int(x) for x in layers), torch.cat(list(hidden)).float(),
                                   torch.cat(list(final)).float(),
                                   torch.cat(list(choice)).long(), offsets)
        self._states.clear()

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

        The target's states come from :attr:`stored` when it holds these layers (the
        states captured while generating the data); else they are computed once for
        the whole set, in fixed chunks, when they fit in `keep_bytes` (float32; the
        embedded target's default data take about 0.3 GB), else per batch under
        no_grad. Either way a batch is the same on every run with the same seed."""
        layers = _layer_indices(target, layers)
        stream = self.order(batch_size, seed)
        for _ in range(start):
            next(stream)
        width = (len(layers) + 1) * _hidden_size(target)
        if not (self.stored is not None and self.stored.covers(layers)) \
                and self.tokens * width * 4 <= keep_bytes:
            self._precompute(target, layers, chunk=max(batch_size, 8))
        for indices in stream:
            yield self.batch(target, layers, indices)

    def _precompute(self, target: Target, layers: tuple[int, ...], *, chunk: int) -> None:
        key = (id(target), layers)
        if key in self._states:
            return
        by_length = sorted(range(len(self.sequences)), key=lambda i: len(self.sequences[i]))
        head = target.model.get_output_embeddings()
        states: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for at in range(0, len(by_length), chunk):
            indices = by_length[at:at + chunk]
            ids, attend = self._padded(indices)
            hidden, final = target_states(target, ids, attend, layers)
            for row, i in enumerate(indices):
                n, p = len(self.sequences[i]), self.prompt_lengths[i]
                choice = torch.full((n,), -1, dtype=torch.long)
                with torch.no_grad():  # the target's argmax where it generated
                    rows = final[row, p - 1:n].to(device=head.weight.device, dtype=head.weight.dtype)
                    choice[p - 1:] = head(rows).argmax(-1).cpu()
                states[i] = (hidden[row, :n].clone(), final[row, :n].clone(), choice)
        self._states.clear()  # one layer set at a time
        self._states[key] = states

    def _kept(self, target: Target, layers: tuple[int, ...], indices: Sequence[int]
              ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None:
        stored = self.stored
        if stored is not None and stored.covers(layers):
            columns = stored.columns(layers)
            out = []
            for i in indices:
                a, b = stored.offsets[i], stored.offsets[i + 1]
                hidden = stored.hidden[a:b]
                out.append((hidden if columns is None else hidden[:, columns],
                            stored.final[a:b], stored.choice[a:b]))
            return out
        kept = self._states.get((id(target), layers))
        return None if kept is None else [kept[i] for i in indices]

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
        layers = _layer_indices(target, layers)
        ids, attend = self._padded(indices)
        loss_mask = torch.zeros_like(attend)
        for row, i in enumerate(indices):
            # position j predicts token j+1: the generated tokens are prompt_len..len-1
            loss_mask[row, self.prompt_lengths[i] - 1:len(self.sequences[i]) - 1] = True
        kept = self._kept(target, layers, indices)
        choice = None
        if kept is None:
            hidden, final = target_states(target, ids, attend, layers)
        else:
            width = ids.shape[1]
            hidden = torch.zeros(len(indices), width, kept[0][0].shape[-1])
            final = torch.zeros(len(indices), width, kept[0][1].shape[-1])
            choice = torch.full((len(indices), width), -1, dtype=torch.long)
            for row, (h, f, c) in enumerate(kept):
                hidden[row, :len(h)] = h
                final[row, :len(f)] = f
                choice[row, :len(c)] = c
        return DistillBatch(input_ids=ids, attention_mask=attend, loss_mask=loss_mask,
                            hidden=hidden, final_hidden=final, target_choice=choice)


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _hidden_size(target: Target) -> int:
    return int(_text_config(target.model).hidden_size)


def _layer_indices(target: Target, layers: Sequence[int]) -> tuple[int, ...]:
    """`layers` (output_hidden_states indices, negative ones from the end) as indices
    >= 0; an index outside the target is a clear error."""
    num_layers = int(_text_config(target.model).num_hidden_layers)
    out = []
    for layer in layers:
        layer = int(layer)
        if not -num_layers - 1 <= layer <= num_layers:
            raise TrainingError(f"layer {layer} is not in [{-num_layers - 1}, {num_layers}] "
                                f"(output_hidden_states indices of a {num_layers}-layer target)")
        out.append(layer if layer >= 0 else num_layers + 1 + layer)
    return tuple(out)


def state_layers(target: Target) -> tuple[int, ...]:
    """The layers whose states the data generation captures (beside the final state):
    EAGLE-3's (2, L // 2, L - 3), so neither default kind needs a second pass."""
    from pytest_specdec.models.eagle3 import eagle_layers

    return eagle_layers(int(_text_config(target.model).num_hidden_layers))


def target_states(target: Target, ids: torch.Tensor, attend: torch.Tensor,
                  layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's hidden states at `layers` (concatenated) and its final normed state,
    both float32 on the CPU, for right-padded `ids` (states at padding are meaningless)."""
    layers = _layer_indices(target, layers)
    with torch.no_grad():
        out = target.model(input_ids=ids.to(target.device),
                           attention_mask=attend.to(target.device).long(),
                           output_hidden_states=True, use_cache=False, logits_to_keep=1)
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


@dataclass(frozen=True)
class Row:
    """One generation of :func:`generate_rows`: the prompt it continues (an index into
    the prompts), greedy at temperature 0, else coupled sampling with `seed`."""

    prompt: int
    temperature: float = 0.0
    seed: int = 0


@dataclass
class Generated:
    """A row's generated tokens and, when states were captured, the target's states at
    every position of prompt + tokens ([n, (len(layers) + 1) * h] float32: the layers'
    states concatenated, then the final normed state) and its argmax there ([n] long;
    -1 at the prompt's positions but its last, where no logits were computed)."""

    tokens: list[int]
    states: torch.Tensor | None = None
    choice: torch.Tensor | None = None


def _growing_cache(model: Any, capacity: int) -> Any:
    """A DynamicCache whose full-attention layers write into tensors preallocated for
    `capacity` positions (doubling when full) instead of concatenating at every step:
    a decode step of a large batch otherwise spends most of its time copying the cache."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self.room: tuple[torch.Tensor, torch.Tensor] | None = None
            self.used = 0

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            if self.room is None or self.used + n > self.room[0].shape[-2]:
                size = max(capacity, 2 * (self.used + n))
                room = tuple(x.new_empty(*x.shape[:-2], size, x.shape[-1])
                             for x in (key_states, value_states))
                if self.room is not None and self.used:
                    room[0][..., :self.used, :] = self.room[0][..., :self.used, :]
                    room[1][..., :self.used, :] = self.room[1][..., :self.used, :]
                self.room = room
            self.room[0][..., self.used:self.used + n, :] = key_states
            self.room[1][..., self.used:self.used + n, :] = value_states
            self.used += n
            self.keys = self.room[0][..., :self.used, :]
            self.values = self.room[1][..., :self.used, :]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.room is not None:
                self.room = (self.room[0][indices], self.room[1][indices])
                self.keys = self.room[0][..., :self.used, :]
                self.values = self.room[1][..., :self.used, :]

    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


def _choose(logits: torch.Tensor, rows: Sequence[Row], positions: Sequence[int]) -> list[int]:
    """Each row's token at its absolute position: the argmax at temperature 0, else
    argmax(logits / T + Gumbel(seed, position)), the benchmark's coupled sampling (exact
    sampling from softmax(logits / T), a pure function of seed and position)."""
    from pytest_specdec.sampling import gumbel_noise

    scores = logits.float()
    sampled = [i for i, row in enumerate(rows) if row.temperature > 0]
    if sampled:
        scores = scores.clone()
        for i in sampled:
            noise = gumbel_noise(rows[i].seed, torch.tensor([positions[i]], device=scores.device),
                                 scores.shape[-1])[0]
            scores[i] = (scores[i].double() / rows[i].temperature + noise).float()
    return scores.argmax(dim=-1).tolist()


def generate_rows(target: Target, prompts: Sequence[Sequence[int]], rows: Sequence[Row], *,
                  max_new_tokens: int, layers: Sequence[int] | None = None,
                  batch_size: int = 48, progress: bool = False,
                  desc: str = "generating") -> list[Generated]:
    """The target's continuations of `prompts` for each of `rows` (up to and including
    the first EOS, at most `max_new_tokens`), by a batched decode loop of its own: the
    prompts in left-padded batches of `batch_size` of similar lengths (attention mask
    and position ids), each prompt prefilled once and its KV cache shared by all its
    rows (greedy and sampled continuations of one prompt decode together), finished
    rows dropped from the batch.

    With `layers` (output_hidden_states numbering) the target's states at those layers
    and its final state are captured along the way, at every position of each
    sequence (the prompt's in the prefill, each token's when it is fed), so no second
    pass over the data is needed (:class:`Generated`). Deterministic: the batches, the
    per-row seeds and the computation are fixed by the arguments (and torch's build and
    thread count)."""
    from tqdm.auto import tqdm

    model, device = target.model, target.device
    eos = frozenset(target.eos_ids)
    tok = target.tokenizer
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    pad = int(pad if pad is not None else (min(eos) if eos else 0))
    capture = None if layers is None else tuple(int(x) for x in layers)
    by_prompt: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        if not 0 <= row.prompt < len(prompts) or not prompts[row.prompt]:
            raise TrainingError(f"row {r}: prompt {row.prompt} is not one of the "
                                f"{len(prompts)} (non-empty) prompts")
        by_prompt.setdefault(row.prompt, []).append(r)
    order = sorted(by_prompt, key=lambda i: (len(prompts[i]), i))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    results: list[Generated] = [Generated([]) for _ in rows]

    def run(ids: torch.Tensor, attend: torch.Tensor, positions: torch.Tensor,
            cache: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = model(input_ids=ids.to(device), attention_mask=attend.to(device),
                    position_ids=positions.to(device), cache=cache, use_cache=True,
                    logits_to_keep=1, output_hidden_states=capture is not None)
        states = None
        if capture is not None:
            hs = out.hidden_states
            states = torch.cat([hs[i] for i in capture] + [hs[-1]], dim=-1).float().cpu()
        return out.logits[:, -1].float().cpu(), states

    bar = tqdm(total=len(rows), desc=desc, disable=not progress, unit="seq")
    with torch.inference_mode():
        for chunk in chunks:
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attend = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, i in enumerate(chunk):
                ids[j, width - len(prompts[i]):] = torch.tensor(list(prompts[i]), dtype=torch.long)
                attend[j, width - len(prompts[i]):] = 1
            cache = _growing_cache(model, width + max_new_tokens + 1)
            logits, states = run(ids, attend, (attend.cumsum(-1) - 1).clamp(min=0), cache)
            members = [(j, r) for j, i in enumerate(chunk) for r in by_prompt[i]]
            source = torch.tensor([j for j, _ in members], dtype=torch.long)
            active = [r for _, r in members]
            if not torch.equal(source, torch.arange(len(chunk))):
                cache.batch_select_indices(source.to(device))
                attend, logits = attend[source], logits[source]
            pieces: dict[int, list[torch.Tensor]] = {r: [] for r in active}
            choices: dict[int, list[int]] = {}
            for j, r in members:
                n = len(prompts[rows[r].prompt])
                if states is not None:
                    pieces[r].append(states[j, width - n:])
                choices[r] = [-1] * (n - 1)
            lengths = [len(prompts[rows[r].prompt]) for r in active]  # tokens so far
            done = [False] * len(active)
            while active:
                # logits at each row's last fed position: its argmax, and (unless the
                # row is done) its next token
                top = logits.argmax(dim=-1).tolist()
                for b, r in enumerate(active):
                    choices[r].append(int(top[b]))
                live = [b for b in range(len(active)) if not done[b]]
                picked = _choose(logits[live], [rows[active[b]] for b in live],
                                 [lengths[b] for b in live]) if live else []
                for b, token in zip(live, picked):
                    r = active[b]
                    results[r].tokens.append(int(token))
                    if token in eos or len(results[r].tokens) >= max_new_tokens:
                        done[b] = True
                # rows done before this step have had their last token fed: drop them
                if len(live) < len(active):
                    bar.update(len(active) - len(live))
                    if not live:
                        break
                    index = torch.tensor(live, dtype=torch.long)
                    cache.batch_select_indices(index.to(device))
                    attend = attend[index]
                    active = [active[b] for b in live]
                    lengths = [lengths[b] for b in live]
                    done = [done[b] for b in live]
                feed = torch.tensor([[results[r].tokens[-1]] for r in active], dtype=torch.long)
                attend = torch.cat([attend, torch.ones(len(active), 1, dtype=torch.long)], dim=1)
                positions = torch.tensor([[n] for n in lengths], dtype=torch.long)
                logits, states = run(feed, attend, positions, cache)
                for b, r in enumerate(active):
                    if states is not None:
                        pieces[r].append(states[b])
                    lengths[b] += 1
            for _, r in members:
                if capture is not None:
                    results[r].states = torch.cat(pieces[r])
                results[r].choice = torch.tensor(choices[r], dtype=torch.long)
    bar.close()
    return results


def sample_seed(seed: int, sample: int, index: int) -> int:
    """The coupled-sampling seed of sampled generation `sample` of prompt `index`."""
    digest = hashlib.sha256(f"distill|{seed}|{sample}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def generate_data(target: Target, settings: DataSettings = DataSettings(), *,
                  batch_size: int = 48, progress: bool = False,
                  layers: Sequence[int] | None = None) -> DistillData:
    """Self-distillation data: the target's own generations over the prompt set (see
    :class:`DataSettings` for which generations), by :func:`generate_rows`: round 0's
    greedy and sampled generations of each prompt share its prefill; the target's
    states at `layers` (default :func:`state_layers`) and its final state are captured
    along the way and attached (:meth:`DistillData.attach_states`)."""
    from pytest_specdec.paradigms import Completion, first_prompt
    from pytest_specdec.problems import Problem

    items = training_prompts(settings)
    layers = state_layers(target) if layers is None else _layer_indices(target, layers)
    h = _hidden_size(target)
    sequences: list[list[int]] = []
    lengths: list[int] = []
    captured: list[Generated] = []

    def add(prompt_ids: list[int], generated: Generated) -> None:
        if generated.tokens:
            sequences.append(list(prompt_ids) + list(generated.tokens))
            lengths.append(len(prompt_ids))
            captured.append(generated)

    def encode(text: str) -> list[int]:
        return list(target.encode_prompt(text))

    texts = [first_prompt(x) if isinstance(x, Problem) else x for x in items]
    first = [encode(t) for t in texts]
    common = dict(max_new_tokens=settings.max_new_tokens, batch_size=batch_size,
                  progress=progress, layers=layers)
    n = len(items)
    # round 0 greedy and every sample continue the same first prompts: one batch
    rows = [Row(i) for i in range(n)] + [
        Row(i, settings.temperature, sample_seed(settings.seed, s, i))
        for s in range(settings.samples) for i in range(n)]
    outs = generate_rows(target, first, rows, desc=f"greedy round 0 + {settings.samples} "
                         f"sampled at T={settings.temperature:g}", **common)
    greedy, sampled = outs[:n], outs[n:]
    history: list[list[Any]] = [[] for _ in items]
    owners = list(range(n))  # the item each prompt of this round belongs to
    prompts = first
    for r in range(settings.rounds):
        if r:
            greedy = generate_rows(target, prompts, [Row(i) for i in range(len(prompts))],
                                   desc=f"greedy round {r}", **common)
        for owner, p, g in zip(owners, prompts, greedy):
            add(p, g)
            history[owner].append(Completion(text=target.decode(g.tokens),
                                             token_ids=tuple(g.tokens)))
        # later rounds re-ask the problems (a plain prompt has no question to re-ask)
        owners = [o for o in owners if isinstance(items[o], Problem)]
        if r + 1 == settings.rounds or not owners:
            break
        prompts = [encode(round_prompt(items[o], history[o])) for o in owners]
    for s in range(settings.samples):
        for p, g in zip(first, sampled[s * n:(s + 1) * n]):
            add(p, g)
    data = DistillData(sequences, lengths)
    width = len(layers) * h
    data.attach_states(layers, [g.states[:, :width] for g in captured],
                       [g.states[:, width:] for g in captured], [g.choice for g in captured])
    return data


STATES_FORMAT = 1


def states_path(data_path: Path) -> Path:
    """The states cache beside a data cache: ``distill-data.json`` ->
    ``distill-data.states.safetensors``."""
    data_path = Path(data_path)
    return data_path.with_name(data_path.stem + ".states.safetensors")


def save_states(data: DistillData, path: Path, target: Target) -> None:
    """Write ``data.stored`` to `path` (safetensors, atomically), naming the data's
    fingerprint and the target, so :func:`load_states` reuses it only for them."""
    from safetensors.torch import save

    stored = data.stored
    if stored is None:
        return
    meta = {"format": str(STATES_FORMAT), "data": data.fingerprint(),
            "target": json.dumps(target_signature(target), sort_keys=True),
            "layers": json.dumps(list(stored.layers))}
    tensors = {"hidden": stored.hidden.contiguous(), "final": stored.final.contiguous(),
               "choice": stored.choice.contiguous(),
               "offsets": torch.tensor(stored.offsets, dtype=torch.long)}
    _write_atomic(Path(path), save(tensors, metadata=meta))


def load_states(data: DistillData, path: Path, target: Target) -> bool:
    """Attach the states cached at `path` when they were saved for these data and this
    target; False (nothing attached) otherwise."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != str(STATES_FORMAT) or meta.get("data") != data.fingerprint() \
                    or meta.get("target") != json.dumps(target_signature(target), sort_keys=True):
                return False
            layers = tuple(int(x) for x in json.loads(meta["layers"]))
            tensors = {k: handle.get_tensor(k) for k in ("hidden", "final", "choice", "offsets")}
    except (OSError, ValueError, KeyError, RuntimeError):
        return False
    offsets = tensors["offsets"].tolist()
    if offsets[-1] != data.tokens or len(offsets) != len(data.sequences) + 1:
        return False
    data.stored = StoredStates(layers, tensors["hidden"], tensors["final"], tensors["choice"],
                               offsets)
    data._states.clear()
    return True


def prepare_data(target: Target, path: Path, settings: DataSettings = DataSettings(), *,
                 batch_size: int = 48, progress: bool = False,
                 log: Callable[[str], None] = lambda m: None) -> DistillData:
    """The distillation data from the cache at `path` when it was made for this target
    with these settings, else generated and written there (atomically), with the
    target's states captured while generating in :func:`states_path` beside it (reused
    by the next run, e.g. the other kind's)."""
    settings.check()
    path = Path(path)
    wanted = {"format": DATA_FORMAT, "target": target_signature(target),
              "settings": asdict(settings)}
    if path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if all(cached.get(k) == v for k, v in wanted.items()):
                data = DistillData(cached["sequences"], cached["prompt_lengths"])
                kept = load_states(data, states_path(path), target)
                log(f"reusing the distillation data in {path} ({len(cached['sequences'])} "
                    f"sequences{', with their states' if kept else ''})")
                return data
            log(f"the distillation data in {path} were made differently; regenerating")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log(f"the distillation data in {path} are unreadable ({exc}); regenerating")
    started = time.perf_counter()
    data = generate_data(target, settings, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - started
    log(f"generated {len(data.sequences)} sequences ({data.generated_tokens} generated "
        f"tokens, the target's states captured) in {seconds:.0f} s")
    record = dict(wanted, seconds=round(seconds, 1), sequences=data.sequences,
                  prompt_lengths=data.prompt_lengths)
    save_states(data, states_path(path), target)  # first: the data then name valid states
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
    digest: str = ""       # the weights' digest (training.json's weights_digest)


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


def save_weights(trainable: Trainable, output: Path, record: dict[str, Any]) -> str:
    """The trainable's final weights (``trainable.save``) plus training.json (`record`,
    with ``weights_digest`` added: :func:`~pytest_specdec.models.weights.state_digest`
    of the trainable's ``weights_module`` (default: its ``module``), the model the
    drafter loads, so it equals the drafter's ``weights_digest`` after attach in the same
    dtype), written to a temp folder beside `output`, then swapped in; returns the digest."""
    from pytest_specdec.models.weights import state_digest

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
        digest = state_digest(getattr(trainable, "weights_module", trainable.module))
        (staging / "training.json").write_text(json.dumps(dict(record, weights_digest=digest),
                                                          indent=1), encoding="utf-8")
        _swap_in(staging, output)
        return digest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def kind_defaults(kind: str) -> dict[str, Any]:
    """The loop's defaults for `kind` (steps, lr, batch_size; a custom trainable gets
    :data:`DEFAULT_STEPS` etc.)."""
    base = {"steps": DEFAULT_STEPS, "lr": DEFAULT_LR, "batch_size": DEFAULT_BATCH_SIZE}
    return dict(base, **KIND_DEFAULTS.get(kind, {}))


def learning_rate(lr: float, step: int, steps: int) -> float:
    """The learning rate of step `step` (0-based) of `steps`: a linear warm-up over
    the first WARMUP_STEPS, then a cosine decay to FINAL_LR_RATIO of `lr` at the last
    step. A pure function of the step, so a resumed run follows the same schedule."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    if steps <= WARMUP_STEPS:
        return lr * warm
    progress = min(1.0, max(0.0, (step - WARMUP_STEPS) / max(1, steps - 1 - WARMUP_STEPS)))
    decay = FINAL_LR_RATIO + (1 - FINAL_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr * warm * decay


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run with torch's intra-op thread count set to `threads` (None: as it is), then
    restore it. A reduction splits its work by thread count, so the same weights need
    the same count: the training fixes it instead of taking the machine's core count."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def build_info() -> dict[str, Any]:
    """What besides the inputs decides the weights' bits: torch's version and the CPU
    kernels it uses (another build or instruction set rounds differently)."""
    capability = None
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        pass
    return {"torch": torch.__version__, "cpu_capability": capability}


def train(kind: str | TrainableFactory, target: Target, *, output: Path,
          steps: int | None = None, seed: int = 0, lr: float | None = None,
          batch_size: int | None = None, max_minutes: float | None = None,
          resume: bool = False, progress: bool = True, data: DistillData | None = None,
          data_settings: DataSettings | None = None, data_path: Path | None = None,
          checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
          options: dict[str, Any] | None = None, threads: int | None = DEFAULT_THREADS,
          restart_mismatched: bool = False,
          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> TrainResult:
    """Train `kind`'s drafter on the target's own generations and write its weights to
    `output` (atomically; plus training.json recording the run).

    `kind` is "eagle3" or "sps" (their modules' ``trainable``) or any
    ``trainable(target, data, **options)`` factory; `steps`, `lr` and `batch_size`
    default to :func:`kind_defaults`. `data` defaults to :func:`prepare_data` at
    `data_path` (default: ``OUTPUT/../distill-data.json``, which the kinds' default
    folders share).

    The run is a fixed number of steps from `seed`: python and torch RNGs, the batch
    order, AdamW with a warm-up and cosine decay of the learning rate
    (:func:`learning_rate`) and gradient clipping at norm 1, all under `threads` torch
    threads (default 2, whatever the machine has; None: as set), so the same commit,
    torch build and thread count give bit-identical weights on any machine, at any
    load. A checkpoint every `checkpoint_every` steps goes to ``OUTPUT.checkpoint``
    (safetensors + state.json), from which `resume` continues with the same batches
    and RNG states: a resumed run ends with the weights of an uninterrupted one. It
    refuses a checkpoint of other settings, unless `restart_mismatched` (then it starts
    over).

    `max_minutes` (None or 0: none, the default) bounds the call's wall time from its
    start, data and states included: when it runs out the run stops after the current
    step (it does at least one), saves the weights **marked incomplete** (training.json
    ``"complete": false``, ``steps_done`` < ``steps``; the drafters refuse them, see
    :func:`weights_incomplete`) and keeps the checkpoint for `resume`. A run that
    finishes its steps removes the checkpoint.
    """
    from tqdm.auto import tqdm

    clock = time.monotonic()  # the budget covers the data and the states too
    output = Path(output)
    name, factory = trainable_factory(kind)
    defaults = kind_defaults(name)
    steps = defaults["steps"] if steps is None else steps
    lr = defaults["lr"] if lr is None else lr
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    _check_loop_values(steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                       max_minutes=max_minutes, checkpoint_every=checkpoint_every)
    if threads is not None and (type(threads) is not int or threads < 1):
        raise TrainingError(f"threads {threads!r} must be an int >= 1 (or None: as set)")
    with torch_threads(threads) as used_threads:
        return _train(name, factory, target, output=output, steps=steps, seed=seed, lr=lr,
                      batch_size=batch_size, max_minutes=max_minutes, resume=resume,
                      progress=progress, data=data, data_settings=data_settings,
                      data_path=data_path, checkpoint_every=checkpoint_every,
                      options=options, threads=used_threads,
                      restart_mismatched=restart_mismatched, log=log, clock=clock, tqdm=tqdm)


def _train(name: str, factory: TrainableFactory, target: Target, *, output: Path, steps: int,
           seed: int, lr: float, batch_size: int, max_minutes: float | None, resume: bool,
           progress: bool, data: DistillData | None, data_settings: DataSettings | None,
           data_path: Path | None, checkpoint_every: int, options: dict[str, Any] | None,
           threads: int, restart_mismatched: bool, log: Callable[[str], None], clock: float,
           tqdm: Any) -> TrainResult:
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
    meta = {"kind": name, "seed": seed, "batch_size": batch_size, "steps": steps, "lr": lr,
            "options": {k: v for k, v in sorted((options or {}).items())},
            "torch_threads": threads, "data": data.fingerprint(),
            "target": target_signature(target)}
    checkpoint = checkpoint_folder(output)
    start = 0
    if resume and (checkpoint / "state.json").is_file():
        record = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
        differs = [k for k, v in meta.items() if _jsonable(record.get(k)) != _jsonable(v)]
        if differs:
            why = (f"checkpoint {checkpoint} was made with other "
                   + ", ".join(f"{k} ({record.get(k)!r}, not {meta[k]!r})" for k in differs))
            if not restart_mismatched:
                raise TrainingError(why + "; run without --resume to start over")
            log(f"{why}: starting {name} over from step 0")
        else:
            start = int(load_checkpoint(checkpoint, module=module, optimizer=optimizer)["step"])
            log(f"resuming {name} from step {start} of {steps} ({checkpoint})")
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
                group["lr"] = learning_rate(lr, step, steps)
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
    record = dict(meta, steps_done=step, complete=step >= steps, stopped=stopped,
                  loss=result.loss, first_loss=first_loss, seconds=result.seconds,
                  seconds_per_step=result.seconds_per_step, data_seconds=result.data_seconds,
                  states_seconds=result.states_seconds, resumed_from=start,
                  sequences=len(data.sequences), generated_tokens=data.generated_tokens,
                  **build_info())
    result.digest = save_weights(trainable, output, record)
    if step < steps:
        save_checkpoint(checkpoint, step=step, module=module, optimizer=optimizer, meta=meta)
        log(f"stopped at step {step} of {steps} (the {max_minutes:g}-minute limit): the "
            f"weights in {output} are marked incomplete; `{finish_command(name, target)}` "
            f"finishes them from {checkpoint}")
    else:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return result


def _jsonable(value: Any) -> Any:
    """`value` as state.json holds it (tuples become lists)."""
    return json.loads(json.dumps(value))


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


def training_record(folder: str | Path) -> dict[str, Any] | None:
    """The folder's training.json, or None when it has none (or an unreadable one)."""
    try:
        record = json.loads((Path(folder) / "training.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def finish_command(kind: str, target: Any) -> str:
    """The command that finishes (resumes) `kind`'s default weights for `target`."""
    from pytest_specdec.target import EMBEDDED_NAME

    name = str(getattr(target, "name", target))
    where = "" if name == EMBEDDED_NAME else f" --target {name}"
    return f"pytest-specdec train {kind}{where} --resume"


def weights_incomplete(folder: str | Path, kind: str | None = None, target: Any = None) -> str:
    """"" unless the folder's training.json says its run stopped before its steps (a
    time limit): then a message naming the folder, the steps done of the steps and the
    command that finishes them. Weights without training.json (made elsewhere) count as
    complete."""
    record = training_record(folder)
    if record is None:
        return ""
    try:
        done, steps = int(record.get("steps_done", 0)), int(record.get("steps", 0))
    except (TypeError, ValueError):
        done, steps = 0, 1
    complete = record.get("complete", done >= steps)
    if complete is True and done >= steps:
        return ""
    kind = kind or str(record.get("kind", "KIND"))
    why = " (stopped by its time limit)" if record.get("stopped") == "time" else ""
    command = finish_command(kind, target if target is not None else
                             (record.get("target") or {}).get("name", ""))
    return (f"{folder} holds incomplete {kind} weights: {done} of {steps} training steps "
            f"done{why}; finish them with `{command}`")


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
