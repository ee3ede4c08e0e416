"""The :class:`~fdm.VQAdapter` for PUT (CVPR 2022) models: :class:`PUT` or a bare :class:`PVQVAE`.

PUT encodes the *masked* image (``encodes_masked_input``): known cells take their continuous features
from it, and its decoder is guided by the known pixels, which :meth:`PUTAdapter.decode` needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fdm.adapter import VQAdapter, register_adapter
from fdm.errors import InputError

from .model import PUT
from .pvqvae import PVQVAE

__all__ = ["PUTAdapter"]


@register_adapter
class PUTAdapter(VQAdapter):
    """Adapter for :class:`PUT` / :class:`PVQVAE`.

    ``quantize`` uses the codebook half for fully known patches (the codes the UQ-Transformer samples and
    the FDM authors' phase-2 target). ``decode`` takes the guide image as ``image=``; without it, the
    image most recently passed to :meth:`encode` with the same size is used (so
    ``Dequantizer.reconstruct(x, mask)`` works), and without a mask every pixel counts as a hole.
    """

    encodes_masked_input = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.codec: PVQVAE = model.codec if isinstance(model, PUT) else model
        self._last_image: torch.Tensor | None = None

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

    def encode(self, x: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._last_image = x
        return self.codec.encode(x, pixel_mask)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codec.quantize.quantize(z)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codec.quantize.lookup(indices)

    def decode(self, z: torch.Tensor, pixel_mask: torch.Tensor | None = None, *, image: torch.Tensor | None = None,
               **model_kwargs: Any) -> torch.Tensor:
        """Decode ``z`` (B, C, h, w), guided by the known pixels of ``image`` (B, 3, H, W) where
        ``pixel_mask`` (B, 1, H, W) is 0."""
        if model_kwargs:
            raise InputError(f"PUT's decoder takes image= only; got {sorted(model_kwargs)}.")
        if pixel_mask is not None and image is None:
            last = self._last_image
            p = self.factor
            if last is None or last.shape[-2:] != (z.shape[-2] * p, z.shape[-1] * p) or last.shape[0] not in (
                    1, z.shape[0]):
                raise InputError("PUT's decoder needs the image whose known pixels guide it: pass image=... "
                                 "(Dequantizer.decode(z, mask, image=x)).")
            image = last
        return self.codec.decode(z, image, pixel_mask)

    def hook_module(self) -> nn.Module:
        return self.codec.post_quant_conv

    def decoder_modules(self) -> dict[str, nn.Module]:
        return {"post_quant_conv": self.codec.post_quant_conv, "decoder": self.codec.decoder}
