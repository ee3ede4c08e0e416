"""Image files and tensors: (B, 3, H, W) / (3, H, W) float tensors in [-1, 1] to and from 8-bit RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fdm.errors import InputError

__all__ = ["read_image", "save_image", "to_pil"]


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> RGB PIL image (values clamped, rounded to 8 bits)."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).numpy()))


def read_image(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image file as a (1, 3, H, W) tensor in [-1, 1] (bicubic resize to ``size`` = (H, W) if given).

    Raises:
        InputError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Image file not found: {path}")
    with Image.open(path) as img:
        img = img.convert("RGB")
        if size is not None:
            img = img.resize((size[1], size[0]), Image.BICUBIC)
        array = np.asarray(img).copy()
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """Write a (3, H, W) tensor in [-1, 1] as an 8-bit PNG."""
    to_pil(image).save(path)
