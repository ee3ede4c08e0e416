"""Image files and tensors: (B, 3, H, W) / (3, H, W) float tensors in [-1, 1] to and from RGB files, and the one
grid writer (:func:`image_grid`, and :func:`save_grid` for a batch) behind the demo figures, the phase-3 validation
grids, ``fdm sample`` and the examples.

Files are read with their full range: 8-bit images (RGB, grayscale, palette...) scale 0..255 to [-1, 1], 16-bit
grayscale PNGs (Pillow modes ``I;16`` / ``I``) scale 0..65535. A file that is missing or cannot be decoded raises
:class:`~fdm.errors.InputError` naming it, and so does one of more pixels than :mod:`fdm.limits` allows
(``max_image_pixels``), before it is decoded.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fdm.errors import InputError
from fdm.limits import current as current_limits
from fdm.validation import check_image

__all__ = [
    "as_rgb8", "decode_image", "image_grid", "image_size", "open_image", "read_gray", "read_image", "save_grid",
    "save_image", "save_images", "to_pil",
]

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
    with _decoded(path, f"{what} file {path}") as img:
        yield img


@contextmanager
def decode_image(data: bytes, what: str = "image") -> Iterator[Image.Image]:
    """Decode an encoded image held in memory (the bytes of a PNG, JPEG... file; a context manager yielding the
    PIL image), with the same checks as :func:`open_image`, Pillow's decompression-bomb limit included.

    Raises:
        InputError: the bytes are not an image, or are truncated or corrupted (names ``what`` they are).
    """
    with _decoded(io.BytesIO(data), what) as img:
        yield img


@contextmanager
def _decoded(source: Path | io.BytesIO, label: str) -> Iterator[Image.Image]:
    try:
        img = Image.open(source)
    except Exception as err:  # anything a decoder raises on hostile bytes (a TIFF tag of the wrong type: TypeError)
        raise InputError(f"Cannot read {label}: {err} (not an image, truncated or corrupted?)") from err
    with img:  # closed also when decoding fails (a truncated file left its handle open)
        if img.width * img.height > (most := current_limits().max_image_pixels):
            raise InputError(f"Cannot read {label}: {img.width}x{img.height} pixels is more than the {most} an "
                             "image may have (fdm.limits).")
        try:
            img.load()
        except Exception as err:
            raise InputError(f"Cannot read {label}: {err} (not an image, truncated or corrupted?)") from err
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


def as_rgb8(img: Image.Image) -> Image.Image:
    """An 8-bit RGB version of a decoded image; 16-bit grayscale (``I;16`` / ``I``) is scaled from its full
    0..65535 range instead of being clipped to white."""
    if img.mode in HIGH_BIT_MODES:
        return Image.fromarray((_gray_levels(img) * 255).round().astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


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
        rgb = as_rgb8(img)
        if size is not None:
            rgb = rgb.resize((size[1], size[0]), Image.BICUBIC)
        array = np.asarray(rgb).copy()
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """Write a (3, H, W) tensor in [-1, 1] as an 8-bit PNG."""
    to_pil(image).save(path)


def save_images(images: torch.Tensor, folder: str | Path, prefix: str = "sample") -> list[Path]:
    """Write each of (N, 3, H, W) images in [-1, 1] as ``folder/{prefix}_{k:04d}.png``; returns the paths."""
    check_image(images, name="images")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}_{k:04d}.png" for k in range(images.shape[0])]
    for image, path in zip(images, paths):
        save_image(image, path)
    return paths


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write (N, 3, H, W) images in [-1, 1] to ``path`` as one PNG grid of :func:`image_grid`, ``nrow`` per row
    (default: about sqrt(N)); returns the path."""
    check_image(images, name="images")
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid([list(images[k:k + nrow]) for k in range(0, images.shape[0], nrow)]).save(path)
    return path


_PAD = 4  # pixels around and between tiles
_LINE = 16  # height of a text line
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


def image_grid(
    rows: Sequence[Sequence[Image.Image | torch.Tensor]],
    column_titles: Sequence[str] | None = None,
    *,
    title: str | None = None,
    caption: str | None = None,
    row_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Assemble tiles into one figure on a white background, optionally labelled.

    Args:
        rows: one sequence of tiles per row: PIL images or (3, H, W) tensors in [-1, 1]. A column is as wide as its
            widest tile, a row as high as its highest.
        column_titles: optional title per column, drawn above the first row.
        title: optional figure title (top line).
        caption: optional note under the grid (wrapped at the figure width).
        row_labels: optional text under each row (e.g. per-image metrics).

    Returns:
        The RGB figure; ``image_grid(...).save(path)`` writes it.

    Example:
        >>> x = torch.zeros(2, 3, 8, 8)  # two images, shown next to their copies
        >>> image_grid([[a, b] for a, b in zip(x, x)]).size
        (28, 28)
    """
    tiles = [[to_pil(t) if isinstance(t, torch.Tensor) else t for t in row] for row in rows]
    if not tiles or not all(tiles):
        raise InputError("image_grid needs at least one row and one tile per row.")
    title_font, label_font = _font(15), _font(12)
    columns = max(len(row) for row in tiles)
    widths = [max(row[i].width for row in tiles if i < len(row)) for i in range(columns)]
    grid_w = sum(widths) + _PAD * (columns + 1)
    caption_lines = _wrap(caption, label_font, grid_w - 2 * _PAD) if caption else []
    label_h = _LINE if row_labels else 0
    heights = [max(t.height for t in row) for row in tiles]
    top = (_LINE + 6 if title else 0) + (_LINE if column_titles else 0) or _PAD
    total_h = top + sum(h + label_h + _PAD for h in heights) + _LINE * len(caption_lines) + (_PAD if caption else 0)
    canvas = Image.new("RGB", (grid_w, total_h), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = 0
    if title:
        draw.text((_PAD, 3), title, fill=_TEXT, font=title_font)
        y += _LINE + 6
    if column_titles:
        x = _PAD
        for text, w in zip(column_titles, widths):
            draw.text((x + w / 2, y + _LINE / 2), text, fill=_TEXT, font=label_font, anchor="mm")
            x += w + _PAD
    y = top
    for r, (row, h) in enumerate(zip(tiles, heights)):
        x = _PAD
        for tile, w in zip(row, widths):
            canvas.paste(tile, (x, y))
            x += w + _PAD
        y += h
        if row_labels:
            draw.text((_PAD, y + 1), row_labels[r], fill=_TEXT, font=label_font)
            y += label_h
        y += _PAD
    for text in caption_lines:
        draw.text((_PAD, y), text, fill=_TEXT, font=label_font)
        y += _LINE
    return canvas


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split():
            trial = f"{current} {word}".strip()
            if font.getlength(trial) <= width or not current:
                current = trial
            else:
                lines.append(current)
                current = word
        lines.append(current)
    return lines
