"""What a model drafter kind hands the training loop (:class:`Trainable`) and the batch
it learns from (:class:`DistillBatch`): the contract between :mod:`pytest_specdec.models`
(EAGLE-3's head, the draft LM) and :mod:`pytest_specdec.training`, which makes the
batches and runs the loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch


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
