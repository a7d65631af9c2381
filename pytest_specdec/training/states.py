"""The target's hidden states on the distillation data: the layers a drafter reads and
the final normed state (whose product with the output head is the target's logits),
computed per batch or once for the whole set (:class:`StoredStates`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pytest_specdec.engine.target import Target, text_config
from pytest_specdec.models.eagle3.head import eagle_layers
from pytest_specdec.models.weights import TrainingError


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


def hidden_size(target: Target) -> int:
    return int(text_config(target.model.config).hidden_size)


def layer_indices(target: Target, layers: Sequence[int]) -> tuple[int, ...]:
    """`layers` (output_hidden_states indices, negative ones from the end) as indices
    >= 0; an index outside the target is a clear error."""
    num_layers = int(text_config(target.model.config).num_hidden_layers)
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
    return eagle_layers(int(text_config(target.model.config).num_hidden_layers))


def target_states(target: Target, ids: torch.Tensor, attend: torch.Tensor,
                  layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's hidden states at `layers` (concatenated) and its final normed state,
    both float32 on the CPU, for right-padded `ids` (states at padding are meaningless)."""
    layers = layer_indices(target, layers)
    with torch.no_grad():
        out = target.model(input_ids=ids.to(target.device),
                           attention_mask=attend.to(target.device).long(),
                           output_hidden_states=True, use_cache=False, logits_to_keep=1)
    states = out.hidden_states
    final = states[-1]
    hidden = torch.cat([states[int(layer)] for layer in layers], dim=-1) if layers \
        else final[..., :0]
    return hidden.float().cpu(), final.float().cpu()
