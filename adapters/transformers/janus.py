"""transformers' ``JanusVQVAE``, the LlamaGen-style VQ-16 image tokenizer of Janus and Janus-Pro (DeepSeek, 2024-25),
with FDM (Park & Jung, WACV 2025).

Janus's tokenizer was trained with an l2-normalised codebook (``codebook_l2_norm=True`` in DeepSeek's release): its
quantizer normalises both the feature and the code vectors, and its decoder reads normalised code vectors
(``JanusVQVAEVectorQuantizer.get_codebook_entry``). FDM therefore works in that space: ``z`` is the normalised
``quant_conv`` output, ``z_q`` the normalised code, and the correction is added before ``post_quant_conv``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fdm.adapters.transformers.base import TransformersVQAdapter
from fdm.errors import InputError

__all__ = ["JanusVQAdapter"]

#: Rows of the (cells x codes) distance matrix computed at once by :meth:`JanusVQAdapter.quantize` (16384 codes:
#: 4096 rows are 256 MiB in float32).
_ROWS_PER_CHUNK = 4096


class JanusVQAdapter(TransformersVQAdapter):
    """transformers' ``JanusVQVAE`` (image tokenizer of ``JanusForConditionalGeneration``, ``model.model.vqmodel``).

    - ``encode(x)`` = ``normalize(quant_conv(encoder(x)))`` over channels: (B, 3, H, W) in [-1, 1] ->
      (B, ``embed_dim``, H/f, W/f), f = 2 ** (len(channel_multiplier) - 1) (16 for the released tokenizer).
    - ``quantize(z)``: the nearest normalised code (for a normalised ``z``: the largest cosine, as in DeepSeek's
      release); ``z_q = lookup(indices)``, exactly the code vectors the decoder reads.
    - ``lookup(indices)`` = ``normalize(embedding[indices])``: what ``get_codebook_entry`` computes, for any grid
      (transformers' ``decode`` takes (B, num_patches ** 2) tokens of one fixed square grid only).
    - ``decode(z)`` = ``decoder(post_quant_conv(z))``, as ``JanusVQVAE.decode`` after its lookup.

    transformers' own ``JanusVQVAE.encode`` searches the *unnormalised* feature against the *unnormalised* codebook;
    it picks the same codes as this adapter when every code vector has the same norm, other codes otherwise (see
    docs/transformers.md). Decoding the same indices is identical either way.
    """

    class_name = "JanusVQVAE"

    def codebook(self) -> torch.Tensor:
        """(N, C) code vectors as the decoder reads them (l2-normalised)."""
        return F.normalize(self.model.quantize.embedding.weight, p=2, dim=-1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image in [-1, 1] -> (B, C, H/f, W/f) normalised ``quant_conv(encoder(x))``."""
        z = self.model.quant_conv(self.model.encoder(x))  # (B, C, h, w)
        return F.normalize(z, p=2, dim=1)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
        codes = self.codebook()  # (N, C)
        squared = codes.pow(2).sum(1)  # (N,)
        indices = torch.cat([
            (rows.pow(2).sum(1, keepdim=True) + squared - 2 * rows @ codes.T).argmin(1)  # (rows, N) -> (rows,)
            for rows in flat.split(_ROWS_PER_CHUNK)
        ]).reshape(b, h, w)
        return self.lookup(indices), indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dim() != 3:
            raise InputError(f"indices must have shape (B, h, w); got {tuple(indices.shape)}. JanusVQVAE.decode's "
                             "(B, h*w) tokens: indices.reshape(B, h, w).")
        codes = F.normalize(self.model.quantize.embedding(indices), p=2, dim=-1)  # (B, h, w, C)
        return codes.permute(0, 3, 1, 2).contiguous()

    def decode(self, z: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        """(B, C, h, w) features -> (B, 3, 16 h, 16 w) image in [-1, 1] (released factor), decoded as given."""
        if model_kwargs:
            raise TypeError(f"JanusVQVAE's decoder takes no extra inputs; got {sorted(model_kwargs)}.")
        return self.model.decoder(self.model.post_quant_conv(z))

    def hook_module(self) -> nn.Module:
        return self.model.post_quant_conv

    def decoder_modules(self) -> dict[str, nn.Module]:
        return {"post_quant_conv": self.model.post_quant_conv, "decoder": self.model.decoder}
