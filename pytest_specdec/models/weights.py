"""The digest of a model drafter's weights: which weights a benchmark record used."""

from __future__ import annotations

import hashlib

import torch


def state_digest(module: torch.nn.Module) -> str:
    """First 16 hex digits of sha256 over every tensor of ``module.state_dict()``, in
    sorted key order: each key, dtype, shape and the raw bytes. Equal weights, equal
    digest, whatever file or layout they were loaded from."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
