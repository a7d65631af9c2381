"""EAGLE-3's side of the training loop (:class:`~pytest_specdec.models.trainable.Trainable`):
the reduced draft vocabulary, and the "training-time test", the head unrolled on its
own outputs for :data:`TTT_STEPS` steps as the reference trains it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pytest_specdec.models.eagle3.checkpoint import save_checkpoint
from pytest_specdec.models.eagle3.head import Eagle3Config, Eagle3Head
from pytest_specdec.models.weights import TrainingError, target_signature


#: the reference's training-time test length (steps the head is unrolled on its own outputs)
TTT_STEPS = 7



def draft_vocabulary(data: Any, vocab_size: int, size: int) -> list[int]:
    """The reference's draft vocabulary: the `size` target ids most frequent among the
    training data's generated tokens (then its prompt tokens, then the lowest ids, when
    the data hold fewer), sorted."""
    size = min(int(size), vocab_size)
    generated: Counter[int] = Counter()
    prompts: Counter[int] = Counter()
    for seq, n in zip(data.sequences, data.prompt_lengths):
        generated.update(seq[n:])
        prompts.update(seq[:n])
    chosen: list[int] = []
    seen: set[int] = set()
    for counter in (generated, prompts):
        for token, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])):
            if len(chosen) >= size:
                break
            if 0 <= token < vocab_size and token not in seen:
                chosen.append(token)
                seen.add(token)
    token = 0
    while len(chosen) < size:
        if token not in seen:
            chosen.append(token)
            seen.add(token)
        token += 1
    return sorted(chosen)



def active_positions(loss_mask: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions a training-time test of `steps` steps needs per row, from
    `steps` before its first loss position to the one before its last (step j at i
    reads the loss at i + 1 + j), as consecutive runs left-aligned in [B, A] (A: the
    longest run), and [B, A] bool: inside the row's run (the rest repeat its last
    position and carry no loss)."""
    b, t = loss_mask.shape
    device = loss_mask.device
    position = torch.arange(t, device=device).expand(b, t)
    has = loss_mask.any(-1)
    first = torch.where(loss_mask, position, t).min(-1).values
    last = torch.where(loss_mask, position, -1).max(-1).values
    start = (first - steps).clamp(min=0)
    end = torch.where(has, last, start + 1)  # exclusive: the last loss needs i <= last - 1
    width = max(int((end - start).max()), 1)
    slots = start[:, None] + torch.arange(width, device=device)[None]
    live = slots < end[:, None]
    return torch.minimum(slots, (end[:, None] - 1).clamp(min=0)), live



