"""Image files and tensors: (B, 3, H, W) / (3, H, W) float tensors in [-1, 1] to and from RGB files.

Files are read with their full range: 8-bit images (RGB, grayscale, palette...) scale 0..255 to [-1, 1], 16-bit
grayscale PNGs (Pillow modes ``I;16`` / ``I``) scale 0..65535. A file that is missing or cannot be decoded raises
:class:`~fdm.errors.InputError` naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fdm.errors import InputError

__all__ = ["image_size", "open_image", "read_gray", "read_image", "save_image", "to_pil"]

#: Pillow modes of high-bit-depth single-channel images, read with 16-bit range (``I``: how some Pillow
#: versions open 16-bit grayscale PNGs).
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_HIGH_BIT_MAX = 65535.0


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] -> RGB PIL image (values clamped, rounded to 8 bits)."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).numpy()))


@contextmanager
def open_image(path: str | Path, what: str = "image") -> Iterator[Image.Image]:
    """Open and decode an image file (a context manager yielding the PIL image).

    Raises:
        InputError: the file does not exist, or cannot be read or decoded (names the file and ``what`` it is).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what.capitalize()} file not found: {path}" if not path.exists()
                         else f"{what.capitalize()} path {path} is not a file.")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"Cannot read {what} file {path}: {err} (not an image, truncated or corrupted?)") from err
    with img:
        yield img


def image_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """(H, W) of an image file. Raises :class:`~fdm.errors.InputError` as :func:`open_image` does."""
    with open_image(path, what) as img:
        return img.height, img.width


def _gray_levels(img: Image.Image) -> np.ndarray:
    """(H, W) float32 in [0, 1]: 16-bit modes over 0..65535, everything else as 8-bit grayscale."""
    if img.mode in HIGH_BIT_MODES:
        return np.clip(np.asarray(img, dtype=np.float32) / _HIGH_BIT_MAX, 0.0, 1.0)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def read_gray(path: str | Path, what: str = "image") -> np.ndarray:
    """An image file as (H, W) float32 gray levels in [0, 1] (16-bit files keep their full range).

    Raises:
        InputError: the file is missing or cannot be decoded.
    """
    with open_image(path, what) as img:
        return _gray_levels(img)


def read_image(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read an image file as a (1, 3, H, W) tensor in [-1, 1] (bicubic resize to ``size`` = (H, W) if given).

    16-bit grayscale files (Pillow modes ``I;16`` / ``I``) are read over their full 0..65535 range.

    Raises:
        InputError: the file does not exist or cannot be decoded.
    """
    with open_image(path) as img:
        if img.mode in HIGH_BIT_MODES:
            gray = Image.fromarray(_gray_levels(img))  # mode F
            if size is not None:
                gray = gray.resize((size[1], size[0]), Image.BICUBIC)
            levels = torch.from_numpy(np.asarray(gray, dtype=np.float32).copy()).clamp(0, 1)
            return (levels * 2 - 1)[None, None].expand(1, 3, -1, -1).contiguous()
        rgb = img.convert("RGB")
        if size is not None:
            rgb = rgb.resize((size[1], size[0]), Image.BICUBIC)
        array = np.asarray(rgb).copy()
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """Write a (3, H, W) tensor in [-1, 1] as an 8-bit PNG."""
    to_pil(image).save(path)
