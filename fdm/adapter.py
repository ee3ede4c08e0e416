"""The adapter interface: how the :class:`~fdm.Dequantizer` reaches one model family's encoder,
quantizer and decoder, and the registry that picks an adapter from a model's type.

Adapters for third-party families live in ``fdm.adapters`` (source folder ``adapters/``) and register
themselves with :func:`register_adapter`; the core imports that package only when it has to find one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fdm.fingerprint import codebook_fingerprint

__all__ = ["VQAdapter", "find_adapter", "register_adapter", "registered_adapters"]

_REGISTRY: list[type[VQAdapter]] = []


class VQAdapter:
    """Base class of adapters. Subclasses implement the methods that raise ``NotImplementedError``.

    Conventions: images are (B, 3, H, W) in [-1, 1]; ``pixel_mask`` is (B, 1, H, W) with 1 = hole;
    feature maps are (B, C, h, w) in the space where ``z - z_q`` is defined (the input of the module
    returned by :meth:`hook_module`).
    """

    #: True when the model encodes the masked image (PUT): known cells then take their features from it.
    encodes_masked_input: bool = False

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter handles ``model`` (checked by type, without importing third-party code)."""
        raise NotImplementedError

    @property
    def factor(self) -> int:
        """Spatial downsampling factor from image to latent map."""
        raise NotImplementedError

    @property
    def channels(self) -> int:
        """Channel count C of the latent map (the codebook dimension)."""
        raise NotImplementedError

    def codebook(self) -> torch.Tensor:
        """(N, C) code vectors."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, C, h, w) continuous feature ``z``."""
        raise NotImplementedError

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) ``z`` -> (``z_q`` (B, C, h, w), indices (B, h, w) long)."""
        raise NotImplementedError

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> (B, C, h, w) code vectors."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor, pixel_mask: torch.Tensor | None = None, **model_kwargs: Any) -> torch.Tensor:
        """(B, C, h, w) features -> (B, 3, H, W) image in [-1, 1], decoded as given (no FDM)."""
        raise NotImplementedError

    def hook_module(self) -> nn.Module:
        """The module whose first positional input is the quantized map (FDM is installed there)."""
        raise NotImplementedError

    def decoder_modules(self) -> dict[str, nn.Module]:
        """Modules fine-tuned in phase 3 (the hook module and the decoder), by stable name."""
        raise NotImplementedError

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
        """Fingerprint of this model's codebook (see :func:`fdm.fingerprint.codebook_fingerprint`)."""
        return codebook_fingerprint(self.codebook())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the model's floating-point weights (the dtype its inputs must have)."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())


def register_adapter(cls: type[VQAdapter]) -> type[VQAdapter]:
    """Class decorator: make :func:`find_adapter` consider ``cls`` (later registrations win)."""
    if cls not in _REGISTRY:
        _REGISTRY.append(cls)
    return cls


def registered_adapters() -> list[type[VQAdapter]]:
    """The adapter classes known so far, built-in ones included."""
    importlib.import_module("fdm.adapters")
    return list(_REGISTRY)


def find_adapter(model: nn.Module) -> VQAdapter:
    """The adapter instance for ``model``, chosen from its type.

    Raises:
        TypeError: no registered adapter handles this model type.
    """
    for cls in reversed(registered_adapters()):
        if cls.matches(model):
            return cls(model)
    names = ", ".join(c.__name__ for c in _REGISTRY)
    raise TypeError(
        f"No fdm adapter handles {type(model).__module__}.{type(model).__name__}. Known adapters: {names}. "
        "Pass adapter=YourAdapter(model) to fdm.Dequantizer, or register one with @fdm.register_adapter."
    )
