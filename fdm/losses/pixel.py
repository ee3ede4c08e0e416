"""Pixel-space reconstruction losses of FDM's phase 3: L1 and the image-gradient loss (the gradient loss
of PUT, CVPR 2022, that the official FDM code uses: L1 between absolute finite differences)."""

from __future__ import annotations

import torch

__all__ = ["gradient_loss", "image_gradients", "l1_loss"]


def l1_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of two tensors of the same shape -> scalar."""
    if x.shape != y.shape:
        raise ValueError(f"l1_loss needs tensors of the same shape; got {tuple(x.shape)} and {tuple(y.shape)}.")
    return (x - y).abs().mean()


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute forward differences of (B, C, H, W) images.

    Returns:
        ``(dx, dy)``: ``|x[..., :, 1:] - x[..., :, :-1]|`` (B, C, H, W - 1) and
        ``|x[..., 1:, :] - x[..., :-1, :]|`` (B, C, H - 1, W).
    """
    if x.dim() != 4 or x.shape[-1] < 2 or x.shape[-2] < 2:
        raise ValueError(f"image_gradients needs (B, C, H, W) with H, W >= 2; got {tuple(x.shape)}.")
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs()
    return dx, dy


def gradient_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Image-gradient loss: ``(mean |dx(x) - dx(y)| + mean |dy(x) - dy(y)|) / 2`` -> scalar.

    Args:
        x: (B, C, H, W) reconstruction.
        y: (B, C, H, W) target (no gradient flows into it).

    Example:
        A horizontal ramp of slope ``a`` against a flat image gives ``|a| / 2``.
    """
    if x.shape != y.shape:
        raise ValueError(f"gradient_loss needs images of the same shape; got {tuple(x.shape)} and {tuple(y.shape)}.")
    x_dx, x_dy = image_gradients(x)
    y_dx, y_dy = image_gradients(y.detach())
    return ((x_dx - y_dx).abs().mean() + (x_dy - y_dy).abs().mean()) / 2
