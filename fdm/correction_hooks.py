"""Hooks that make a model's own decode path apply FDM (Park & Jung, WACV 2025) where its decoder reads the quantized
map twice: as the input of ``post_quant_conv`` and as the condition of spatially normalised layers (MoVQ-style
decoders: diffusers' ``VQModel`` with ``norm_type="spatial"``, transformers' ``Emu3VQVAE``).

Adapters use them in :meth:`fdm.VQAdapter.register_correction_hook`; the default (one read) needs none of this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["HookHandles", "SpatialNormCorrection", "install_spatial_norm_correction"]


def _as_map(x: torch.Tensor) -> torch.Tensor:
    return x


class HookHandles:
    """Removes several hooks at once (what ``register_correction_hook`` returns when it installs more than one)."""

    def __init__(self, *handles: Any):
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` view the same elements (the same tensor, or a view of it with the same layout)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class SpatialNormCorrection:
    """The pre-hooks of a spatially normalised decoder: ``post_quant_conv``'s input is corrected, and the decoder's
    condition (the same quantized map in the model's decode, possibly as a view with another layout) reuses that
    correction instead of running FDM twice. A condition that is not that map (a decoder called directly) is
    corrected on its own.

    Args:
        correct: ``z_q`` (B, C, h, w) -> ``z_dq`` (B, C, h, w).
        condition_index: position of the condition among the decoder's positional arguments.
        condition_name: its keyword name.
        input_map: ``post_quant_conv``'s input -> the (B, C, h, w) map (identity for 2-D models); the corrected map
            goes back with ``reshape`` to the input's shape, so the two may differ only by dimensions of size 1.
        condition_map: the same for the decoder's condition.

    :attr:`last` is the one piece of state: the last (input map, correction) pair of ``post_quant_conv``, taken by the
    decoder hook that follows it.
    """

    def __init__(self, correct: Callable[[torch.Tensor], torch.Tensor], *, condition_index: int, condition_name: str,
                 input_map: Callable[[torch.Tensor], torch.Tensor] = _as_map,
                 condition_map: Callable[[torch.Tensor], torch.Tensor] = _as_map):
        self.correct = correct
        self.condition_index = condition_index
        self.condition_name = condition_name
        self.input_map = input_map
        self.condition_map = condition_map
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def post_quant_conv(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        z_q = self.input_map(args[0])
        z_dq = self.correct(z_q)
        self.last = (z_q, z_dq)
        return (z_dq.reshape(args[0].shape), *args[1:])

    def decoder(self, module: nn.Module, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        positional = len(args) > self.condition_index
        condition = args[self.condition_index] if positional else kwargs.get(self.condition_name)
        if condition is None:
            return None
        z_q = self.condition_map(condition)
        seen, z_dq = self.last if self.last is not None else (None, None)
        self.last = None
        if seen is None or not _same_memory(seen, z_q):
            z_dq = self.correct(z_q)
        corrected = z_dq.reshape(condition.shape)
        if positional:
            i = self.condition_index
            return (*args[:i], corrected, *args[i + 1:]), kwargs
        return args, {**kwargs, self.condition_name: corrected}


def install_spatial_norm_correction(post_quant_conv: nn.Module, decoder: nn.Module, hooks: SpatialNormCorrection
                                    ) -> HookHandles:
    """Install ``hooks`` on ``post_quant_conv`` and ``decoder``; the returned handle removes both."""
    return HookHandles(
        post_quant_conv.register_forward_pre_hook(hooks.post_quant_conv),
        decoder.register_forward_pre_hook(hooks.decoder, with_kwargs=True),
    )
