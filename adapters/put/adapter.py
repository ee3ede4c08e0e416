"""The :class:`~fdm.VQAdapter` for PUT (CVPR 2022) models: :class:`PUT` or a bare :class:`PVQVAE`.

PUT encodes the *masked* image (:meth:`PUTAdapter.encode_known`): known cells take their continuous features
from it, and its decoder is guided by the known pixels, passed explicitly to :meth:`PUTAdapter.decode`
(``image=``, ``pixel_mask=``; :meth:`PUTAdapter.decode_guide` builds them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fdm.adapter import VQAdapter
from fdm.adapters.put.model import PUT
from fdm.adapters.put.pvqvae import PVQVAE

__all__ = ["PUTAdapter"]


class PUTAdapter(VQAdapter):
    """Adapter for :class:`PUT` / :class:`PVQVAE`.

    ``quantize`` uses the codebook half for fully known patches (the codes the UQ-Transformer samples and
    the FDM authors' phase-2 target). ``decode`` is guided by the known pixels of ``image=`` where
    ``pixel_mask=`` is 0, both given explicitly (nothing is remembered between calls); without them every
    pixel counts as a hole (a pure decode of the features).
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.codec: PVQVAE = model.codec if isinstance(model, PUT) else model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, (PUT, PVQVAE))

    @property
    def factor(self) -> int:
        return self.codec.patch_size

    @property
    def channels(self) -> int:
        return self.codec.embed_dim

    def codebook(self) -> torch.Tensor:
        return self.codec.quantize.embedding

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(x)

    def encode_known(self, x: torch.Tensor, mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Features of the masked image (hole pixels = -1), as PUT encodes it for inpainting; ``mask`` (B, 1, H, W),
        1 = hole, is checked by the caller (the Dequantizer's entry points)."""
        return self.codec.encode(x, mask)

    def decode_guide(self, x: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
        """``{"image": x, "pixel_mask": mask}``: the decoder's guide (none without a mask)."""
        return {} if mask is None else {"image": x, "pixel_mask": mask}

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codec.quantize.quantize(z)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codec.quantize.lookup(indices)

    def decode(self, z: torch.Tensor, *, image: torch.Tensor | None = None,
               pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``z`` (B, C, h, w), guided by the known pixels of ``image`` (B, 3, H, W) where ``pixel_mask``
        (B, 1, H, W, 1 = hole) is 0; without both, every pixel is a hole (no guide). Shapes are checked here, the
        mask's values by the caller (the Dequantizer's entry points)."""
        return self.codec.decode(z, image, pixel_mask)

    def hook_module(self) -> nn.Module:
        return self.codec.post_quant_conv

    def decoder_modules(self) -> dict[str, nn.Module]:
        return {"post_quant_conv": self.codec.post_quant_conv, "decoder": self.codec.decoder}
