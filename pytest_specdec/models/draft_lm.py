"""Draft language models for SpS (speculative sampling with a small causal LM).

A draft model must share the target's tokenizer: the engine compares draft token ids
with the target's choices, and coupled sampling draws the same noise per token id. For a
target that has no smaller sibling with its tokenizer (the embedded SmolLM2-135M), a
draft is *derived* from the target itself (:func:`derive_draft_model`: its embeddings,
its first decoder layers, its final norm and its output head, weights copied) and then
distilled towards the target's distribution (:func:`trainable`, run by
``pytest-specdec train sps``).

Files of a saved draft (:func:`save_draft_model`): ``model.safetensors`` and
``config.json`` as transformers writes them (the config also carries ``"target"``),
the tokenizer when there is one, and :data:`META_FILE`, naming the target the draft was
derived from and fits (name, hidden size, vocabulary size, layers).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from pytest_specdec.engine.target import Target, text_config
from pytest_specdec.models.trainable import DistillBatch
from pytest_specdec.models.weights import target_signature, training_summary

log = logging.getLogger("pytest_specdec")

#: The small json beside a saved draft naming the target it was derived from / fits.
META_FILE = "specdec_draft.json"
#: Files whose presence says a folder holds a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class DraftModelError(ValueError):
    """A draft model cannot be used with this target; the message names both sides."""


def default_num_layers(target_layers: int) -> int:
    """The derived draft's depth: an eighth of the target's decoder layers, rounded up
    (4 of SmolLM2-135M's 30; a CPU-sized draft whose cost is mostly its output head)."""
    return max(1, math.ceil(target_layers / 8))


def derive_draft_model(target_model: Any, num_layers: int) -> Any:
    """A causal LM of the target's architecture with the target's embeddings, its first
    `num_layers` decoder layers, its final norm and its output head (weights copied, in
    the target's dtype, on its device, in eval mode).

    Works for transformers' decoder-only models whose decoder layers are the
    ``layers.<i>.`` entries of the state dict (Llama, Qwen2/3, Mistral, Gemma, ...); a
    per-layer ``layer_types`` list in the config is cut to the kept layers.
    """
    config = copy.deepcopy(target_model.config)
    text = text_config(config)
    total = int(text.num_hidden_layers)
    if type(num_layers) is not int or not 1 <= num_layers <= total:
        raise DraftModelError(f"num_layers {num_layers!r} is not an int in [1, {total}] "
                              f"(the target has {total} decoder layers)")
    text.num_hidden_layers = num_layers
    if isinstance(getattr(text, "layer_types", None), (list, tuple)):
        text.layer_types = list(text.layer_types)[:num_layers]
    source = target_model.state_dict()
    kept = {}
    for key, value in source.items():
        match = _LAYER_KEY.search(key)
        if match is None or int(match.group(1)) < num_layers:
            kept[key] = value
    param = next(target_model.parameters())
    draft = type(target_model)(config)
    missing, unexpected = draft.load_state_dict(kept, strict=False)
    # a tied output head appears under both names in one and possibly one in the other
    tied = set(getattr(draft, "_tied_weights_keys", None) or ()) | {"lm_head.weight"}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise DraftModelError(
            f"cannot derive a draft from {type(target_model).__name__}: weights missing "
            f"{missing[:5]}, unexpected {unexpected[:5]} (derive_draft_model needs a decoder-only "
            "model whose layers are 'layers.<i>.' in its state dict)")
    if getattr(text, "tie_word_embeddings", False):
        draft.tie_weights()
    return draft.to(device=param.device, dtype=param.dtype).eval()


def save_draft_model(model: Any, tokenizer: Any, folder: Path | str, target: Any) -> Path:
    """Write a draft to `folder`: model.safetensors + config.json (whose ``"target"``
    names the target it fits, as :func:`~pytest_specdec.models.weights.weights_fit`
    reads it), the tokenizer when given, and :data:`META_FILE` (the same target, the
    draft's depth). `target` is a TargetInfo or a Target."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fits = target_signature(target)
    model.config.target = fits
    model.save_pretrained(folder)  # safetensors: transformers 5 writes nothing else
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    text = text_config(model.config)
    meta = {"kind": "sps", "target": fits, "num_layers": int(text.num_hidden_layers),
            "derived_from": fits["name"]}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return folder


def check_vocab(draft_vocab: Mapping[str, int] | None, target_vocab: Mapping[str, int] | None,
                *, draft_width: int, target_width: int, draft: str = "draft") -> None:
    """Refuse a draft whose token ids mean other tokens than the target's.

    The logits widths must be equal (draft ids index the target's logits, and coupled
    sampling draws noise per id); when both vocabularies are known they must map the
    same tokens to the same ids. The error names both sizes, or the first id whose
    token differs."""
    if draft_width != target_width:
        raise DraftModelError(f"draft model {draft!r} has {draft_width} logits but the target "
                              f"has {target_width}: a draft must share the target's vocabulary")
    if draft_vocab is None or target_vocab is None:
        return
    if len(draft_vocab) != len(target_vocab):
        raise DraftModelError(f"draft model {draft!r}'s tokenizer has {len(draft_vocab)} tokens "
                              f"but the target's has {len(target_vocab)}: a draft must share the "
                              "target's tokenizer")
    if dict(draft_vocab) == dict(target_vocab):
        return
    by_id_draft = {i: t for t, i in draft_vocab.items()}
    by_id_target = {i: t for t, i in target_vocab.items()}
    for i in sorted(set(by_id_draft) | set(by_id_target)):
        if by_id_draft.get(i) != by_id_target.get(i):
            raise DraftModelError(
                f"draft model {draft!r}'s tokenizer differs from the target's at id {i}: "
                f"{by_id_draft.get(i)!r} in the draft, {by_id_target.get(i)!r} in the target "
                f"(both have {len(draft_vocab)} tokens): a draft must share the target's tokenizer")


def _load_tokenizer(spec: str | Path) -> Any:
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    if path.is_dir() and not any((path / name).exists() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(spec), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if path.is_dir():
            raise DraftModelError(f"draft model {str(spec)!r}: its tokenizer does not load: "
                                  f"{exc}") from exc
        log.warning("pytest-specdec: draft %s has no loadable tokenizer (%s); only its "
                    "logits width is checked against the target's", spec, exc)
        return None


def load_draft_model(spec: str | Path, info: Any) -> Any:
    """Load the draft causal LM at `spec` (a folder or a Hugging Face id; safetensors
    only, no remote code) onto ``info.device`` in ``info.dtype``, eval mode.

    `info` is the :class:`~pytest_specdec.protocol.drafter.TargetInfo` of the target; a draft
    whose logits width differs from ``info.vocab_size``, or whose tokenizer's vocabulary
    differs from ``info.vocab``, is refused (:func:`check_vocab`)."""
    from transformers import AutoModelForCausalLM

    text = str(spec)
    path = Path(text).expanduser()
    if text.startswith((".", "/", "~")) and not path.is_dir():
        raise DraftModelError(f"draft model folder {text!r} does not exist")
    source = str(path) if path.is_dir() else text
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=info.dtype,
                                                     use_safetensors=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise DraftModelError(f"could not load draft model {text!r} (a model folder or a "
                              f"Hugging Face id, safetensors weights): {exc}") from exc
    model = model.to(info.device).eval()
    tokenizer = _load_tokenizer(source)
    vocab = tokenizer.get_vocab() if tokenizer is not None else None
    check_vocab(vocab, getattr(info, "vocab", None),
                draft_width=int(model.get_output_embeddings().weight.shape[0]),
                target_width=int(info.vocab_size), draft=text)
    return model


# --- training: self-distillation of a derived draft ---------------------------------


class DraftLMTrainable:
    """A derived draft distilled towards the target (see :func:`trainable`).

    ``module`` holds what is optimised: the draft's decoder layers and final norm. Its
    embeddings and output head stay the target's (frozen copies), so the draft keeps
    the target's token geometry and a training step is cheap.

    The loss is KL(target || draft) of the next-token distributions at temperature 1,
    averaged over the positions of ``batch.loss_mask`` (those whose next token the
    target generated); the target's logits are ``batch.final_hidden @ head.T``.
    """

    kind = "sps"
    hidden_layers: tuple[int, ...] = ()

    def __init__(self, target: Target, draft: Any):
        self.target, self.draft = target, draft
        decoder = draft.get_decoder()
        if not hasattr(decoder, "layers") or not hasattr(decoder, "norm"):
            raise DraftModelError(f"{type(draft).__name__}: its decoder has no 'layers' and "
                                  "'norm' to train")
        for p in draft.parameters():
            p.requires_grad_(False)
        self.module = torch.nn.ModuleDict({"layers": decoder.layers, "norm": decoder.norm})
        for p in self.module.parameters():
            p.requires_grad_(True)
        self.draft.train()
        self.head = target.model.get_output_embeddings().weight.detach()

    @property
    def weights_module(self) -> torch.nn.Module:
        """What the drafter loads (the whole draft): training.json's weights digest is its."""
        return self.draft

    def loss(self, batch: DistillBatch) -> torch.Tensor:
        device = self.head.device
        mask = batch.loss_mask.to(device)
        if not bool(mask.any()):
            raise DraftModelError("the batch has no loss positions (no generated tokens)")
        out = self.draft.get_decoder()(input_ids=batch.input_ids.to(device),
                                       attention_mask=batch.attention_mask.to(device).long(),
                                       use_cache=False)
        head = self.head.float()
        draft_logp = torch.log_softmax(out.last_hidden_state[mask].float() @ head.T, dim=-1)
        target_logp = torch.log_softmax(batch.final_hidden.to(device)[mask].float() @ head.T,
                                        dim=-1)
        return torch.sum(target_logp.exp() * (target_logp - draft_logp), dim=-1).mean()

    def save(self, folder: Path) -> None:
        was_training = self.draft.training
        self.draft.eval()
        try:
            save_draft_model(self.draft, getattr(self.target, "tokenizer", None), folder,
                             self.target)
        finally:
            self.draft.train(was_training)


def trainable(target: Target, data: Any = None, *, num_layers: int | None = None,
              **options: Any) -> DraftLMTrainable:
    """The SpS draft to train for `target`: derived from it with `num_layers` decoder
    layers (default :func:`default_num_layers`), to be distilled on `data` (the loop
    draws the batches; nothing here reads them)."""
    if options:
        raise DraftModelError(f"unknown sps training option(s) {sorted(options)}; "
                              "accepted: num_layers")
    layers = default_num_layers(int(text_config(target.model.config).num_hidden_layers)) \
        if num_layers is None else num_layers
    with torch.inference_mode(False), torch.enable_grad():
        draft = derive_draft_model(target.model, layers)
    return DraftLMTrainable(target, draft)


def derived_note(folder: str | Path) -> str:
    """The report's line for a draft made by ``pytest-specdec train sps``: what it was
    derived from, and how long it was distilled."""
    try:
        meta = json.loads((Path(folder) / "specdec_draft.json").read_text(encoding="utf-8"))
        source = (f"derived from {meta['derived_from']} (its first {meta['num_layers']} of "
                  f"{meta['target']['num_layers']} layers, its embeddings and head)")
    except (OSError, ValueError, KeyError, TypeError):
        source = "a draft model"
    return f"{source}, {training_summary(folder)}"
