"""Offline training of model drafters by self-distillation from the target.

The data are the target's own generations over a prompt set (:class:`DistillData`); a
batch carries the target's hidden states at the layers a drafter reads and its final
normed state, whose product with the output head is the target's logits
(:class:`DistillBatch`). A drafter kind supplies a :class:`Trainable` (its module, its
loss on a batch, how it saves itself); :func:`train` runs the loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from pytest_specdec.target import Target

#: drafter kinds `pytest-specdec train` knows, and the module whose ``trainable`` builds each
KINDS = {"eagle3": "pytest_specdec.models.eagle3", "sps": "pytest_specdec.models.draft_lm"}


class TrainingError(ValueError):
    """Training cannot run as asked; the message names the value and what is accepted."""


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

    def __post_init__(self) -> None:
        if len(self.sequences) != len(self.prompt_lengths):
            raise TrainingError(f"{len(self.sequences)} sequences but "
                                f"{len(self.prompt_lengths)} prompt lengths")
        for i, (seq, n) in enumerate(zip(self.sequences, self.prompt_lengths)):
            if not 0 < n < len(seq):
                raise TrainingError(f"sequence {i}: prompt length {n} is not in "
                                    f"[1, {len(seq)}) (each needs a generated token)")

    def batches(self, target: Target, layers: tuple[int, ...] | list[int], *,
                batch_size: int, seed: int) -> Iterator[DistillBatch]:
        """Endless batches of `batch_size` sequences, in an order shuffled by `seed`
        (a fresh permutation per pass), with the target's states computed per batch
        under no_grad (the data set is small; states of all sequences at three layers
        would not fit memory for a real target)."""
        if batch_size < 1:
            raise TrainingError(f"batch_size {batch_size} must be >= 1")
        rng = random.Random(seed)
        order: list[int] = []
        while True:
            if not order:
                order = list(range(len(self.sequences)))
                rng.shuffle(order)
            chosen, order = order[:batch_size], order[batch_size:]
            yield self.batch(target, layers, chosen)

    def batch(self, target: Target, layers: tuple[int, ...] | list[int],
              indices: list[int]) -> DistillBatch:
        """The batch of the sequences at `indices` (see :class:`DistillBatch`)."""
        seqs = [self.sequences[i] for i in indices]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attend = torch.zeros(len(seqs), width, dtype=torch.bool)
        loss_mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for row, (i, seq) in enumerate(zip(indices, seqs)):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            attend[row, :len(seq)] = True
            # position j predicts token j+1: generated tokens are prompt_len..len-1
            loss_mask[row, self.prompt_lengths[i] - 1:len(seq) - 1] = True
        hidden, final = target_states(target, ids, attend, layers)
        return DistillBatch(input_ids=ids, attention_mask=attend, loss_mask=loss_mask,
                            hidden=hidden, final_hidden=final)


def target_states(target: Target, ids: torch.Tensor, attend: torch.Tensor,
                  layers: tuple[int, ...] | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's hidden states at `layers` (concatenated) and its final normed state,
    both float32 on the CPU, for right-padded `ids`."""
    model = target.model
    num_layers = int(model.config.get_text_config(decoder=True).num_hidden_layers
                     if hasattr(model.config, "get_text_config")
                     else model.config.num_hidden_layers)
    for layer in layers:
        if not -num_layers - 1 <= int(layer) <= num_layers:
            raise TrainingError(f"layer {layer} is not in [{-num_layers - 1}, {num_layers}] "
                                f"(output_hidden_states indices of a {num_layers}-layer target)")
    with torch.no_grad():
        out = model(input_ids=ids.to(target.device), attention_mask=attend.to(target.device).long(),
                    output_hidden_states=True, use_cache=False)
    states = out.hidden_states
    hidden = torch.cat([states[int(layer)] for layer in layers], dim=-1) if layers \
        else states[-1][..., :0]
    return hidden.float().cpu(), states[-1].float().cpu()


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
    config = target.model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return {"name": str(target.name), "hidden_size": int(text.hidden_size),
            "vocab_size": int(target.vocab_size), "num_layers": int(text.num_hidden_layers)}


def weights_fit(folder: Path, target: Any) -> str:
    """"" when `folder` holds weights (config.json + model.safetensors) whose config's
    ``"target"`` matches :func:`target_signature` of `target`; else why not."""
    import json

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
