"""A PUT model (Liu et al., CVPR 2022): the P-VQVAE codec and, for inpainting, the UQ-Transformer sampler."""

from __future__ import annotations

from torch import nn

from fdm.adapters.put.pvqvae import PVQVAE
from fdm.adapters.put.transformer import UQTransformer

__all__ = ["PUT"]


class PUT(nn.Module):
    """P-VQVAE (``codec``) plus an optional UQ-Transformer (``transformer``).

    :func:`fdm.adapters.put.load_model` returns one; :func:`fdm.adapters.put.inpaint` samples with it, and
    ``fdm.Dequantizer(put_model, fdm_module)`` wraps it (the adapter works on ``codec``).
    """

    def __init__(self, codec: PVQVAE, transformer: UQTransformer | None = None):
        super().__init__()
        self.codec = codec
        self.transformer = transformer
        if transformer is not None:
            if transformer.emb_proj.in_features != codec.embed_dim:
                raise ValueError(f"The UQ-Transformer reads {transformer.emb_proj.in_features}-channel features but "
                                 f"the P-VQVAE makes {codec.embed_dim}-channel ones: they are not a pair.")
            if transformer.num_codes != codec.quantize.known_codes:
                raise ValueError(f"The UQ-Transformer predicts {transformer.num_codes} codes but the P-VQVAE has "
                                 f"{codec.quantize.known_codes} codes for known patches: they are not a pair.")
