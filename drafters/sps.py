"""SpS: speculative sampling with a small draft language model (Leviathan et al. 2023,
Chen et al. 2023).

Reference: Spec-Bench's SpS (``evaluation/inference_sps.py``), which the test-time-
scaling benchmark runs: transformers' assisted generation (``AssistedCandidateGenerator``,
transformers 4.37.1 as Spec-Bench pins it) with the draft model as assistant. Its
defaults there: ``num_assistant_tokens`` 5 with the ``"heuristic"`` schedule: when the
target accepted as many draft tokens as the current length, the next draft is 2 tokens
longer, else 1 shorter (at least 1), and the length carries over to the assistant's next
generation. Here: a draft
of ``draft_length`` (5) tokens, ``adaptive`` (true) that heuristic, the length kept
across the sequences of a case (one drafter instance, as one assistant model there).

The draft model has its own KV cache, kept in step with the target's context: ``accept``
crops it to the context plus the accepted draft tokens it holds (rollback is a length
change), and the next ``propose`` feeds what it lacks (at least the target's bonus
token; positions explicit) in the forward that also gives the first draft token. Drafts
are greedy at T=0; at T>0 the token at absolute position t is
``request.sampler.choose(draft_logits, t)``: the target's own coupled rule (Gumbel noise
keyed by seed and position) on the draft's logits, so the draft is the target's choice
wherever the two models' logits agree. A draft ends early at an EOS token.

Deliberate differences from the reference:

- T>0: coupled drafting verified by equality, not Leviathan's rejection sampling of a
  token drawn from the draft's distribution. Output is lossless either way; a coupled
  draft token is accepted with probability at least (1 - TV) / (1 + TV) of the two
  distributions, which can be less than rejection sampling's 1 - TV.
- The adaptive length is capped by the engine's k (``max_depth`` 32, the cpu depth
  profile's 5, or ``--specdec-k``): it never grows past the largest k seen. The
  reference's only bound is the generation's max length.
- No confidence early exit (newer transformers' ``assistant_confidence_threshold``): the
  reference's 4.37.1 has none.
- The default draft for the embedded SmolLM2-135M-Instruct (no smaller model shares its
  tokenizer offline) is derived from the target: its first layers with its embeddings and
  head, distilled by ``pytest-specdec train sps``
  (:mod:`pytest_specdec.models.draft_lm`); one whose training stopped at a time limit
  (training.json ``"complete": false``) is refused, naming the command that finishes it.
  The reference drafts Qwen3-8B with Qwen3-0.6B. ``SpeculativeSampling.weights_digest``
  names the draft loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from pytest_specdec.engine.target import Target, wrap_model
from pytest_specdec.models.draft_lm import DraftModelError, derived_note, load_draft_model
from pytest_specdec.models.weights import state_digest
from pytest_specdec.protocol.drafter import (Draft, DraftRequest, DrafterBase, MissingPrerequisite,
                                             TargetInfo)
from pytest_specdec.protocol.sampling import Sampler


def next_draft_length(length: int, accepted: int, *, cap: int) -> int:
    """transformers' "heuristic" schedule (4.37's ``update_candidate_strategy``): 2
    longer when the target accepted as many draft tokens as the current length, else 1
    shorter (so a draft cut short by k, the budget or an EOS shrinks it); kept in
    [1, cap]."""
    grown = length + 2 if accepted >= length else length - 1
    return max(1, min(grown, cap))


def default_draft_folder(info: TargetInfo) -> Path:
    """The trained default draft for `info`'s target (``pytest-specdec train sps``);
    a clear error when it is missing or was made for another target."""
    from pytest_specdec.models.weights import default_weights, weights_fit, weights_incomplete

    folder = default_weights("sps", info)
    if not (folder / "model.safetensors").is_file():
        raise MissingPrerequisite(
            f"sps has no draft model for target {info.name!r}: {folder} holds no weights. "
            f"Make them with `pytest-specdec train sps` (derives a draft from the target and "
            f"distils it), or pass one: --specdec-drafter sps:model=PATH_OR_ID")
    why = weights_fit(folder, info)
    if why:
        raise DraftModelError(f"sps's default draft does not fit target {info.name!r}: {why}; "
                              "retrain it with `pytest-specdec train sps`")
    unfinished = weights_incomplete(folder, "sps", info)
    if unfinished:  # a run stopped by a time limit: not the draft the defaults name
        raise DraftModelError(f"sps refuses its default draft: {unfinished}")
    return folder


class SpeculativeSampling(DrafterBase):
    """SpS: a draft causal LM sharing the target's tokenizer proposes a chain.

    model: a folder or Hugging Face id of the draft (safetensors; "" = the trained
    default for the target). draft_length: the draft's length (the adaptive schedule's
    start). adaptive: transformers' heuristic schedule. max_depth: the cap, k.
    """

    max_depth = 32  # the cap of the adaptive length; sps:max_depth=N sets it per case

    def __init__(self, model: str = "", draft_length: int = 5, adaptive: bool = True,
                 max_depth: int = 32):
        if type(draft_length) is not int or draft_length < 1:
            raise ValueError(f"draft_length must be an int >= 1, got {draft_length!r}")
        if type(max_depth) is not int or max_depth < 1:
            raise ValueError(f"max_depth must be an int >= 1, got {max_depth!r}")
        self.model_spec, self.draft_length, self.adaptive = model, draft_length, bool(adaptive)
        self.max_depth = max_depth
        self.length = draft_length  # the adaptive schedule's current length
        self.largest_k = 0
        self.runner: Target | None = None
        self.eos_ids: frozenset[int] = frozenset()
        self._weights_digest = ""
        self._reset()

    def record_fields(self) -> dict[str, Any]:
        """The report note and the digest of the weights loaded (``drafter_weights``)."""
        return {**super().record_fields(), "drafter_weights": self.weights_digest}

    @property
    def weights_digest(self) -> str:
        """Which draft attach() loaded (recorded as the case's ``drafter_weights``):
        :func:`pytest_specdec.models.weights.state_digest` of the draft model, the first
        16 hex digits of SHA-256 over its state dict's tensors (key, dtype, shape,
        bytes) in sorted key order; "" before attach."""
        return self._weights_digest

    def _reset(self) -> None:
        self.cache: Any = None
        self.sampler = Sampler()
        self.cached = 0  # context tokens whose keys/values the draft cache holds
        self.extra = 0  # draft tokens the cache holds after them (fed while drafting)
        self.draft: tuple[int, ...] = ()

    def attach(self, target: TargetInfo) -> None:
        spec = self.model_spec or str(default_draft_folder(target))
        model = load_draft_model(spec, target)
        self._weights_digest = state_digest(model)  # recorded as the case's drafter_weights
        self.runner = wrap_model(model, name=f"sps draft {spec}", device=target.device)
        self.report_note = f"draft model {spec}" if self.model_spec else derived_note(spec)
        self.eos_ids = frozenset(target.eos_ids)

    def begin(self, request: DraftRequest) -> None:
        if self.runner is None:
            raise DraftModelError("sps: attach(target_info) loads the draft model; it was "
                                  "not called before begin()")
        self._reset()
        self.cache = self.runner.new_cache()
        self.sampler = getattr(request, "sampler", None) or Sampler()

    def propose(self, context: Sequence[int], k: int) -> Draft:
        runner = self.runner
        self.largest_k = max(self.largest_k, k)
        n = min(self.length if self.adaptive else self.draft_length, k)
        self.draft, self.extra = (), 0
        size = len(context)
        if n < 1 or runner is None or self.cache is None:
            return Draft()
        if self.cached >= size:  # nothing new since the last forward: re-score the last token
            self.cache.crop(-(self.cached - size + 1))
            self.cached = size - 1
        fed = list(context[self.cached:size])
        logits, _ = runner.forward(fed, self.cache, keep_logits=1,
                                   positions=range(self.cached, size))
        self.cached = size
        device = logits.device
        tokens = [int(self.sampler.choose(logits[-1:], torch.tensor([size], device=device))[0])]
        while len(tokens) < n and tokens[-1] not in self.eos_ids:
            at = size + len(tokens)
            logits, _ = runner.forward(tokens[-1:], self.cache, keep_logits=1, positions=[at - 1])
            self.extra += 1
            tokens.append(int(self.sampler.choose(logits[-1:], torch.tensor([at], device=device))[0]))
        self.draft = tuple(tokens)
        return Draft(self.draft)

    def accept(self, tokens: Sequence[int]) -> None:
        # the bonus token is the target's choice where the draft was rejected, so a draft
        # token equal to the emitted one at its place was accepted
        accepted = 0
        while accepted < min(len(tokens), len(self.draft)) \
                and tokens[accepted] == self.draft[accepted]:
            accepted += 1
        keep = min(accepted, self.extra)
        if self.cache is not None and self.extra > keep:
            self.cache.crop(-(self.extra - keep))
        self.cached += keep
        if self.adaptive and self.draft:
            self.length = next_draft_length(self.length, accepted, cap=max(self.largest_k, 1))
        self.draft, self.extra = (), 0

    def end(self) -> None:
        self._reset()
