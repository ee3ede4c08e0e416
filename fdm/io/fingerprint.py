"""Fingerprints: which codebook (and channel count) an FDM belongs to, and short ids of JSON-able descriptions
(training data, feature caches)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

__all__ = ["codebook_fingerprint", "json_digest"]


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """A short, stable id of a codebook: ``"n{N}-c{C}-{sha256 prefix}"`` over its float32 values.

    Args:
        codebook: (N, C) code vectors, on any device and dtype.

    Example:
        >>> codebook_fingerprint(torch.zeros(4, 2))[:6]
        'n4-c2-'
    """
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape (N, C); got {tuple(codebook.shape)}.")
    data = codebook.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    return f"n{codebook.shape[0]}-c{codebook.shape[1]}-{digest}"


def json_digest(data: Any) -> str:
    """16 hex digits of the sha256 of ``data`` written as sorted-key JSON: the same id for equal descriptions."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
