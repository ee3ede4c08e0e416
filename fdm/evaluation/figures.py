"""Tiles of the `fdm demo` figures (PIL only): error maps, masked inputs and zoomed regions; the figures themselves
are assembled by :func:`fdm.images.image_grid`."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from fdm.images import to_pil

__all__ = ["CHANGE_MAP_FULL", "ERROR_MAP_WHITE", "error_change_map", "error_map", "masked_input", "outline",
           "worst_region", "zoom"]

#: Error (mean |difference| on the [0, 1] scale) drawn white by :func:`error_map`.
ERROR_MAP_WHITE = 0.25
#: Change of that error drawn in full colour by :func:`error_change_map`.
CHANGE_MAP_FULL = 0.05


def _pixel_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean_c |x - y|`` of two (3, H, W) images in [-1, 1], on the [0, 1] scale -> (H, W)."""
    return (x - y).abs().mean(dim=0) / 2


def _rgb_tile(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> Image.Image:
    """An RGB image from three (H, W) channels in [0, 1] (clamped)."""
    rgb = torch.stack([r, g, b], dim=-1).clamp(0, 1).cpu().numpy()
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def error_map(x: torch.Tensor, y: torch.Tensor, *, vmax: float = ERROR_MAP_WHITE) -> Image.Image:
    """Per-pixel error ``mean_c |x - y|`` of two (3, H, W) images in [-1, 1] on the [0, 1] scale, as a heat map
    (black = 0, through red and yellow to white at ``vmax`` and above)."""
    err = (_pixel_error(x, y) / vmax).clamp(0, 1)  # (H, W) in [0, 1]
    return _rgb_tile(3 * err, 3 * err - 1, 3 * err - 2)


def error_change_map(x: torch.Tensor, before: torch.Tensor, after: torch.Tensor, *,
                     vmax: float = CHANGE_MAP_FULL) -> Image.Image:
    """Where ``after`` is closer to ``x`` than ``before`` (green) or farther (magenta), for (3, H, W) images in
    [-1, 1]: the change of ``mean_c |x - y|`` on the [0, 1] scale, black = unchanged, full colour at ``vmax``."""
    gain = (_pixel_error(x, before) - _pixel_error(x, after)) / vmax  # (H, W), > 0: closer
    return _rgb_tile(-gain, gain, -gain)


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
