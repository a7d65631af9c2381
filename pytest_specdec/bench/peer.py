"""The peer: Hugging Face's own ``generate``, plain and with prompt lookup, as a
runner method, so every report shows our numbers beside transformers' on the same
machine, prompts and token budget, and an independent reference for our baseline.

Our baseline is our engine's loop with empty drafts, so a bug shared by the baseline
and every speculative path would be invisible to the losslessness check. transformers'
``generate`` is a separate implementation (its own cache handling, its own loop, its own
prompt lookup verification), so the peer cases also check that it produces our
baseline's tokens, sequence by sequence:

- at T=0 both decode greedily;
- at T>0 ``generate`` runs greedy too, over the scores of :class:`CoupledGumbel`, a
  ``LogitsProcessor`` giving ``logits / T + G(seed, t)`` at the absolute position t of
  the token being chosen (``input_ids.shape[1]`` when the processor is called), with
  ``G`` = :func:`pytest_specdec.protocol.sampling.gumbel_noise`: our coupled sampling. In plain
  decoding transformers calls the processor once per step; in prompt lookup (assisted
  decoding) it calls it once per verified position with the sequence cut just before
  that position, so t is right there as well.

In fp32 any difference fails the peer case (:class:`PeerMismatch`). In fp16/bf16
``generate`` and our engine round differently (other kernels and shapes for the same
logits), so a flip at a near-tie is expected there: the case is labelled ``differs``
and keeps the first divergence instead of failing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from pytest_specdec.bench.lossless import Divergence, LosslessError, first_divergence
from pytest_specdec.bench.record import OUR_PLD  # the drafter hf_pld copies and is compared with
from pytest_specdec.bench.runner import Method, SequenceKey
from pytest_specdec.engine import timing
from pytest_specdec.engine.loop import Generation, GenerationRequest
from pytest_specdec.engine.metrics import SpecDecodingStats
from pytest_specdec.engine.target import Target
from pytest_specdec.protocol.drafter import draft_depth
from pytest_specdec.protocol.sampling import gumbel_noise

#: How the peers choose tokens, as stored in their records.
PEER_SAMPLING = "greedy; at T>0 over logits/T + G(seed, t), coupled gumbel via a LogitsProcessor"
HALF_PRECISION = (torch.float16, torch.bfloat16)

#: generate() options that change the scores when the model's generation_config sets
#: them (e.g. a hub model's repetition_penalty), with their neutral values.
NEUTRAL_OPTIONS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0,
                   "min_new_tokens": 0, "renormalize_logits": False, "guidance_scale": 1.0}


def neutral_options(model: Any) -> dict[str, Any]:
    """The NEUTRAL_OPTIONS the model's generation_config sets otherwise, reset for
    generate, so that the peer decodes exactly what our engine decodes (only those: an
    option passed needlessly makes transformers warn)."""
    config = getattr(model, "generation_config", None)
    return {key: neutral for key, neutral in NEUTRAL_OPTIONS.items()
            if getattr(config, key, None) not in (None, neutral)}


class _ForwardCounter:
    """Counts target forwards (each one is a step; HF's prefill also emits a token)."""

    def __init__(self, model: Any):
        self.calls = 0
        self._handle = model.register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


class CoupledGumbel(LogitsProcessor):
    """Our coupled sampling inside ``generate``: scores ``logits / T + G(seed, t)``.

    t is the absolute position (prompt included) of the token chosen from these
    logits, which is the length of ``input_ids`` transformers passes with them, in
    plain decoding and per verified position in assisted decoding alike. The processor
    is a pure function of (input length, logits), as prompt lookup also calls it on
    placeholder logits to screen its candidates for forbidden tokens.
    """

    def __init__(self, temperature: float, seed: int):
        if not temperature > 0:
            raise ValueError(f"CoupledGumbel needs a temperature > 0, got {temperature!r}")
        self.temperature, self.seed = temperature, seed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        positions = torch.full((scores.shape[0],), input_ids.shape[1], dtype=torch.int64,
                               device=scores.device)
        noise = gumbel_noise(self.seed, positions, scores.shape[-1]).to(torch.float32)
        return scores.float() / self.temperature + noise


def hf_method(target: Target, *, prompt_lookup_tokens: int = 0, max_ngram: int = 2) -> Method:
    """transformers' generate, greedy over the logits (T=0) or over our coupled
    Gumbel scores (T>0); with prompt_lookup_tokens > 0, its prompt lookup decoding
    drafting up to that many tokens from a suffix n-gram of at most max_ngram tokens."""
    if prompt_lookup_tokens < 0 or max_ngram < 1:
        raise ValueError(f"need prompt_lookup_tokens >= 0 and max_ngram >= 1, got "
                         f"prompt_lookup_tokens={prompt_lookup_tokens}, max_ngram={max_ngram}")
    model = target.model
    eos = sorted(target.eos_ids)
    neutral = neutral_options(model)

    def run(request: GenerationRequest) -> Generation:
        ids = torch.tensor([list(request.prompt_ids)], dtype=torch.long, device=target.device)
        temperature = request.sampler.temperature
        kwargs: dict[str, Any] = {
            **neutral,
            "max_new_tokens": request.max_new_tokens,
            "eos_token_id": eos,
            "pad_token_id": eos[0] if eos else None,
            # greedy in every case: at T>0 over the coupled scores, as our engine does
            "do_sample": False,
        }
        if temperature > 0:
            kwargs["logits_processor"] = LogitsProcessorList(
                [CoupledGumbel(temperature, request.sampler.seed)])
        if prompt_lookup_tokens > 0:
            kwargs.update(prompt_lookup_num_tokens=prompt_lookup_tokens,
                          max_matching_ngram_size=max_ngram)
        counter = _ForwardCounter(model)
        started = timing.now()
        try:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        finally:
            counter.close()
        wall = timing.now() - started
        new = out[0, ids.shape[1]:].tolist()
        stop = "eos" if new and new[-1] in target.eos_ids else "budget"
        stats = SpecDecodingStats(new_tokens=len(new), steps=counter.calls, wall_s=wall)
        return Generation(tokens=new, stop=stop, stats=stats)

    return run


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class PldPeerSettings:
    """hf_pld's settings, copied from our ``pld`` drafter so the two are like for like."""

    prompt_lookup_num_tokens: int
    max_matching_ngram_size: int

    def as_record(self) -> dict[str, Any]:
        return {"prompt_lookup_num_tokens": self.prompt_lookup_num_tokens,
                "max_matching_ngram_size": self.max_matching_ngram_size,
                "sampling": PEER_SAMPLING}


def pld_draft_length(pld_factory: Callable[..., Any], k: int | None,
                     profile: str = "reference") -> int:
    """The draft length hf_pld runs with: the one our ``pld`` case runs with, i.e.
    ``--specdec-k`` when given (``k``), else the ``max_depth`` the registered ``pld``
    drafter declares (:func:`pytest_specdec.protocol.drafter.draft_depth`). This is the one
    place to change when that rule changes."""
    return draft_depth(pld_factory, override=k, drafter=OUR_PLD, profile=profile)


def pld_max_ngram(pld_factory: Callable[..., Any]) -> int:
    """The default ``max_ngram`` of the registered ``pld`` drafter."""
    parameter = inspect.signature(pld_factory).parameters.get("max_ngram")
    if parameter is None or not isinstance(parameter.default, int):
        raise ValueError(f"the drafter registered as {OUR_PLD!r} ({pld_factory!r}) declares no "
                         "integer default for max_ngram, which hf_pld copies")
    return parameter.default


def pld_peer_settings(pld_factory: Callable[..., Any] | None, k: int | None,
                      profile: str = "reference") -> PldPeerSettings:
    """hf_pld's settings from our ``pld`` drafter's factory (None: nothing is registered
    under that name, and our drafters/pld.py is copied)."""
    if pld_factory is None:
        from pytest_specdec.drafters.pld import PromptLookup

        pld_factory = PromptLookup
    return PldPeerSettings(prompt_lookup_num_tokens=pld_draft_length(pld_factory, k, profile),
                           max_matching_ngram_size=pld_max_ngram(pld_factory))


def plain_peer_settings() -> dict[str, Any]:
    """hf_generate's settings, as stored in its records."""
    return {"prompt_lookup_num_tokens": 0, "sampling": PEER_SAMPLING}


# --------------------------------------------------------------------------- the check


class PeerMismatch(LosslessError):
    """transformers' generate did not produce our baseline's tokens (fp32)."""

    def __init__(self, message: str, *, peer: str, divergence: Divergence, timed_round: int):
        super().__init__(message)
        self.peer, self.divergence, self.timed_round = peer, divergence, timed_round


def describe_peer_divergence(divergence: Divergence, peer: str,
                             decode: Callable[[Sequence[int]], str] | None = None) -> str:
    """Where the peer and our baseline first differ, with both token windows."""
    return divergence.describe(decode, names=("our baseline", peer))


@dataclass(frozen=True)
class PeerVerdict:
    """``exact``, or ``differs`` (half precision only) with the first divergence."""

    label: str
    divergence: Divergence | None = None
    description: str | None = None
    timed_round: int | None = None


def check_peer(baseline: Mapping[SequenceKey, Generation],
               peer_rounds: Sequence[Mapping[SequenceKey, Generation]], *, peer: str,
               dtype: torch.dtype, decode: Callable[[Sequence[int]], str] | None = None) -> PeerVerdict:
    """Compare every sequence of every timed round of the peer with our baseline.

    In fp32 the first difference raises :class:`PeerMismatch`; in half precision it is
    returned (label ``differs``), since generate and our engine round differently.
    """
    for number, outputs in enumerate(peer_rounds, start=1):
        if set(outputs) != set(baseline):
            missing = sorted(set(outputs) ^ set(baseline))[:5]
            raise LosslessError(f"{peer} generated other sequences than our baseline "
                                f"(timed round {number}): {missing}")
        for key, reference in baseline.items():
            divergence = first_divergence(key, reference.tokens, outputs[key].tokens)
            if divergence is None:
                continue
            text = describe_peer_divergence(divergence, peer, decode)
            if dtype in HALF_PRECISION:
                return PeerVerdict("differs", divergence, text, number)
            raise PeerMismatch(
                f"{peer} (transformers generate) differs from our baseline in fp32, "
                f"timed round {number}: {text}",
                peer=peer, divergence=divergence, timed_round=number)
    return PeerVerdict("exact")
