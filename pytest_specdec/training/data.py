"""The distillation data: the target's own generations over a prompt set
(:class:`DistillData`, made by :func:`generate_data`), cached as JSON beside the
weights (:func:`prepare_data`) with the target's states on them in safetensors, and cut
into :class:`~pytest_specdec.models.trainable.DistillBatch` es for the loop.

The default prompt set is the embedded problems minus the first ``holdout`` (the ones a
default benchmark run uses), so the drafters never train on the benchmark's own
problems; the benchmark's own prompt format (:func:`~pytest_specdec.bench.paradigms.first_prompt`
through :meth:`Target.encode_prompt`, and multi-round's re-ask prompts) is kept.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from pytest_specdec.atomic import write_file
from pytest_specdec.bench.paradigms import Completion, first_prompt
from pytest_specdec.bench.problems import Problem
from pytest_specdec.engine.target import Target
from pytest_specdec.models.trainable import DistillBatch
from pytest_specdec.models.weights import TrainingError, target_signature
from pytest_specdec.training.generation import Generated, Row, generate_rows, sample_seed
from pytest_specdec.training.prompts import DataSettings, round_prompt, training_prompts
from pytest_specdec.training.states import (StoredStates, hidden_size, layer_indices, state_layers,
                                            target_states)


#: the data cache's file name, beside the kinds' weight folders (so every kind shares it)
DATA_FILE = "distill-data.json"
DATA_FORMAT = 2  # 2: sampled generations by coupled sampling (generate_rows)
#: precompute the target's states for the whole data set when they take at most this
#: many bytes (float32); larger sets compute them per batch
KEEP_STATES_BYTES = 2 << 30
#: batches' worth of sequences sorted by length together (less padding per batch)
BUCKET = 8


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
        layers = layer_indices(target, layers)
        stream = self.order(batch_size, seed)
        for _ in range(start):
            next(stream)
        width = (len(layers) + 1) * hidden_size(target)
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
        layers = layer_indices(target, layers)
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


def generate_data(target: Target, settings: DataSettings = DataSettings(), *,
                  batch_size: int = 48, progress: bool = False,
                  layers: Sequence[int] | None = None) -> DistillData:
    """Self-distillation data: the target's own generations over the prompt set (see
    :class:`DataSettings` for which generations), by :func:`generate_rows`: round 0's
    greedy and sampled generations of each prompt share its prefill; the target's
    states at `layers` (default :func:`state_layers`) and its final state are captured
    along the way and attached (:meth:`DistillData.attach_states`)."""
    items = training_prompts(settings)
    layers = state_layers(target) if layers is None else layer_indices(target, layers)
    h = hidden_size(target)
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
    write_file(path, save(tensors, metadata=meta))


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
    write_file(path, json.dumps(record))
    return data
