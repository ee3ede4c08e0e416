"""Fingerprints of base VQ models: which codebook (and channel count) an FDM belongs to."""

from __future__ import annotations

import hashlib

import torch

__all__ = ["codebook_fingerprint"]


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
