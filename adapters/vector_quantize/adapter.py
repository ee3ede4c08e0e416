"""The fdm adapter of :class:`~fdm.adapters.vector_quantize.VQAutoencoder` (vector-quantize-pytorch's
``VectorQuantize`` / ``ResidualVQ`` between your encoder and decoder), for FDM (Park & Jung, WACV 2025).

FDM works in the space of the quantizer's input and output maps (B, C, h, w): ``z`` is what the quantizer reads,
``z_q`` what it returns (a ``ResidualVQ``: the sum of its levels' codes, so ``z - z_q`` is the residual left after
the last level; with a ``codebook_dim`` projection, ``project_out`` of the codes). The correction is applied at
the input of ``post_quant`` (an identity when the model has none), where the decoder path starts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fdm.adapter import VQAdapter
from fdm.adapters.vector_quantize.model import VQAutoencoder
from fdm.errors import ConfigError

__all__ = ["VectorQuantizeAdapter"]


class VectorQuantizeAdapter(VQAdapter):
    """A :class:`VQAutoencoder`. Indices are the library's: (B, h, w) for a ``VectorQuantize``, (B, h, w, L) for
    a ``ResidualVQ`` of L > 1 levels (:attr:`code_levels`; one level: (B, h, w)).

    Raises:
        ConfigError: a codebook that was never initialised (``kmeans_init=True`` before any training step: the
            library would initialise it from the first batch it quantizes, here FDM's data).
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        fresh = [i for i, level in enumerate(model.levels) if not bool(level._codebook.initted)]
        if fresh:
            raise ConfigError(f"the codebook of quantizer level(s) {fresh} was never initialised (kmeans_init=True "
                              "and no training step yet); train the VQ model before training or applying an FDM.")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, VQAutoencoder)

    @property
    def factor(self) -> int:
        return self.model.factor

    @property
    def channels(self) -> int:
        return self.model.channels

    @property
    def code_levels(self) -> int:
        return len(self.model.levels)

    @property
    def _squeezed(self) -> bool:
        """A one-level ``ResidualVQ``: the library's (B, h, w, 1) indices are (B, h, w) here."""
        return self.model.kind == "ResidualVQ" and self.code_levels == 1

    def codebook(self) -> torch.Tensor:
        """(N, C) code vectors in ``z``'s space: every level's codes, one level after the other, through
        ``project_out``."""
        with torch.no_grad():
            return self.model.quantizer.project_out(torch.cat([level.codebook for level in self.model.levels]))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantizer's own forward (its nearest codes, exactly)."""
        z_q, indices, _ = self.model.quantize(z)
        return z_q, indices[..., 0] if self._squeezed else indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.model.lookup(indices.unsqueeze(-1) if self._squeezed else indices)

    def decode(self, z: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        if model_kwargs:
            raise TypeError(f"a VQAutoencoder's decoder takes no extra inputs; got {sorted(model_kwargs)}.")
        return self.model.decode(z)

    def hook_module(self) -> nn.Module:
        return self.model.post_quant

    def decoder_modules(self) -> dict[str, nn.Module]:
        return {"post_quant": self.model.post_quant, "decoder": self.model.decoder}
