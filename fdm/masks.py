"""Hole masks: pixel masks (B, 1, H, W) with 1 = hole (the diffusers / PConv-file convention), their
latent-cell version, mask files, and the random irregular masks used for FDM training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from fdm.errors import InputError
from fdm.images import read_gray
from fdm.validation import check_binary_mask

__all__ = ["CellMaskBank", "DEFAULT_HOLE_RATIO", "keep_known", "latent_mask", "load_mask", "pool_cells", "random_irregular_mask"]

DEFAULT_HOLE_RATIO = (0.2, 0.6)
"""Hole-area range of the official FDM training recipe (hyudsl/FDM configs, ``use_provided_mask_ratio``)."""


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Turn a binary pixel hole mask into a latent-cell mask: a cell is generated if its patch has any hole pixel.

    Args:
        mask: (B, 1, H, W) binary, 1 = hole; H and W multiples of ``factor``.
        factor: the model's downsampling factor.

    Returns:
        (B, 1, H / factor, W / factor) float mask, 1 = generated cell.

    Raises:
        InputError: a mask of another shape, or with values other than 0 and 1 (a device sync reads them; steps
            behind a checked entry point use :func:`pool_cells`).

    Example:
        >>> m = torch.zeros(1, 1, 32, 32); m[..., 3, 20] = 1
        >>> latent_mask(m, 16)[0, 0].tolist()
        [[0.0, 1.0], [0.0, 0.0]]
    """
    cells = pool_cells(mask, factor)
    check_binary_mask(mask)
    return cells


