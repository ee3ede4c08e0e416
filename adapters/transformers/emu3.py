"""transformers' ``Emu3VQVAE`` (the MoVQ-style video/image tokenizer of Emu3, BAAI 2024) in image mode, with FDM
(Park & Jung, WACV 2025).

An image is a clip of ``temporal_downsample_factor`` identical frames that the encoder folds into one latent frame;
the decoder unfolds one latent frame into that many frames, of which the first is the image (transformers'
``Emu3VQVAE.decode`` on (B, h, w) tokens). The decoder reads the quantized map twice: through ``post_quant_conv`` and
as the condition of its spatially normalised layers. FDM replaces it in both places (docs/transformers.md measures
the alternative).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fdm.adapters.transformers.base import TransformersVQAdapter
from fdm.correction_hooks import SpatialNormCorrection, install_spatial_norm_correction
from fdm.errors import InputError

__all__ = ["Emu3VQAdapter"]


def _one_frame(dim: int, what: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The (B, C, h, w) map of a quantized tensor holding one latent frame at ``dim``; a video is refused."""

    def as_map(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[dim] != 1:
            raise InputError(f"FDM corrects images: {what} must hold one latent frame (an image's (B, h, w) tokens); "
                             f"got shape {tuple(x.shape)}.")
        return x.select(dim, 0)

    return as_map


class Emu3VQAdapter(TransformersVQAdapter):
    """transformers' ``Emu3VQVAE`` (``Emu3ForConditionalGeneration``'s ``model.vqmodel``), image mode.

    - ``encode(x)``: the image repeated ``temporal_downsample_factor`` times (as ``Emu3VQVAE.encode`` does for
      (B, 3, H, W) input) -> ``quant_conv(encoder(...))``, its one latent frame: (B, ``embed_dim``, H/f, W/f),
      f = 2 ** (len(channel_multiplier) - 1) (8 for the released tokenizer).
    - ``quantize(z)``: the model's own nearest-code search; ``z_q = lookup(indices)`` (the code vectors).
    - ``lookup(indices)`` = ``embedding[indices]``, (B, h, w) -> (B, C, h, w).
    - ``decode(z, condition=None)`` = the first frame of ``decoder(post_quant_conv(z), condition)``, as
      ``Emu3VQVAE.decode`` after its lookup; ``condition`` (the spatial-norm input) defaults to ``z``: FDM's
      corrected map reaches both reads. Pass ``condition=z_q`` to correct the decoder input only.
    """

    class_name = "Emu3VQVAE"

    def codebook(self) -> torch.Tensor:
        return self.model.quantize.embedding.weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image in [-1, 1] -> (B, C, H/f, W/f) continuous feature (``quant_conv``'s output)."""
        frames = self.model.config.temporal_downsample_factor
        clip = x.to(self.model.dtype).unsqueeze(1).repeat(1, frames, 1, 1, 1)  # (B, T, 3, H, W)
        hidden = self.model.encoder(clip)  # (B, 1, C', h, w): T frames folded into one
        z = self.model.quant_conv(hidden.permute(0, 2, 1, 3, 4))  # (B, C, 1, h, w)
        return _one_frame(2, "the encoded image")(z)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.model.quantize(z.unsqueeze(1))[:, 0]  # (B, 1, C, h, w) -> (B, 1, h, w) -> (B, h, w)
        return self.lookup(indices), indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dim() != 3:
            raise InputError(f"indices must have shape (B, h, w); got {tuple(indices.shape)}.")
        return self.model.quantize.embedding(indices).permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)

    def decode(self, z: torch.Tensor, condition: torch.Tensor | None = None, **model_kwargs: Any) -> torch.Tensor:
        """(B, C, h, w) features -> (B, 3, f h, f w) image in [-1, 1], decoded as given.

        Args:
            z: what ``post_quant_conv`` reads.
            condition: what the spatially normalised layers read, (B, C, h, w); None: ``z``.
        """
        if model_kwargs:
            raise TypeError(f"Emu3VQVAE's decoder reads only condition=; got {sorted(model_kwargs)}.")
        if condition is not None and condition.shape != z.shape:
            raise InputError(f"condition must have the shape of z {tuple(z.shape)}; got {tuple(condition.shape)}.")
        quant = z.unsqueeze(2)  # (B, C, 1, h, w)
        cond = quant if condition is None else condition.unsqueeze(2)
        post = self.model.post_quant_conv(quant)  # (B, C', 1, h, w)
        frames = self.model.decoder(post.permute(0, 2, 1, 3, 4), cond.permute(0, 2, 1, 3, 4))  # (B * T, 3, H, W)
        return frames.reshape(z.shape[0], -1, *frames.shape[1:])[:, 0]  # (B, T, 3, H, W) -> the first frame

    def hook_module(self) -> nn.Module:
        return self.model.post_quant_conv

    def decoder_modules(self) -> dict[str, nn.Module]:
        return {"post_quant_conv": self.model.post_quant_conv, "decoder": self.model.decoder}

    def register_correction_hook(self, correct: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        """Correct ``post_quant_conv``'s input and the decoder's ``quant_states`` (one FDM run for both in
        ``Emu3VQVAE.decode``); a video (several latent frames) is refused while attached."""
        hooks = SpatialNormCorrection(correct, condition_index=1, condition_name="quant_states",
                                      input_map=_one_frame(2, "post_quant_conv's input"),
                                      condition_map=_one_frame(1, "the decoder's quant_states"))
        return install_spatial_norm_correction(self.model.post_quant_conv, self.model.decoder, hooks)
