"""The target's generations for the distillation data: a batched decode loop of its own
(rows of one prompt each, sampled by the coupled sampling rule, so a row is what the
benchmark's decode of that prompt and seed gives), separate from the benchmark engine,
which decodes one sequence at a time."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pytest_specdec.engine.target import Target
from pytest_specdec.models.weights import TrainingError
from pytest_specdec.protocol.sampling import gumbel_noise


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
