"""A plain encoder / quantizer / decoder model, its adapter and its family declaration: exercises the whole core
without any third-party model package (the layout mirrors taming's VQModel: quant_conv, codebook,
post_quant_conv). Importing this module registers the family (``fdm.registry.register_family``)."""

from __future__ import annotations

import torch
from torch import nn

import fdm
from fdm.registry import ModelFamily, register_family


class ToyVQ(nn.Module):
    """Downsampling factor 4, ``channels``-dim codebook of ``n_codes`` entries, images in [-1, 1]."""

    def __init__(self, channels: int = 8, n_codes: int = 16, width: int = 16):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(width, channels, 4, stride=2, padding=1)
        )
        self.quant_conv = nn.Conv2d(channels, channels, 1)
        self.codebook = nn.Embedding(n_codes, channels)
        self.post_quant_conv = nn.Conv2d(channels, channels, 1)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(channels, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(width, 3, 4, stride=2, padding=1), nn.Tanh(),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        indices = torch.cdist(flat, self.codebook.weight).argmin(dim=1).view(b, h, w)
        return self.lookup(indices), indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codebook(indices).permute(0, 3, 1, 2)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))


class ToyVQAdapter(fdm.VQAdapter):
    @classmethod
    def matches(cls, model):
        return isinstance(model, ToyVQ)

    @property
    def factor(self):
        return 4

    @property
    def channels(self):
        return self.model.codebook.embedding_dim

    def codebook(self):
        return self.model.codebook.weight

    def encode(self, x):
        return self.model.encode(x)

    def quantize(self, z):
        return self.model.quantize(z)

    def lookup(self, indices):
        return self.model.lookup(indices)

    def decode(self, z):
        return self.model.decode(z)

    def hook_module(self):
        return self.model.post_quant_conv

    def decoder_modules(self):
        return {"post_quant_conv": self.model.post_quant_conv, "decoder": self.model.decoder}


FAMILY = ModelFamily(name="toy", adapters=(ToyVQAdapter,))
register_family(__name__)
