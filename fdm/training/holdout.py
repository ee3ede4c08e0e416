"""Held-out images for phase 2: :func:`split_heldout` sets a part of the training images aside, and
:class:`HeldOutCheck` measures on them, as ``fdm eval`` does, whether the FDM being trained beats plain VQ
(feature error ratio ``||z - z_dq|| / ||z - z_q||`` and PSNR gain of the decoded images)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fdm.adapter import VQAdapter
from fdm.dequantizer import Dequantizer
from fdm.errors import InputError
from fdm.evaluation.comparison import measured_image
from fdm.evaluation.metrics import feature_error_ratio, psnr
from fdm.masks import random_irregular_mask
from fdm.module import FDM
from fdm.pipeline import Latents
from fdm.precision import autocast
from fdm.training.data import SeededViews
from fdm.training.sources.base import ImageSource, ImageSubset

__all__ = ["MAX_CHECK_VIEWS", "MAX_HELDOUT_IMAGES", "MIN_IMPROVEMENT", "HeldOutCheck", "HeldOutRecord", "HeldOutResult",
           "split_heldout"]

logger = logging.getLogger(__name__)

MAX_CHECK_VIEWS = 32
"""Most held-out views one check measures (spread over the held-out images)."""
MAX_HELDOUT_IMAGES = 256
"""Most images held out, whatever the fraction: a check measures a few dozen views, the rest is for training."""


def split_heldout(source: ImageSource, fraction: float, *, seed: int = 0) -> tuple[ImageSource, ImageSource | None]:
    """Split ``source`` into (training images, held-out images).

    ``round(fraction * len(source))`` images, at least one and at most :data:`MAX_HELDOUT_IMAGES`, are held out:
    drawn at random from ``seed``, or the first ones of a streaming source (read in order only). ``fraction`` 0 holds nothing out (None). With fewer
    than 2 images nothing can be held out: a warning is logged and None returned.

    Raises:
        InputError: ``fraction`` is not in [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"the held-out fraction must be in [0, 1); got {fraction}.")
    n = len(source)
    if fraction == 0.0:
        return source, None
    if n < 2:
        logger.warning("only %d image: nothing held out, so the FDM's gain on unseen images is not measured", n)
        return source, None
    count = min(n - 1, MAX_HELDOUT_IMAGES, max(1, round(fraction * n)))
    if source.random_access:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        held = order[:count]
    else:
        held = list(range(count))
    rest = sorted(set(range(n)) - set(held))
    return ImageSubset(source, rest, "training"), ImageSubset(source, held, "held-out")


@dataclass(frozen=True)
class HeldOutResult:
    """One held-out check (means over the views; the feature ratio per view, over its generated cells); the PSNRs
    are None for a check that did not decode."""

    feature_ratio: float
    views: int
    psnr_vq: float | None = None
    psnr_fdm: float | None = None

    @property
    def psnr_gain(self) -> float | None:
        """PSNR with FDM minus plain VQ's, in dB."""
        return None if self.psnr_fdm is None else self.psnr_fdm - self.psnr_vq

    @property
    def helps(self) -> bool:
        """Whether the FDM beats plain VQ: features closer to ``z`` (and a PSNR gain, when measured)."""
        return self.feature_ratio < 1.0 and (self.psnr_gain is None or self.psnr_gain > 0.0)

    def to_dict(self) -> dict[str, float | None]:
        """JSON-able numbers (``psnr_gain`` included)."""
        return asdict(self) | {"psnr_gain": self.psnr_gain}

    def describe(self) -> str:
        """One line: the ratio, and the PSNR without and with FDM when measured."""
        text = f"feature error ratio {self.feature_ratio:.3f}"
        if self.psnr_fdm is not None:
            text += f", PSNR {self.psnr_vq:.2f} -> {self.psnr_fdm:.2f} dB ({self.psnr_gain:+.2f})"
        return text


