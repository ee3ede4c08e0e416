"""Side-by-side VQ reconstruction without and with FDM (Park & Jung, WACV 2025) for one batch: the images, the
features and the metrics (PSNR, SSIM, feature error ratio ``||z - z_dq|| / ||z - z_q||``) of `fdm demo` / `fdm eval`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdm.dequantizer import Dequantizer
from fdm.masks import latent_mask
from fdm.metrics import feature_error_ratio, psnr, ssim

__all__ = ["Comparison", "compare"]


@dataclass
class Comparison:
    """One batch reconstructed without and with FDM.

    Attributes:
        x: (B, 3, H, W) input images in [-1, 1].
        mask: (B, 1, H, W) pixel hole mask (1 = hole) or None (every cell quantized).
        vq: (B, 3, H, W) decoded from the quantized map (known cells continuous when ``mask`` is given).
        fdm: (B, 3, H, W) decoded from the FDM-corrected map.
        psnr_vq, psnr_fdm, ssim_vq, ssim_fdm: (B,) per-image metrics against ``x``.
        psnr_z: (B,) PSNR of decoding the continuous features ``z`` themselves: the bound that no feature
            correction can pass (FDM's PSNR gain is at most ``psnr_z - psnr_vq``, up to the decoder's non-linearity).
        feature_ratio: (B,) ``||z - z_dq|| / ||z - z_q||`` over the generated cells of each image.
    """

    x: torch.Tensor
    mask: torch.Tensor | None
    vq: torch.Tensor
    fdm: torch.Tensor
    psnr_vq: torch.Tensor
    psnr_fdm: torch.Tensor
    ssim_vq: torch.Tensor
    ssim_fdm: torch.Tensor
    psnr_z: torch.Tensor
    feature_ratio: torch.Tensor


@torch.no_grad()
def compare(dequantizer: Dequantizer, x: torch.Tensor, mask: torch.Tensor | None = None) -> Comparison:
    """Reconstruct ``x`` without and with FDM from one encoding.

    Without ``mask`` every latent cell is quantized (plain VQ reconstruction, FDM mask all ones). With a hole
    mask, known cells keep their continuous features and hole cells get their nearest codes (an oracle stand-in
    for a sampler, as :meth:`fdm.Dequantizer.reconstruct`), and FDM corrects the hole cells only.

    Args:
        dequantizer: the base model + FDM.
        x: (B, 3, H, W) images in [-1, 1], H and W multiples of the model's factor.
        mask: optional (B, 1, H, W) hole mask, 1 = hole.
    """
    z = dequantizer.encode(x, mask)  # (B, C, h, w)
    z_q, _ = dequantizer.quantize(z)
    cells = None
    if mask is not None:
        cells = latent_mask(mask, dequantizer.factor).to(z.dtype)  # (B, 1, h, w), 1 = generated
        z_q = torch.where(cells.bool(), z_q, z)
    z_dq = dequantizer.correct(z_q, cells)
    adapter = dequantizer.adapter
    vq = adapter.decode(z_q, pixel_mask=mask).clamp(-1, 1)
    fdm = adapter.decode(z_dq, pixel_mask=mask).clamp(-1, 1)
    continuous = adapter.decode(z, pixel_mask=mask).clamp(-1, 1)
    ratio = torch.stack([
        feature_error_ratio(z[i:i + 1], z_q[i:i + 1], z_dq[i:i + 1], None if cells is None else cells[i:i + 1])
        for i in range(x.shape[0])
    ])
    return Comparison(x=x, mask=mask, vq=vq, fdm=fdm, psnr_vq=psnr(x, vq), psnr_fdm=psnr(x, fdm),
                      ssim_vq=ssim(x, vq), ssim_fdm=ssim(x, fdm), psnr_z=psnr(x, continuous), feature_ratio=ratio)
