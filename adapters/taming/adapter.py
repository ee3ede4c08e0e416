"""Adapters for taming-transformers models (Esser et al., CVPR 2021): VQModel, GumbelVQ, Net2NetTransformer.

FDM works in the space of ``post_quant_conv``'s input, where taming's VQModel defines ``z - z_q``:
``z = quant_conv(encoder(x))`` and ``decode(z) = decoder(post_quant_conv(z))``. Models are matched by
class name and module prefix ``taming.``, so objects from the ``taming-transformers-rom1504`` package and
from a git clone both work, and taming is never imported here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fdm.adapter import VQAdapter
from fdm.errors import InputError

__all__ = ["GumbelVQAdapter", "Net2NetTransformerAdapter", "VQModelAdapter", "first_stage_adapter"]


def _taming_class_names(obj: object) -> set[str]:
    """Names of the classes in ``type(obj)``'s MRO that come from a ``taming`` module."""
    return {cls.__name__ for cls in type(obj).__mro__ if cls.__module__.split(".")[0] == "taming"}


def _is_gumbel(model: nn.Module) -> bool:
    return "GumbelVQ" in _taming_class_names(model) or type(getattr(model, "quantize", None)).__name__ == "GumbelQuantize"


class VQModelAdapter(VQAdapter):
    """taming's ``VQModel`` (and subclasses such as ``VQSegmentationModel``) with a ``VectorQuantizer2``.

    ``encode`` returns ``quant_conv(encoder(x))``; ``quantize`` takes the indices from the model's own
    quantizer (reshaped to (B, h, w) whether or not ``sane_index_shape`` is set; remapped indices are
    kept in the model's index space) and returns the code vectors of those indices, so ``z_q`` is
    exactly a codebook entry (taming's straight-through ``z + (z_q - z)`` would differ by rounding).
    """

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return "VQModel" in _taming_class_names(model) and not _is_gumbel(model)

    @property
    def factor(self) -> int:
        return 2 ** (self.model.encoder.num_resolutions - 1)

    @property
    def channels(self) -> int:
        return self.model.post_quant_conv.in_channels

    def codebook(self) -> torch.Tensor:
        return self.model.quantize.embedding.weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) input -> (B, C, H/f, W/f) ``quant_conv(encoder(x))``."""
        return self.model.quant_conv(self.model.encoder(x))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = z.shape
        _, _, (_, _, indices) = self.model.quantize(z)
        indices = indices.reshape(b, h, w)  # (B, h, w)
        return self.lookup(indices), indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dim() != 3:
            raise InputError(f"indices must have shape (B, h, w); got {tuple(indices.shape)}.")
        b, h, w = indices.shape
        flat = indices.reshape(-1).clone()  # taming's unmap_to_all writes into its argument
        return self.model.quantize.get_codebook_entry(flat, (b, h, w, self.channels))  # (B, C, h, w)

    def decode(self, z: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        """``model.decode(z)`` = ``decoder(post_quant_conv(z))``, already in [-1, 1] for image models."""
        if model_kwargs:
            raise TypeError(f"taming's decoder takes no extra inputs; got {sorted(model_kwargs)}.")
        return self.model.decode(z)

    def hook_module(self) -> nn.Module:
        return self.model.post_quant_conv

    def decoder_modules(self) -> dict[str, nn.Module]:
        return {"post_quant_conv": self.model.post_quant_conv, "decoder": self.model.decoder}


class GumbelVQAdapter(VQModelAdapter):
    """taming's ``GumbelVQ``: logits over the codebook, ``z_q`` = the chosen code vector.

    The encoder output ``h = quant_conv(encoder(x))`` is a logit input (``logits = quantize.proj(h)``),
    not a point in the code space, so ``z - z_q`` is undefined as such. The ideal continuous feature is
    defined as the **expected code vector under the model's code distribution at temperature 1**::

        p = softmax(quantize.proj(quant_conv(encoder(x))), dim=channels)   # (B, N, h, w)
        z = sum_n p_n * quantize.embed.weight[n]                           # (B, C, h, w)

    Temperature 1 is the temperature of a loaded model's quantizer (``temp_init``), whose samples the
    released transformers were trained on. ``quantize(z)`` returns the code nearest to ``z`` (L2); for a
    confident model (peaked ``p``) that is the most probable code. taming's own ``GumbelQuantize`` adds
    Gumbel noise even in eval mode, so it is not used for the deterministic assignment here.
    """

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return "VQModel" in _taming_class_names(model) and _is_gumbel(model)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if getattr(model.quantize, "remap", None) is not None:
            raise NotImplementedError(
                "GumbelVQ models with a remapped codebook (quantize.remap) are not supported by the FDM adapter."
            )

    def codebook(self) -> torch.Tensor:
        return self.model.quantize.embed.weight

    def code_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, N, h, w) code probabilities ``softmax(proj(quant_conv(encoder(x))))``."""
        h = self.model.quant_conv(self.model.encoder(x))  # (B, z_channels, h, w)
        return F.softmax(self.model.quantize.proj(h), dim=1)  # (B, N, h, w)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, C, h, w) expected code vector (see the class docstring)."""
        probs = self.code_probabilities(x)
        return torch.einsum("bnhw,nc->bchw", probs, self.codebook())

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
        codebook = self.codebook()
        distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t()
                     + codebook.pow(2).sum(1)[None])  # (B*h*w, N)
        indices = distances.argmin(dim=1).reshape(b, h, w)  # (B, h, w)
        return self.lookup(indices), indices


def first_stage_adapter(model: nn.Module) -> VQModelAdapter:
    """The adapter of a taming first-stage (or cond-stage) VQ model: VQModel or GumbelVQ."""
    if GumbelVQAdapter.matches(model):
        return GumbelVQAdapter(model)
    if VQModelAdapter.matches(model):
        return VQModelAdapter(model)
    raise TypeError(
        f"Expected a taming VQModel or GumbelVQ; got {type(model).__module__}.{type(model).__name__}."
    )


class Net2NetTransformerAdapter(VQAdapter):
    """taming's ``Net2NetTransformer``: FDM hooks its ``first_stage_model`` (VQModel or GumbelVQ).

    Everything is delegated to the first stage's adapter, so an FDM trained for a VQGAN serves every
    transformer built on it (same codebook fingerprint), and ``decode_to_img`` is corrected when attached.
    """

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return "Net2NetTransformer" in _taming_class_names(model)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.first_stage = first_stage_adapter(model.first_stage_model)

    @property
    def factor(self) -> int:
        return self.first_stage.factor

    @property
    def channels(self) -> int:
        return self.first_stage.channels

    def codebook(self) -> torch.Tensor:
        return self.first_stage.codebook()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.first_stage.encode(x)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first_stage.quantize(z)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.first_stage.lookup(indices)

    def decode(self, z: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        return self.first_stage.decode(z, **model_kwargs)

    def hook_module(self) -> nn.Module:
        return self.first_stage.hook_module()

    def decoder_modules(self) -> dict[str, nn.Module]:
        return self.first_stage.decoder_modules()