class HeldOutCheck:
    """Measure an FDM on fixed views of held-out images, as ``fdm eval`` does (:func:`fdm.evaluation.compare`).

    The views are encoded and quantized once, and plain VQ's images decoded once; a check then runs the FDM (the
    feature error ratio: cheap) and, when asked, decodes its features (the PSNR gain). Without ``hole_ratio``
    every cell is quantized (reconstruction); with it, each view gets a fixed random hole mask in that area range
    and only the hole cells are quantized and corrected (oracle inpainting), the setting the FDM is trained for.

    Args:
        model: the frozen base model, on the device the checks run on.
        adapter: its adapter.
        views: the held-out views; at most :data:`MAX_CHECK_VIEWS` of them, evenly spaced, are measured.
        hole_ratio: hole-area range of the check's masks, or None for reconstruction.
        seed: seed of the masks.
        batch_size: views per forward pass.
        precision: autocast precision of the models (see :mod:`fdm.precision`).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: VQAdapter,
        views: SeededViews,
        *,
        hole_ratio: tuple[float, float] | None,
        seed: int = 0,
        batch_size: int = 16,
        precision: str = "fp32",
    ):
        if not isinstance(views, SeededViews) or len(views) == 0:
            raise InputError(f"held-out views must be a non-empty fdm.training.SeededViews; got {type(views).__name__} "
                             f"of {len(views) if isinstance(views, SeededViews) else '?'} views.")
        count = min(len(views), MAX_CHECK_VIEWS)
        picked = sorted({round(i * len(views) / count) for i in range(count)})
        if views.random_access:
            x = torch.stack([views[i] for i in picked])  # (N, 3, S, S)
        else:  # a stream: read up to the last picked view only
            wanted = set(picked)
            x = torch.stack([view for index, view in views.iter_views(0, picked[-1] + 1) if index in wanted])
        masks = None
        if hole_ratio is not None:
            generator = torch.Generator().manual_seed(seed)
            masks = torch.stack([random_irregular_mask(*x.shape[-2:], hole_ratio, generator=generator)
                                 for _ in range(len(x))])  # (N, 1, S, S), 1 = hole
        self.model = model
        self.adapter = adapter
        self.precision = precision
        self.images = len({i // views.views_per_image for i in picked})  # images the picked views show
        self.setting = "reconstruction" if masks is None else "oracle inpainting"
        self.views = len(x)
        identity = FDM(adapter.channels, mask_channels=0 if masks is None else 1, hidden_channels=2, num_blocks=0,
                       base_model_fingerprint=adapter.fingerprint())  # the Dequantizer's pipeline, without FDM
        self._dequantizer = Dequantizer(model, identity.to(adapter.device), adapter=adapter, check_fingerprint=False)
        self._batches: list[tuple[torch.Tensor, Latents, torch.Tensor | None]] = []  # (x, latents, psnr of plain VQ)
        with torch.no_grad(), autocast(adapter.device, precision):
            for start in range(0, len(x), batch_size):
                xb = x[start:start + batch_size].to(adapter.device)
                mb = None if masks is None else masks[start:start + batch_size].to(adapter.device)
                self._batches.append((xb, self._dequantizer.latents(xb, mb), None))

    def describe(self) -> str:
        """What is measured, e.g. ``"held-out (26 photos, 32 views, reconstruction)"``."""
        return f"held-out ({self.images} photos, {self.views} views, {self.setting})"

    @torch.no_grad()
    def measure(self, fdm_module: FDM, *, decode: bool = False) -> HeldOutResult:
        """The check's numbers for ``fdm_module``'s current weights (its train/eval mode is restored): the feature
        error ratio, and with ``decode`` the PSNR of plain VQ and with FDM."""
        was_training = fdm_module.training
        fdm_module.eval()
        ratios, psnr_vq, psnr_fdm = [], [], []
        try:
            for i, (x, lat, vq_psnr) in enumerate(self._batches):
                z_in = lat.z_in
                with autocast(x.device, self.precision):
                    z_dq = fdm_module(z_in, lat.cells, check_binary=False)
                    fdm_image = measured_image(self._dequantizer, lat, z_dq) if decode else None
                    if decode and vq_psnr is None:  # plain VQ's images: decoded once
                        vq_psnr = psnr(x, measured_image(self._dequantizer, lat, z_in))
                        self._batches[i] = (x, lat, vq_psnr)
                ratios += [float(feature_error_ratio(*(t[j:j + 1].float() for t in (lat.z, z_in, z_dq)),
                                                     None if lat.cells is None else lat.cells[j:j + 1]))
                           for j in range(len(x))]
                if decode:
                    psnr_vq += vq_psnr.tolist()
                    psnr_fdm += psnr(x, fdm_image).tolist()
        finally:
            fdm_module.train(was_training)
        return HeldOutResult(feature_ratio=_mean(ratios), views=self.views, psnr_vq=_mean(psnr_vq),
                             psnr_fdm=_mean(psnr_fdm))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


MIN_IMPROVEMENT = 1e-3
"""Decrease of the held-out feature error ratio that counts as progress (early stopping)."""


class HeldOutRecord:
    """The held-out checks of one run: every check's numbers, the best weights so far, when to stop early.

    Args:
        patience: stop when the last ``patience`` checks did not beat the earlier ones by :data:`MIN_IMPROVEMENT`
            (None: never).

    ``checks`` (one dict per check: ``step``, ``progress`` and :class:`HeldOutResult`'s numbers) and ``best``
    (``{"check": index, "weights": state dict}``) are plain data, saved in training checkpoints as they are.
    """

    def __init__(self, patience: int | None):
        self.patience = patience
        self.checks: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None

    def add(self, module: nn.Module, result: HeldOutResult, step: int, progress: float) -> bool:
        """Record a check of ``module``'s current weights (kept when they are the best so far); returns whether
        to stop early (never at the end of the run, ``progress`` 1)."""
        self.checks.append({"step": step, "progress": round(progress, 4), **result.to_dict()})
        ratios = [c["feature_ratio"] for c in self.checks]
        if self.best is None or result.feature_ratio < ratios[self.best["check"]]:
            weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
            self.best = {"check": len(self.checks) - 1, "weights": weights}
        n = self.patience
        if n is None or len(ratios) <= n or progress >= 1.0:
            return False
        return min(ratios[-n:]) > min(ratios[:-n]) - MIN_IMPROVEMENT

    def keep(self, module: nn.Module, *, best: bool) -> dict[str, Any]:
        """Load the best check's weights into ``module`` when ``best`` and they are not the last; returns the
        kept check."""
        kept = self.checks[self.best["check"]] if best else self.checks[-1]
        if kept is not self.checks[-1]:
            module.load_state_dict(self.best["weights"])
        return kept