@dataclass
class Eagle3Trainable:
    """EAGLE-3's side of :class:`pytest_specdec.training.loop.Trainable`."""

    head: Eagle3Head
    output_head: torch.Tensor  # the target's lm_head weight rows of the draft vocabulary
    signature: dict
    steps: int = TTT_STEPS
    step_weight: float = 0.8
    #: the target's whole lm_head weight, to find its argmax (None: the vocabularies agree)
    full_output_head: torch.Tensor | None = None
    kind: str = "eagle3"

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return tuple(self.head.config.hidden_layers or ())

    @property
    def module(self) -> nn.Module:
        return self.head

    @property
    def weights_module(self) -> nn.Module:
        """What the drafter loads (the head): training.json's weights digest is its."""
        return self.head

    def step_losses(self, batch: Any) -> list[torch.Tensor]:
        """Per training-time-test step: soft cross-entropy of the head's draft-vocabulary
        distribution against the target's, restricted to the draft vocabulary and
        renormalised, at positions whose next-next token the target generated and whose
        target choice the draft vocabulary holds (the reference's position mask).

        Only the positions a loss can reach are unrolled (:func:`active_positions`:
        from `steps` before each row's first generated token to its end); the prompt's
        positions before them give step 0's keys and values only."""
        head = self.head
        device = head.fc.weight.device
        ids = batch.input_ids.to(device)
        mask = batch.attention_mask.to(device)
        loss_mask = batch.loss_mask.to(device)
        b, t = ids.shape
        active, live = active_positions(loss_mask, self.steps)
        width = active.shape[1]
        rows = torch.arange(b, device=device)[:, None]
        # the target's side at the window of positions the steps' predictions land on
        window = active[:, :1] + torch.arange(width + self.steps, device=device)[None]
        inside = window < t
        window = window.clamp(max=t - 1)
        with torch.no_grad():
            final = batch.final_hidden.to(device)[rows, window].float()
            target_p = torch.softmax(final @ self.output_head.to(device).float().T, dim=-1)
            choice = getattr(batch, "target_choice", None)
            in_vocab = self._target_choice_in_vocab(
                final, None if choice is None else choice.to(device)[rows, window])
            usable = loss_mask[rows, window] & in_vocab & inside
        outputs = head.unrolled(batch.hidden.to(device), ids, mask, self.steps, active=active)
        losses = []
        for j, logits in enumerate(outputs):
            # step j at i predicts the target's distribution at i + 1 + j; window slot
            # q + 1 + j is position active[q] + 1 + j (active is consecutive per row)
            at = slice(1 + j, 1 + j + width)
            valid = live & usable[:, at]
            logp = torch.log_softmax(logits.float(), dim=-1)
            per_position = -(target_p[:, at] * logp).sum(-1)
            count = valid.sum().clamp(min=1)
            losses.append((per_position * valid).sum() / count)
        return losses

    def _target_choice_in_vocab(self, final: torch.Tensor,
                                choice: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] bool: the target's own argmax (`choice`, -1 where unknown; None: from
        `final` and the target's whole output head) lies in the draft vocabulary."""
        full = self.full_output_head
        if self.head.config.draft_vocab_size == self.head.config.vocab_size or \
                (choice is None and full is None):
            return torch.ones(final.shape[:2], dtype=torch.bool, device=final.device)
        if choice is None:
            choice = (final.float() @ full.to(final.device).float().T).argmax(-1)
        known = choice >= 0
        return self.head.t2d.to(choice.device)[choice.clamp(min=0)] & known

    def loss(self, batch: Any) -> torch.Tensor:
        losses = self.step_losses(batch)
        weights = [self.step_weight ** j for j in range(len(losses))]
        return sum(w * l for w, l in zip(weights, losses)) / sum(weights)

    def save(self, folder: Path) -> None:
        save_checkpoint(self.head, folder, layout="specforge", target=self.signature)



def trainable(target: Any, data: Any, *, draft_vocab_size: int = 4096, steps: int = TTT_STEPS,
              intermediate_size: int | None = None, seed: int = 0,
              step_weight: float = 0.8, **options: Any) -> Eagle3Trainable:
    """A fresh EAGLE-3 head for `target` (a pytest_specdec Target), to be trained on
    `data` (a DistillData) by the training-time test with `steps` unrolled steps (the
    reference: 7). The draft vocabulary is the `draft_vocab_size` target ids most frequent
    in the data (the reference: 32000 of Llama 3's 128256; the default here is sized for a
    CPU). The layer is shaped as one of the target's decoder layers (``intermediate_size``
    overrides its MLP width); ``norm`` and ``lm_head`` start from the target's final norm
    and output head (its draft-vocabulary rows), the rest from a seeded random init."""
    if options:
        raise TrainingError(f"unknown eagle3 training option(s) {', '.join(sorted(options))}; "
                            "known: draft_vocab_size, steps, intermediate_size, seed, step_weight")
    if steps < 1:
        raise TrainingError(f"steps {steps} must be >= 1")
    if not 1 <= draft_vocab_size:
        raise TrainingError(f"draft_vocab_size {draft_vocab_size} must be >= 1")
    model = target.model
    size = min(int(draft_vocab_size), int(target.vocab_size))
    config = Eagle3Config.for_target(target, draft_vocab_size=size,
                                     intermediate_size=intermediate_size)
    embeddings = model.get_input_embeddings().weight.detach().float().cpu()
    output = model.get_output_embeddings().weight.detach().float().cpu()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        head = Eagle3Head(config, embeddings=embeddings)
    finally:
        torch.random.set_rng_state(generator_state)
    head.set_vocabulary(draft_vocabulary(data, config.vocab_size, size))
    ids = head.target_ids()
    with torch.no_grad():
        head.lm_head.weight.copy_(output[ids])
        final_norm = getattr(getattr(model, "model", model), "norm", None)
        if final_norm is not None and getattr(final_norm, "weight", None) is not None \
                and final_norm.weight.shape == head.norm.weight.shape:
            head.norm.weight.copy_(final_norm.weight.detach().float().cpu())
    head.train()
    return Eagle3Trainable(head=head, output_head=output[ids].clone(),
                           signature=target_signature(target), steps=int(steps),
                           step_weight=float(step_weight),
                           full_output_head=output if size < config.vocab_size else None)