def pool_cells(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """:func:`latent_mask` of a mask whose values are 0 and 1 already (checked by the caller, or built so): the
    shape is checked, the values are not read."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor <= 0:
        raise InputError(f"factor must be a positive integer (the model's downsampling factor); got {factor!r}.")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"mask must have shape (B, 1, H, W); got {got}.")
    if mask.numel() == 0:
        raise InputError(f"mask is empty (shape {tuple(mask.shape)}); expected at least one image and one pixel.")
    h, w = mask.shape[-2:]
    if h % factor or w % factor:
        raise InputError(f"mask size {h}x{w} is not a multiple of the downsampling factor {factor}.")
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
    return F.max_pool2d(mask.to(dtype), kernel_size=factor, stride=factor)


def keep_known(z: torch.Tensor, z_q: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The FDM input map: known cells keep the encoder feature ``z``, generated cells get the code vectors ``z_q``.

    Args:
        z: (B, C, h, w) continuous encoder feature (only its known cells are used).
        z_q: (B, C, h, w) quantized / sampled code vectors.
        cells: (B, 1, h, w) latent-cell mask, 1 (True) = generated; broadcast over the channels.

    Returns:
        (B, C, h, w) ``where(cells, z_q, z)``.
    """
    return torch.where(cells.bool(), z_q, z)


def load_mask(path: str | Path, size: tuple[int, int] | None = None, *, white_is_hole: bool = True) -> torch.Tensor:
    """Read a mask image as a (1, 1, H, W) float tensor with 1 = hole.

    Args:
        path: image file; read as grayscale and thresholded at half its range (128 of 255; 32768 of 65535 for
            16-bit files).
        size: optional (H, W); the mask is resized with nearest neighbour when given.
        white_is_hole: True for the PConv / diffusers convention (white = hole, the default);
            False for files where white = known, such as PUT's own sample masks.

    Raises:
        InputError: the file is missing or cannot be decoded.
    """
    white_pixels = read_gray(path, what="mask") >= 0.5
    if size is not None:
        white_pixels = np.asarray(Image.fromarray(white_pixels).resize((size[1], size[0]), Image.NEAREST))
    white = torch.from_numpy(np.array(white_pixels, dtype=bool))
    hole = white if white_is_hole else ~white
    return hole.float()[None, None]


def random_irregular_mask(
    height: int,
    width: int,
    hole_ratio: tuple[float, float] = DEFAULT_HOLE_RATIO,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw a random free-form hole mask (brush strokes and boxes) whose hole area is within ``hole_ratio``.

    Strokes of random vertices, lengths and brush widths (scaled to the image size) are added until the hole
    area reaches a target drawn uniformly from ``hole_ratio``; the result is (1, H, W) float, 1 = hole.
    """
    lo, hi = hole_ratio
    if not 0.0 <= lo <= hi <= 1.0:
        raise InputError(f"hole_ratio must satisfy 0 <= low <= high <= 1; got {hole_ratio}.")

    def uniform(a: float, b: float) -> float:
        return a + (b - a) * float(torch.rand((), generator=generator))

    target = uniform(lo, hi)
    scale = min(height, width) / 256.0
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    area = 0.0
    for _ in range(200):
        if area >= target:
            break
        if float(torch.rand((), generator=generator)) < 0.2:
            bw, bh = uniform(0.1, 0.5) * width, uniform(0.1, 0.5) * height
            x0, y0 = uniform(0, width - bw), uniform(0, height - bh)
            draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=255)
        else:
            x, y = uniform(0, width), uniform(0, height)
            brush = max(1, int(uniform(10, 30) * scale))
            for _ in range(int(uniform(5, 11))):
                angle = uniform(0, 2 * math.pi)
                length = uniform(10, 100) * scale
                nx = min(max(x + length * math.cos(angle), 0), width - 1)
                ny = min(max(y + length * math.sin(angle), 0), height - 1)
                draw.line([(x, y), (nx, ny)], fill=255, width=brush)
                draw.ellipse([nx - brush / 2, ny - brush / 2, nx + brush / 2, ny + brush / 2], fill=255)
                x, y = nx, ny
        area = float(np.asarray(canvas).mean()) / 255.0
    hole = torch.from_numpy(np.asarray(canvas) >= 128).float()[None]
    if hi < 1.0 and hole.mean() > hi:  # a last stroke overshot: trim rows from the bottom
        rows = hole[0].mean(dim=1).cumsum(0) / height
        keep = int(torch.searchsorted(rows, torch.tensor(hi)))
        hole[:, keep:] = 0
    return hole


class CellMaskBank:
    """A fixed bank of random irregular hole masks, as latent-cell masks, for training steps that need many.

    ``count`` masks of ``(h * factor, w * factor)`` pixels are drawn once with :func:`random_irregular_mask`
    (mask ``k`` from a seed derived from ``(seed, k)``: banks of different seeds share no mask) and reduced to cells; :meth:`pick` returns one of them under one of the eight
    flips and rotations of the square (four flips for a non-square map), so a key selects among up to
    ``8 * count`` masks in microseconds instead of drawing one (milliseconds).

    Args:
        size: (h, w) of the latent map.
        factor: the model's downsampling factor.
        hole_ratio: hole-area range of the drawn masks.
        seed: seed of the bank.
        count: masks drawn.
    """

    def __init__(self, size: tuple[int, int], factor: int, hole_ratio: tuple[float, float], *, seed: int = 0,
                 count: int = 512):
        h, w = size
        holes = torch.stack([random_irregular_mask(h * factor, w * factor, hole_ratio,
                                                   generator=torch.Generator().manual_seed(_mask_seed(seed, k)))
                             for k in range(count)])  # (count, 1, H, W)
        self.cells = pool_cells(holes, factor)  # (count, 1, h, w), 1 = generated (binary by construction)
        self.variants = 8 if h == w else 4

    def pick(self, key: int) -> torch.Tensor:
        """The (1, h, w) cell mask that ``key`` (any non-negative integer) selects."""
        index, variant = divmod(key % (len(self.cells) * self.variants), self.variants)
        cells = self.cells[index]
        if variant & 1:
            cells = cells.flip(-1)
        if variant & 2:
            cells = cells.flip(-2)
        if variant & 4:
            cells = cells.transpose(-1, -2)
        return cells


def _mask_seed(seed: int, k: int) -> int:
    """A 32-bit seed for mask ``k`` of the bank of ``seed``."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
