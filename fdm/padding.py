"""Images of any size: padding to a multiple of the model's downsampling factor, and cropping the decoded image back.

The one place where fdm-vq pads (:meth:`fdm.Dequantizer.prepare`, used by ``encode`` and ``reconstruct`` and by
:func:`fdm.evaluation.compare`). Padding goes at the bottom and on the right only, so latent cell ``(i, j)`` covers
pixels ``[i f, (i + 1) f) x [j f, (j + 1) f)`` of the image as given; only the last row and column of cells also
cover padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fdm.errors import InputError

__all__ = ["crop", "pad_image", "pad_mask", "padded_size"]


def padded_size(size: int, factor: int) -> int:
    """The smallest multiple of ``factor`` that is at least ``size``."""
    return -(-size // factor) * factor


def pad_image(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Pad a (B, C, H, W) image at the bottom and right to the next multiples of ``factor``.

    Mode ``"reflect"`` (mirrored about the last row / column, which is not repeated), so the padding continues the
    image's content; a side not longer than the padding it needs (reflect needs fewer padded pixels than the side
    has, e.g. a 3-pixel side padded to 16) is padded with ``"replicate"`` (its last row / column repeated) instead.

    Returns:
        The padded image; ``x`` itself when H and W are multiples of ``factor`` already (a no-op, bit for bit).
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = padded_size(h, factor) - h, padded_size(w, factor) - w
    for widths, pad, side in (((0, pad_w, 0, 0), pad_w, w), ((0, 0, 0, pad_h), pad_h, h)):
        if pad:
            x = F.pad(x, widths, mode="reflect" if pad < side else "replicate")
    return x


def pad_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Pad a (B, 1, H, W) hole mask (1 = hole) like :func:`pad_image`, with 0: the padding is *known*.

    The padded pixels are image content the encoder sees, not a region to generate, so a latent cell is generated
    exactly when it holds a hole pixel of the image as given, and a cell made only of padding keeps its feature.

    Returns:
        The padded mask, of ``mask``'s dtype; ``mask`` itself when H and W are multiples of ``factor`` already.
    """
    h, w = mask.shape[-2:]
    size = (padded_size(h, factor), padded_size(w, factor))
    if size == (h, w):
        return mask
    out = mask.new_zeros(*mask.shape[:-2], *size)
    out[..., :h, :w] = mask
    return out


def crop(image: torch.Tensor, size: tuple[int, int] | torch.Size | None, factor: int) -> torch.Tensor:
    """Crop a decoded image (B, C, H', W') of a padded latent back to ``size`` (H, W), the size of the image given
    before padding (top-left corner kept); None keeps the whole image.

    Raises:
        InputError: ``size`` does not pad to (H', W') (H' must be :func:`padded_size` of H, W' that of W).
    """
    if size is None:
        return image
    height, width = (int(s) for s in size)
    full = tuple(image.shape[-2:])
    if height < 1 or width < 1 or (padded_size(height, factor), padded_size(width, factor)) != full:
        raise InputError(
            f"size {height}x{width} cannot be cropped from the decoded {full[0]}x{full[1]} image: expected a size "
            f"that pads to it with factor {factor} (height {full[0] - factor + 1} to {full[0]}, width "
            f"{full[1] - factor + 1} to {full[1]})."
        )
    return image if (height, width) == full else image[..., :height, :width]
