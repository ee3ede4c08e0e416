"""Perceptual (feature L1) and style (Gram-matrix L1) losses on VGG19 activations (Johnson et al. 2016;
Gatys et al. 2016), with the layers EdgeConnect and the official FDM code (WACV 2025) use.

The functions take the feature dictionaries of a backbone such as
:class:`fdm.training.backbones.VGG19Features` (layer name -> (B, C, h, w)), so one backbone pass can feed both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fdm.precision import full_precision

__all__ = ["PERCEPTUAL_LAYERS", "STYLE_LAYERS", "gram_matrix", "perceptual_loss", "style_loss"]

PERCEPTUAL_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
"""VGG19 activations compared by the perceptual loss (each with weight 1)."""

STYLE_LAYERS = ("relu2_2", "relu3_4", "relu4_4", "relu5_2")
"""VGG19 activations whose Gram matrices the style loss compares."""


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix normalised by the feature size: ``F F^T / (C h w)``.

    Args:
        features: (B, C, h, w) activations.

    Returns:
        (B, C, C) float32 Gram matrices, also under autocast.
    """
    if features.dim() != 4:
        raise ValueError(f"gram_matrix needs (B, C, h, w) features; got {tuple(features.shape)}.")
    b, c, h, w = features.shape
    f = features.float().reshape(b, c, h * w)  # (B, C, hw)
    with full_precision(f.device):  # under autocast the product would run (and overflow in fp16) in half precision
        return f @ f.transpose(1, 2) / (c * h * w)  # (B, C, C)


def _check_layers(feats: Mapping[str, torch.Tensor], layers: Sequence[str]) -> None:
    missing = [name for name in layers if name not in feats]
    if missing:
        raise KeyError(f"The backbone features lack layers {missing}; they have {sorted(feats)}.")


def perceptual_loss(
    feats_x: Mapping[str, torch.Tensor],
    feats_y: Mapping[str, torch.Tensor],
    layers: Sequence[str] = PERCEPTUAL_LAYERS,
) -> torch.Tensor:
    """Sum over ``layers`` of the mean absolute difference of the activations -> scalar.

    Args:
        feats_x: backbone features of the reconstruction.
        feats_y: backbone features of the target (no gradient flows into them).
        layers: layer names to compare.
    """
    _check_layers(feats_x, layers)
    _check_layers(feats_y, layers)
    return sum((feats_x[k].float() - feats_y[k].detach().float()).abs().mean() for k in layers)


def style_loss(
    feats_x: Mapping[str, torch.Tensor],
    feats_y: Mapping[str, torch.Tensor],
    layers: Sequence[str] = STYLE_LAYERS,
) -> torch.Tensor:
    """Sum over ``layers`` of the mean absolute difference of the Gram matrices -> scalar.

    In phase 3 both images are multiplied by the hole mask before the backbone (style on the hole region).
    """
    _check_layers(feats_x, layers)
    _check_layers(feats_y, layers)
    return sum((gram_matrix(feats_x[k]) - gram_matrix(feats_y[k].detach())).abs().mean() for k in layers)
