"""The peer: Hugging Face's own ``generate``, plain and with prompt lookup, as a
runner method, so every report shows our numbers beside transformers' on the same
machine, prompts and token budget.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from pytest_specdec.engine import Generation, GenerationRequest
from pytest_specdec.metrics import SpecDecodingStats
from pytest_specdec.runner import Method
from pytest_specdec.target import Target


class _ForwardCounter:
    """Counts target forwards (each one is a step; HF's prefill also emits a token)."""

    def __init__(self, model: Any):
        self.calls = 0
        self._handle = model.register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def hf_method(target: Target, *, prompt_lookup_tokens: int = 0, max_ngram: int = 2) -> Method:
    """transformers' generate: greedy at T=0, its own sampling (seeded per sequence) at
    T>0; with prompt_lookup_tokens > 0, its prompt lookup decoding."""
    model = target.model
    eos = sorted(target.eos_ids)

    def run(request: GenerationRequest) -> Generation:
        ids = torch.tensor([list(request.prompt_ids)], dtype=torch.long, device=target.device)
        temperature = request.sampler.temperature
        kwargs: dict[str, Any] = {
            "max_new_tokens": request.max_new_tokens,
            "eos_token_id": eos,
            "pad_token_id": eos[0] if eos else None,
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            # plain softmax(logits / T): no top-k / top-p truncation, as in our engine
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
            torch.manual_seed(request.sampler.seed)
        if prompt_lookup_tokens > 0:
            kwargs.update(prompt_lookup_num_tokens=prompt_lookup_tokens,
                          max_matching_ngram_size=max_ngram)
        counter = _ForwardCounter(model)
        started = time.perf_counter()
        try:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        finally:
            counter.close()
        wall = time.perf_counter() - started
        new = out[0, ids.shape[1]:].tolist()
        stop = "eos" if new and new[-1] in target.eos_ids else "budget"
        stats = SpecDecodingStats(new_tokens=len(new), steps=counter.calls, wall_s=wall)
        return Generation(tokens=new, stop=stop, stats=stats)

    return run
