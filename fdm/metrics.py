"""Image and feature metrics: PSNR, SSIM (Wang et al. 2004, Gaussian window) and the feature error
ratio ``||z - z_dq|| / ||z - z_q||`` that FDM is trained to lower (the paper's Table 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["feature_error_ratio", "psnr", "ssim"]


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) images in [-1, 1] (compared on the [0, 1] scale) -> (B,)."""
    mse = (_to_unit(x) - _to_unit(y)).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of (B, 3, H, W) images in [-1, 1] (on the [0, 1] scale, mean over channels) -> (B,)."""
    a, b = _to_unit(x), _to_unit(y)
    c = a.shape[1]
    win = _gaussian_window(min(window, a.shape[-1], a.shape[-2]), sigma, c, a.device)
    blur = lambda t: F.conv2d(t, win, groups=c)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1)


def feature_error_ratio(
    z: torch.Tensor, z_q: torch.Tensor, z_dq: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``||z - z_dq|| / ||z - z_q||`` over the generated cells (all cells when ``mask`` is None) -> scalar.

    Below 1 means FDM moved the quantized features towards the continuous ones.
    """
    m = torch.ones_like(z[:, :1]) if mask is None else mask.to(z.dtype)
    return ((z - z_dq) * m).norm() / ((z - z_q) * m).norm().clamp_min(1e-12)
