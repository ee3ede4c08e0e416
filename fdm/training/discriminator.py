"""The patch discriminator of FDM's phase 3 (WACV 2025): EdgeConnect's PatchGAN layout (Nazeri et al. 2019)
with spectral normalisation (Miyato et al. 2018) on every convolution, returning logits."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["PatchDiscriminator"]


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: ``num_downsamplings`` stride-2 4x4 convolutions doubling the width from
    ``channels`` (LeakyReLU 0.2), one stride-1 4x4 convolution, and a 4x4 convolution to one logit per patch.

    Args:
        in_channels: image channels.
        channels: width of the first convolution (64 in the paper's discriminator).
        num_downsamplings: stride-2 convolutions (3: a 70x70 receptive field).

    Input: (B, in_channels, H, W) images in [-1, 1], H and W at least ``2 ** (num_downsamplings + 2)``.
    Output: (B, 1, H / 2^n - 2, W / 2^n - 2) logits (positive = real).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_downsamplings: int = 3):
        super().__init__()
        if channels < 1 or num_downsamplings < 1:
            raise ValueError(f"channels and num_downsamplings must be >= 1; got {channels}, {num_downsamplings}.")
        self.min_size = 2 ** (num_downsamplings + 2)
        widths = [in_channels] + [channels * 2**i for i in range(num_downsamplings + 1)]
        layers: list[nn.Module] = []
        for i in range(num_downsamplings + 1):
            stride = 2 if i < num_downsamplings else 1
            layers += [spectral_norm(nn.Conv2d(widths[i], widths[i + 1], 4, stride, 1, bias=False)),
                       nn.LeakyReLU(0.2)]
        layers.append(spectral_norm(nn.Conv2d(widths[-1], 1, 4, 1, 1, bias=False)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"PatchDiscriminator needs (B, C, H, W) images with H, W >= {self.min_size}; got {tuple(x.shape)}."
            )
        return self.net(x)  # (B, 1, h', w')
