"""Labelled comparison figures for `fdm demo` (PIL only): image grids with column titles, error maps and captions."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fdm.images import to_pil

__all__ = ["error_map", "grid_figure", "masked_input", "outline", "worst_region", "zoom"]

_PAD = 4
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def error_map(x: torch.Tensor, y: torch.Tensor, *, vmax: float = 0.25) -> Image.Image:
    """Per-pixel error ``mean_c |x - y|`` of two (3, H, W) images in [-1, 1] on the [0, 1] scale, as a heat map
    (black = 0, through red and yellow to white at ``vmax`` and above)."""
    err = ((x - y).abs().mean(dim=0) / 2 / vmax).clamp(0, 1).cpu().numpy()  # (H, W) in [0, 1]
    rgb = np.stack([np.clip(3 * err, 0, 1), np.clip(3 * err - 1, 0, 1), np.clip(3 * err - 2, 0, 1)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def masked_input(x: torch.Tensor, mask: torch.Tensor) -> Image.Image:
    """(3, H, W) image with the holes of ``mask`` (1, H, W), 1 = hole, painted grey."""
    return to_pil(torch.where(mask.bool(), torch.full_like(x, 0.0), x))


def worst_region(x: torch.Tensor, y: torch.Tensor, side: int) -> tuple[int, int]:
    """Top-left corner (top, left) of the ``side`` x ``side`` window of (3, H, W) images where ``y`` differs most from
    ``x`` (mean absolute error): where quantization lost most, the place to zoom in."""
    err = (x - y).abs().mean(dim=0, keepdim=True)[None]  # (1, 1, H, W)
    window = torch.nn.functional.avg_pool2d(err, side, stride=max(1, side // 4))  # (1, 1, h', w')
    index = int(window.flatten().argmax())
    stride = max(1, side // 4)
    return (index // window.shape[-1]) * stride, (index % window.shape[-1]) * stride


def zoom(image: torch.Tensor | Image.Image, corner: tuple[int, int], side: int, size: int) -> Image.Image:
    """The ``side`` x ``side`` region at ``corner`` (top, left) of a (3, H, W) image in [-1, 1] or a PIL image,
    enlarged to ``size`` x ``size`` with nearest-neighbour sampling (pixels stay visible)."""
    tile = to_pil(image) if isinstance(image, torch.Tensor) else image
    top, left = corner
    return tile.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.NEAREST)


def outline(image: Image.Image, corner: tuple[int, int], side: int) -> Image.Image:
    """A copy of ``image`` with the zoomed region drawn as a yellow square."""
    out = image.copy()
    top, left = corner
    ImageDraw.Draw(out).rectangle((left - 1, top - 1, left + side, top + side), outline=(255, 220, 0), width=2)
    return out


def grid_figure(
    rows: list[list[Image.Image]],
    column_titles: list[str],
    *,
    title: str,
    caption: str | None = None,
    row_labels: list[str] | None = None,
) -> Image.Image:
    """Assemble equally sized tiles per row into one labelled figure.

    Args:
        rows: one list of tiles per row; tiles of a row share a height, columns share a width per row.
        column_titles: one title per column, drawn above the first row.
        title: figure title (top line).
        caption: optional note under the grid (wrapped at the figure width).
        row_labels: optional text under each row (e.g. per-image metrics).
    """
    title_font, label_font = _font(15), _font(12)
    widths = [max(row[i].width for row in rows) for i in range(len(column_titles))]
    grid_w = sum(widths) + _PAD * (len(widths) + 1)
    line = 16
    caption_lines = _wrap(caption, label_font, grid_w - 2 * _PAD) if caption else []
    label_h = line if row_labels else 0
    heights = [max(t.height for t in row) for row in rows]
    total_h = (line + 6) + line + sum(h + label_h + _PAD for h in heights) + _PAD + line * len(caption_lines) + _PAD
    canvas = Image.new("RGB", (grid_w, total_h), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((_PAD, 3), title, fill=_TEXT, font=title_font)
    y = line + 6
    x = _PAD
    for text, w in zip(column_titles, widths):
        draw.text((x + w / 2, y + line / 2), text, fill=_TEXT, font=label_font, anchor="mm")
        x += w + _PAD
    y += line
    for r, (row, h) in enumerate(zip(rows, heights)):
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
        y += line
    return canvas


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
