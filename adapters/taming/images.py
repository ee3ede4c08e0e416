"""Writing sampled images: (N, 3, H, W) tensors in [-1, 1] to PNG files and PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from fdm.images import to_pil
from fdm.validation import check_image

__all__ = ["image_grid", "save_grid", "save_images"]


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Image.Image:
    """Tile (N, 3, H, W) images in [-1, 1] row by row, ``nrow`` per row (default: about sqrt(N))."""
    check_image(images, name="images")
    n, _, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = Image.new("RGB", (nrow * w + (nrow + 1) * padding, rows * h + (rows + 1) * padding), "white")
    for k in range(n):
        r, c = divmod(k, nrow)
        grid.paste(to_pil(images[k]), (padding + c * (w + padding), padding + r * (h + padding)))
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write :func:`image_grid` of ``images`` to ``path`` (PNG); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow).save(path)
    return path


def save_images(images: torch.Tensor, folder: str | Path, prefix: str = "sample") -> list[Path]:
    """Write each of (N, 3, H, W) images as ``folder/{prefix}_{k:04d}.png``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}_{k:04d}.png" for k in range(images.shape[0])]
    for image, path in zip(images, paths):
        to_pil(image).save(path)
    return paths
