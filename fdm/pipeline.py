"""FDM's latent pipeline, written once: an image batch and its hole mask -> the continuous features, their nearest
codes, the latent-cell mask, FDM's input and what the decoder reads besides features.

With a hole mask this is the paper's oracle inpainting: generated (hole) cells get the nearest codes of the
*whole* image's features (what a perfect sampler would draw), known cells keep the continuous features that the
model keeps for an inpainting (:meth:`~fdm.VQAdapter.encode_known`: PUT encodes the masked image, other models the
whole image). FDM's target on the generated cells is the whole image's ``z``.

Used by :meth:`fdm.Dequantizer.reconstruct` (through :meth:`~fdm.Dequantizer.latents`), :func:`fdm.evaluation.compare`
(``fdm eval``, ``fdm demo``), the held-out checks of ``fdm train``, the phase-3 trainer and the phase-2 feature
cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fdm.adapter import VQAdapter
from fdm.masks import keep_known, pool_cells
from fdm.precision import full_precision

__all__ = ["Latents", "encode_latents", "quantize"]


@dataclass
class Latents:
    """One batch on its way through the model.

    Attributes:
        size: (H, W) of the images before padding (decoded images are cropped back to it).
        z: (B, C, h, w) continuous features of the whole images: FDM's target on generated cells.
        z_q: (B, C, h, w) nearest codes of ``z`` on every cell.
        indices: (B, h, w) their indices in the codebook.
        cells: (B, 1, h, w) latent-cell mask in ``z``'s dtype, 1 = generated, or None (every cell generated).
        known: (B, C, h, w) the continuous features an inpainting keeps on known cells, or None without holes.
        guide: extra keyword arguments of the adapter's decode (PUT: the known pixels).
    """

    size: tuple[int, int]
    z: torch.Tensor
    z_q: torch.Tensor
    indices: torch.Tensor
    cells: torch.Tensor | None
    known: torch.Tensor | None
    guide: dict[str, Any]

    @property
    def z_in(self) -> torch.Tensor:
        """FDM's input, the quantized map a sampler would give: ``z_q`` on generated cells, ``known`` on known
        ones."""
        return self.z_q if self.cells is None else keep_known(self.known, self.z_q, self.cells)

    @property
    def continuous(self) -> torch.Tensor:
        """The map no feature correction can beat: ``z`` on generated cells, ``known`` on known ones."""
        return self.z if self.cells is None else keep_known(self.known, self.z, self.cells)


def quantize(adapter: VQAdapter, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z`` (B, C, h, w) -> (``z_q`` (B, C, h, w), indices (B, h, w)), searched in the model's dtype with autocast
    off, also inside an autocast region (half-precision distances pick other codes)."""
    with full_precision(z.device):
        return adapter.quantize(z.to(adapter.dtype))


def encode_latents(adapter: VQAdapter, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                   size: tuple[int, int] | None = None) -> Latents:
    """Encode and quantize ``x`` (B, 3, H, W) with hole mask ``mask`` (B, 1, H, W), 1 = hole, or None.

    ``x`` and ``mask`` are taken as checked, sides multiples of the factor (:meth:`fdm.Dequantizer.prepare` checks
    and pads them once); ``size`` is the images' size before padding (default: ``x``'s).
    """
    z = adapter.encode(x)
    z_q, indices = quantize(adapter, z)
    cells = known = None
    if mask is not None:
        cells = pool_cells(mask, adapter.factor).to(z.dtype)
        known = adapter.encode_known(x, mask, z)
    return Latents(size=tuple(size or x.shape[-2:]), z=z, z_q=z_q, indices=indices, cells=cells, known=known,
                   guide=adapter.decode_guide(x, mask))
