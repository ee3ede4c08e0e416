"""The qe (quantization error) loss of FDM (WACV 2025, Eq. 3): L1 between the dequantized map and the
encoder's continuous feature, which on generated cells is ``|F([z_q, m]) - (z - z_q)|``."""

from __future__ import annotations

import torch

__all__ = ["qe_loss"]


def qe_loss(z_dq: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L1 error between ``z_dq`` and ``z`` over the generated cells -> scalar.

    Args:
        z_dq: (B, C, h, w) FDM output ``z_in + F([z_in, m]) * m``, where ``z_in`` is ``z`` on known cells and
            ``z_q`` on generated ones.
        z: (B, C, h, w) continuous encoder feature (the target; no gradient flows into it).
        mask: (B, 1, h, w) latent-cell mask, 1 = generated; None = every cell generated. Known cells add 0
            (``z_dq == z`` there), but they count in the mean, as in the official code: the loss is the
            element mean of ``|(z_dq - z) * m|``.
    """
    if z_dq.shape != z.shape:
        raise ValueError(f"qe_loss needs z_dq and z of the same shape; got {tuple(z_dq.shape)} and {tuple(z.shape)}.")
    diff = (z_dq.float() - z.detach().float()).abs()
    if mask is not None:
        diff = diff * mask.to(diff.dtype)
    return diff.mean()
