"""The adapter interface: how the :class:`~fdm.Dequantizer` and the trainers reach one model family's
encoder, quantizer and decoder (:func:`fdm.registry.find_adapter` picks the adapter of a model by its type).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fdm.io.fingerprint import codebook_fingerprint

__all__ = ["VQAdapter"]


class VQAdapter(abc.ABC):
    """Base class of adapters: what every model family provides. A subclass that misses one of the abstract
    methods cannot be instantiated (``TypeError`` at construction).

    Conventions: images are (B, 3, H, W) in [-1, 1]; hole masks (B, 1, H, W) with 1 = hole; feature maps are
    (B, C, h, w) in the space where ``z - z_q`` is defined (the input of the module returned by
    :meth:`hook_module`).

    Two methods with defaults describe inpainting for models that need more than ``z``:
    :meth:`encode_known` (the features of the known cells of an image with holes) and :meth:`decode_guide`
    (keyword arguments of :meth:`decode` for such an image). PUT overrides both: it encodes the masked image
    and its decoder is guided by the known pixels.

    Inputs arrive checked by the caller (the Dequantizer's public methods, the trainers): an adapter may check
    shapes, but nothing that reads tensor values (a device sync), such as a mask's binary check.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    @abc.abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter handles ``model`` (checked by type, without importing third-party code)."""

    @property
    @abc.abstractmethod
    def factor(self) -> int:
        """Spatial downsampling factor from image to latent map."""

    @property
    @abc.abstractmethod
    def channels(self) -> int:
        """Channel count C of the latent map (the codebook dimension)."""

    @property
    def code_levels(self) -> int:
        """Code indices per latent cell: 1, indices (B, h, w); or the L > 1 levels of a residual quantizer, indices
        (B, h, w, L), one per level, whose code vectors add up to the cell's ``z_q``."""
        return 1

    @abc.abstractmethod
    def codebook(self) -> torch.Tensor:
        """(N, C) code vectors (a residual quantizer: every level's, one level after the other)."""

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, C, h, w) continuous feature ``z``."""

    @abc.abstractmethod
    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) ``z`` -> (``z_q`` (B, C, h, w), indices (B, h, w) long; (B, h, w, L) with
        :attr:`code_levels` L > 1)."""

    @abc.abstractmethod
    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices ((B, h, w, L) with :attr:`code_levels` L > 1) -> (B, C, h, w) code vectors."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        """(B, C, h, w) features -> (B, 3, H, W) image in [-1, 1], decoded as given (no FDM).

        ``model_kwargs``: whatever else the family's decoder reads (PUT: ``image=``, ``pixel_mask=``); an
        adapter refuses keywords it does not know.
        """

    @abc.abstractmethod
    def hook_module(self) -> nn.Module:
        """The module whose first positional input is the quantized map (FDM is installed there)."""

    @abc.abstractmethod
    def decoder_modules(self) -> dict[str, nn.Module]:
        """Modules fine-tuned in phase 3 (the hook module and the decoder), by stable name."""

    def encode_known(self, x: torch.Tensor, mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Continuous features (B, C, h, w) whose *known* cells are used when ``x`` has holes ``mask``
        (B, 1, H, W), 1 = hole; ``z`` is :meth:`encode` of ``x``, already computed. Default: ``z`` (the
        encoder saw the whole image; the hole cells are replaced anyway)."""
        return z

    def decode_guide(self, x: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
        """Keyword arguments for :meth:`decode` when decoding an inpainting of ``x`` (B, 3, H, W) with holes
        ``mask`` (B, 1, H, W) or None. Default: none (the decoder reads only the features)."""
        return {}

    def register_correction_hook(self, correct: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        """Make the model's own decode path use ``correct(z_q)`` wherever it reads the quantized map ``z_q``.

        The default is a forward pre-hook on :meth:`hook_module` replacing its first positional input.
        Adapters whose decoder reads the quantized map in more places (diffusers' spatially normalised
        MoVQ decoder) override this.

        Returns:
            A handle whose ``remove()`` uninstalls everything this call installed.
        """

        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            return (correct(args[0]), *args[1:]) if args else None

        return self.hook_module().register_forward_pre_hook(pre_hook)

    def fingerprint(self) -> str:
        """Fingerprint of this model's codebook (see :func:`fdm.io.fingerprint.codebook_fingerprint`)."""
        return codebook_fingerprint(self.codebook())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the model's floating-point weights (the dtype its inputs must have)."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())
