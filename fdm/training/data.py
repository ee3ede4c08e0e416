"""Training views for FDM phase 2: a fixed, seeded set of random crops per image, so that the frozen model's
features of every view can be computed once and cached (FDM, WACV 2025, sec. 3.3; crops as in the official
hyudsl/FDM data pipeline: resize the shorter side, random crop, horizontal flip).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fdm.errors import InputError
from fdm.images import as_rgb8, open_image
from fdm.validation import check_finite, check_image

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderViews", "TensorViews", "list_images"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
"""File name endings (case-insensitive) read as training images."""


def list_images(root: str | Path) -> list[Path]:
    """The image files under ``root`` (recursively), sorted by relative path.

    Raises:
        InputError: ``root`` is not a folder, or holds no file ending in one of :data:`IMAGE_EXTENSIONS`.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"Training data folder not found: {root} (expected a folder of images).")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(
            f"No training images in {root}: expected files ending in {', '.join(IMAGE_EXTENSIONS)}."
        )
    return files


class ImageFolderViews(Dataset):
    """``views_per_image`` fixed random crops of every image in a folder, as (3, S, S) tensors in [-1, 1].

    View ``i`` shows image ``i // views_per_image``. Its parameters are drawn once from ``seed``: the shorter
    image side is resized to ``crop_size * s`` with ``s`` uniform in ``scale_range`` (a down-scale for large
    photos; images smaller than the crop are up-scaled), a ``crop_size`` square is cropped at a random
    position, and it is flipped horizontally with probability 1/2 when ``flip`` is set. The same seed gives
    the same views in every run, which is what lets :class:`~fdm.training.FeatureCache` cache their features.

    Args:
        root: folder of images (searched recursively; see :data:`IMAGE_EXTENSIONS`).
        crop_size: side ``S`` of the square views; a multiple of the model's downsampling factor.
        views_per_image: number of different views of each image.
        seed: seed of the view parameters.
        scale_range: range of the shorter side after resizing, in units of ``crop_size`` (>= 1).
        flip: allow horizontal flips.

    Example:
        >>> views = ImageFolderViews("photos/train", crop_size=256, views_per_image=4)  # doctest: +SKIP
        >>> views[0].shape                                                                # doctest: +SKIP
        torch.Size([3, 256, 256])
    """

    def __init__(
        self,
        root: str | Path,
        crop_size: int = 256,
        views_per_image: int = 1,
        *,
        seed: int = 0,
        scale_range: tuple[float, float] = (1.0, 1.125),
        flip: bool = True,
    ):
        if crop_size < 1 or views_per_image < 1:
            raise InputError(f"crop_size and views_per_image must be >= 1; got {crop_size} and {views_per_image}.")
        lo, hi = scale_range
        if not 1.0 <= lo <= hi:
            raise InputError(f"scale_range must satisfy 1 <= low <= high; got {scale_range}.")
        self.root = Path(root)
        self.files = list_images(self.root)
        self.crop_size = crop_size
        self.views_per_image = views_per_image
        self.seed = seed
        self.scale_range = (float(lo), float(hi))
        self.flip = flip
        generator = torch.Generator().manual_seed(seed)
        # one row per view: (scale, top, left, flip), each uniform in [0, 1)
        self._params = torch.rand(len(self), 4, generator=generator, dtype=torch.float64).numpy()
        logger.info("%d training views of %d images in %s (crop %d)", len(self), len(self.files), root, crop_size)

    def __len__(self) -> int:
        return len(self.files) * self.views_per_image

    def __getitem__(self, index: int) -> torch.Tensor:
        """View ``index`` as a (3, crop_size, crop_size) float tensor in [-1, 1]."""
        if not 0 <= index < len(self):
            raise IndexError(f"view index {index} out of range for {len(self)} views")
        path = self.files[index // self.views_per_image]
        with open_image(path, "training image") as img:
            img = as_rgb8(img)
        u_scale, u_top, u_left, u_flip = self._params[index]
        lo, hi = self.scale_range
        short = max(self.crop_size, round(self.crop_size * (lo + (hi - lo) * u_scale)))
        w, h = img.size
        new_w, new_h = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top = int(u_top * (new_h - self.crop_size + 1))
        left = int(u_left * (new_w - self.crop_size + 1))
        img = img.crop((left, top, left + self.crop_size, top + self.crop_size))
        if self.flip and u_flip < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(img, dtype=np.float32)  # (S, S, 3) in 0..255
        return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)  # (3, S, S) in [-1, 1]

    def fingerprint(self) -> str:
        """Id of this exact set of views (files with their sizes and times, crop parameters, seed)."""
        files = [(str(p.relative_to(self.root)), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files]
        spec = {
            "files": files,
            "crop_size": self.crop_size,
            "views_per_image": self.views_per_image,
            "seed": self.seed,
            "scale_range": self.scale_range,
            "flip": self.flip,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class TensorViews(Dataset):
    """Training views given as a tensor: ``images`` (N, 3, S, S) in [-1, 1], one view per image.

    Raises:
        InputError: ``images`` has the wrong shape or dtype, or holds NaN / Inf.
    """

    def __init__(self, images: torch.Tensor):
        check_image(images, name="training images")
        check_finite(images, name="training images")
        self.images = images.detach().cpu()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def fingerprint(self) -> str:
        """Id of the tensor's values and shape."""
        data = self.images.to(torch.float32).contiguous().numpy().tobytes()
        digest = hashlib.sha256(data + str(tuple(self.images.shape)).encode()).hexdigest()
        return digest[:16]
