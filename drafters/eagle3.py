"""EAGLE-3 (Li et al. 2025): a one-layer draft head on the target's fused low, middle and
high hidden states, drafting EAGLE-2's dynamic trees.

Reference: SafeAILab/EAGLE, ``eagle/model/cnets.py`` (``Model.topK_genrate``) and
``eagle/model/ea_model.py`` (``EaModel.from_pretrained``), with its defaults:
``depth`` 7 (7 head forwards after the first: trees up to 8 tokens deep), ``top_k`` 10,
``total_token`` 60 (the tree with its root, the last accepted token: 59 draft nodes).
The head, its checkpoint layouts (the SafeAILab release, vLLM speculators, SGLang
SpecForge) and its training are in :mod:`pytest_specdec.models.eagle3`; the tree in
:mod:`pytest_specdec.models.tree`.

Per step: the target states of the newly accepted positions (layers (2, L // 2, L - 3),
or those the checkpoint names) are fused and run through the head, whose KV cache
covers the context; its output at the last position scores the first level; each
further level feeds the ``top_k`` best frontier nodes (each paired with its parent's
output) through the head at once, attending to the context and the node's ancestors;
then the ``total_tokens - 1`` best candidates by cumulative log-probability are drafted.
The tree's keys and values are dropped afterwards (a length change of the head's cache).
The tree grows on the head's device (:func:`pytest_specdec.models.tree.grow_on_device`:
scores, tokens, parents, outputs and each node's visible keys stay tensors there) and
is read once per propose: with the copy of the newly accepted tokens, at most two
host<->device transfers, whatever the depth and width.

Deliberate differences from the reference:

- sampling (T > 0): the reference drafts the same tree at every temperature and
  verifies it by rejection sampling; here verification is the engine's coupled
  sampling, so the head drafts coupled too: a child's log-probability is taken from
  ``log_softmax(logits / T + G(seed, position))`` with the sequence's own Gumbel noise
  (:class:`pytest_specdec.protocol.sampling.Sampler`), which puts the token the target picks if
  its logits were the head's first. At T=0 this is the reference's ``log_softmax(logits)``.
- the draft depth is ``min(k, depth + 1)``: the engine's k (``max_depth`` 8, the
  reference's depth 7 plus the first level, unless ``--specdec-k`` or the cpu depth
  profile lowers it) bounds the tree.
- ``total_token=-1`` (the reference's timing-based auto-tuning of the tree size) is not
  offered; ``total_tokens`` is fixed per case.
- ties between equal scores go to the earlier candidate (see
  :mod:`pytest_specdec.models.tree`); the reference's ``torch.topk`` leaves them open.
- weights: ``model=""`` is this project's head trained on the target's own generations
  (``pytest-specdec train eagle3``), not a published checkpoint (none exists for the
  embedded SmolLM2 target); weights whose training stopped at a time limit
  (training.json ``"complete": false``) are refused, naming the command that finishes
  them. ``Eagle3.weights_digest`` names the weights loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from pytest_specdec.models.eagle3 import (CheckpointError, HeadCache, check_fits, eagle_layers,
                                          load_checkpoint)
from pytest_specdec.engine import transfer
from pytest_specdec.models.tree import Frontier, grow_on_device, rerank
from pytest_specdec.models.weights import state_digest
from pytest_specdec.models.weights import training_summary
from pytest_specdec.protocol.drafter import (MAX_DRAFT_NODES, Draft, DrafterBase, DraftRequest,
                                             MissingPrerequisite, TargetInfo, TargetSignals)
from pytest_specdec.protocol.sampling import Sampler, gumbel_noise


def weights_folder(model: str, info: TargetInfo) -> Path:
    """The folder of the weights named by the ``model`` option: "" is the default trained
    for the target; else a folder, or a hub id already in the local Hugging Face cache."""
    if not model:
        from pytest_specdec.models.weights import default_weights, weights_fit, weights_incomplete

        folder = default_weights("eagle3", info)
        why = weights_fit(folder, info)
        if why:
            raise MissingPrerequisite(
                f"eagle3 has no trained weights for target {info.name!r} ({why}); train them "
                "with `pytest-specdec train eagle3`, or name a checkpoint with "
                "--specdec-drafter eagle3:model=PATH_OR_HUB_ID")
        unfinished = weights_incomplete(folder, "eagle3", info)
        if unfinished:  # a run stopped by a time limit: not the weights the defaults name
            raise CheckpointError(f"eagle3 refuses its default weights: {unfinished}")
        return folder
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    # the checkpoint's config and weights only (safetensors first; a .bin is read with
    # weights_only=True), from the local Hugging Face cache, else downloaded
    patterns = ["*.json", "*.safetensors", "*.bin"]
    try:
        return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as exc:
        raise FileNotFoundError(f"eagle3: model={model!r} is neither a folder nor a Hugging Face "
                                f"id that could be loaded ({type(exc).__name__}: {exc})") from exc


class Eagle3(DrafterBase):
    """EAGLE-3 with EAGLE-2 dynamic trees (see the module docstring).

    Options: ``model`` (a checkpoint folder or cached hub id; "" = this project's trained
    head for the target), ``depth`` (head forwards after the first; the reference's 7),
    ``top_k`` (children per frontier node and frontier width; 10), ``total_tokens``
    (tokens verified per step, the last accepted one included; 60).
    """

    needs = frozenset({"hidden_states", "embeddings"})
    max_depth = 8  # the reference's depth 7, plus the first level

    def __init__(self, model: str = "", depth: int = 7, top_k: int = 10,
                 total_tokens: int = 60):
        for name, value, low in (("depth", depth, 0), ("top_k", top_k, 1),
                                 ("total_tokens", total_tokens, 2)):
            if type(value) is not int or value < low:
                raise ValueError(f"eagle3: {name} must be an int >= {low}, got {value!r}")
        if total_tokens - 1 > MAX_DRAFT_NODES:
            raise ValueError(f"eagle3: total_tokens {total_tokens} exceeds "
                             f"{MAX_DRAFT_NODES + 1} (at most {MAX_DRAFT_NODES} draft nodes)")
        self.model, self.depth, self.top_k, self.total_tokens = model, depth, top_k, total_tokens
        self.head = None
        self._weights_digest = ""
        self.hidden_layers = ()
        self.layout = ""
        self._reset(Sampler())

    def record_fields(self) -> dict[str, Any]:
        """The report note and the digest of the weights loaded (``drafter_weights``)."""
        return {**super().record_fields(), "drafter_weights": self.weights_digest}

    @property
    def weights_digest(self) -> str:
        """Which weights attach() loaded (recorded as the case's ``drafter_weights``):
        :func:`pytest_specdec.models.weights.state_digest` of the head, the first 16 hex
        digits of SHA-256 over its state dict's tensors (key, dtype, shape, bytes) in
        sorted key order; "" before attach. Equal weights give equal digests whatever
        file or layout they came from."""
        return self._weights_digest

    def attach(self, target: TargetInfo) -> None:
        folder = weights_folder(self.model, target)
        head, self.layout = load_checkpoint(folder, device=target.device, dtype=target.dtype,
                                            embeddings=target.embeddings)
        check_fits(head, target, str(folder))
        layers = head.config.hidden_layers or eagle_layers(target.num_layers)
        if len(layers) != 3:
            raise CheckpointError(f"{folder}: names {len(layers)} target layers {layers}; "
                                  "EAGLE-3 fuses 3")
        self.head, self.hidden_layers = head, tuple(layers)
        self._weights_digest = state_digest(head)  # recorded as the case's drafter_weights
        self.report_note = (f"checkpoint {self.model} ({self.layout} layout)" if self.model
                            else f"head trained here: {training_summary(folder)}")
        self.device = next(head.parameters()).device
        self.draft_to_target = head.target_ids()
        self.vocab_size = target.vocab_size

    def _reset(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.cache = HeadCache()
        self.fed = 0  # context positions the head's cache covers
        self.pending: list[torch.Tensor] = []  # target states not fed yet, from `fed` on
        self.last_out: torch.Tensor | None = None  # the head's output at position fed - 1

    def begin(self, request: DraftRequest) -> None:
        self._reset(request.sampler)

    def end(self) -> None:
        self._reset(self.sampler)

    def observe(self, signals: TargetSignals) -> None:
        states, start = signals.hidden_states, signals.hidden_start
        if states is None or start is None or states.shape[0] == 0:
            return
        waiting = self.fed + sum(p.shape[0] for p in self.pending)
        if start < self.fed:  # states again for positions the head has: roll it back
            self.cache.crop(start)
            self.fed, self.pending, self.last_out = start, [], None
        elif start != waiting:
            raise ValueError(f"eagle3 got target states from position {start}; it expected "
                             f"{waiting} (the next position without states)")
        self.pending.append(states)

    def _catch_up(self, context: Sequence[int]) -> None:
        """Feed the pending target states, paired with each position's next token."""
        if not self.pending:
            return
        states = torch.cat(self.pending)
        self.pending = []
        n, start = states.shape[0], self.fed
        following = list(context[start + 1:start + 1 + n])
        if len(following) != n:
            raise ValueError(f"eagle3 has states for positions {start}..{start + n - 1} but "
                             f"the context has {len(context)} tokens")
        tokens = transfer.to_device(following, self.device)
        positions = torch.arange(start, start + n, device=self.device)
        out = self.head.step(self.head.fuse(states.to(self.device)), tokens, positions, self.cache)
        self.last_out = out[-1]
        self.fed += n

    def _children(self, out: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each output row's (`out` [rows, hidden]) top_k children for the token at
        absolute `position`, on the device: (target ids, log-probabilities), both
        [rows, top_k], most likely first."""
        logits = self.head.logits(out).float()
        if self.sampler.temperature > 0:
            at = torch.full((1,), position, dtype=torch.long, device=logits.device)
            noise = gumbel_noise(self.sampler.seed, at, self.vocab_size)[0, self.draft_to_target].float()
            logits = logits / self.sampler.temperature + noise
        top = torch.log_softmax(logits, dim=-1).topk(min(self.top_k, logits.shape[-1]), dim=-1)
        return self.draft_to_target[top.indices], top.values

    def propose(self, context: Sequence[int], k: int) -> Draft:
        self._catch_up(context)
        if self.last_out is None or self.fed != len(context) - 1:
            return Draft()
        levels = min(k, self.depth + 1)
        budget = min(self.total_tokens - 1, MAX_DRAFT_NODES)
        first_tokens, first_logp = self._children(self.last_out[None], len(context))
        expand = _TreeExpansion(self, len(context), levels)
        try:
            tree = grow_on_device(first_tokens[0], first_logp[0], expand, top_k=self.top_k,
                                  levels=levels)
        finally:
            self.cache.crop(expand.stable)  # drop the tree's keys and values
        return Draft(*rerank(tree, budget))


class _TreeExpansion:
    """The head's side of one tree's growth, on its device: per candidate (row 1 + c;
    row 0 is the root, the last accepted token) the head's output and the tree keys
    its children see (its ancestors' and its own: [rows, tree keys])."""

    def __init__(self, drafter: Eagle3, context: int, levels: int):
        self.drafter, self.context = drafter, context
        self.stable = drafter.fed  # the head's cache covers the context up to here
        width = drafter.top_k
        candidates = 1 + width + max(levels - 1, 0) * width * width
        tree_keys = max(levels - 1, 0) * width  # each level feeds at most top_k nodes
        self.outputs = drafter.last_out.new_empty(candidates, drafter.last_out.shape[-1])
        self.outputs[0] = drafter.last_out
        self.sees = torch.zeros(candidates, tree_keys, dtype=torch.bool, device=drafter.device)

    def __call__(self, frontier: Frontier) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the frontier [n] through the head at once, each node attending to the
        context, its ancestors and itself; returns its children (target ids,
        log-probabilities [n, top_k])."""
        head, cache = self.drafter.head, self.drafter.cache
        fed_before, n = cache.length, frontier.nodes.shape[0]
        own = fed_before - self.stable  # the first tree key this level writes
        device = frontier.nodes.device
        seen = self.sees[1 + frontier.parents]  # [n, tree keys]: the ancestors' keys
        visible = torch.cat([torch.ones(n, self.stable, dtype=torch.bool, device=device),
                             seen[:, :own], torch.eye(n, dtype=torch.bool, device=device)], dim=1)
        state = self.outputs[1 + frontier.parents]  # the parents' outputs (the root's: row 0)
        positions = torch.full((n,), self.stable + frontier.depth - 1, dtype=torch.long,
                               device=device)
        out = head.step(state, frontier.tokens, positions, cache, visible)
        self.outputs[1 + frontier.nodes] = out
        seen[:, own:own + n] |= torch.eye(n, dtype=torch.bool, device=device)
        self.sees[1 + frontier.nodes] = seen
        return self.drafter._children(out, self.context + frontier.depth)
