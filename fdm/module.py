"""The Feature Dequantization Module (Park & Jung, "Improving Detail in Pluralistic Image Inpainting
with Feature Dequantization", WACV 2025, arXiv:2412.01046).

A small conv net ``F`` that predicts the quantization residual ``z - z_q`` from the quantized map and a
latent-cell mask, so that ``z_dq = z_q + F([z_q, m]) * m`` is closer to the encoder's continuous feature. Its
files (``save_pretrained`` / ``from_pretrained``, the Hub, the paper's released weights) are
:class:`fdm.io.fdm_files.FDMFiles`, mixed into :class:`FDM`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fdm.io.fdm_files import FDMFiles
from fdm.validation import check_binary_mask, check_latent, check_latent_mask_shape

__all__ = ["FDM", "ResidualBlock"]

logger = logging.getLogger(__name__)

PAPER_URL = "https://arxiv.org/abs/2412.01046"


class ResidualBlock(nn.Module):
    """conv3x3 (C -> C/2), ReLU, conv1x1 (C/2 -> C), add the input, ReLU (the paper's block)."""

    def __init__(self, channels: int, bottleneck_channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, bottleneck_channels, 3, padding=1)
        self.expand = nn.Conv2d(bottleneck_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.reduce(x))  # (B, C/2, h, w)
        return torch.relu(x + self.expand(h))  # (B, C, h, w)


class FDM(
    nn.Module,
    FDMFiles,
    library_name="fdm-vq",
    repo_url="https://github.com/fdm-vq/fdm-vq",
    paper_url=PAPER_URL,
    docs_url="https://github.com/fdm-vq/fdm-vq/tree/main/docs",
    license="mit",
    tags=["fdm", "vector-quantization", "vqgan", "image-generation", "inpainting"],
):
    """Feature Dequantization Module.

    Args:
        channels: channel count ``C`` of the quantized map (the codebook dimension).
        mask_channels: 1 for mask-conditioned use (inpainting), 0 for unconditional / class-conditional
            models where every latent cell is generated.
        hidden_channels: width of the residual trunk; defaults to ``channels`` (the paper). Each
            residual block narrows to half of it.
        num_blocks: number of residual blocks (8 in the paper).
        base_model: free-text name of the VQ model this FDM was trained for (repo id, config name).
        base_model_fingerprint: fingerprint of that model's codebook (see :mod:`fdm.io.fingerprint`);
            the :class:`~fdm.Dequantizer` refuses a model whose fingerprint differs.
        training: JSON-able description of how the weights were trained (written to the model card).
        finetuned_decoder: True when the weights were trained jointly with a fine-tuned decoder
            (phase 3); such an FDM is only valid together with that decoder.

    A freshly constructed FDM is an exact identity: its output convolution is zero-initialised.

    Example:
        >>> import torch, fdm
        >>> module = fdm.FDM(channels=8, hidden_channels=16, num_blocks=2)
        >>> z_q = torch.randn(1, 8, 4, 4)
        >>> torch.equal(module(z_q), z_q)
        True
    """

    def __init__(
        self,
        channels: int = 256,
        mask_channels: int = 1,
        hidden_channels: int | None = None,
        num_blocks: int = 8,
        base_model: str | None = None,
        base_model_fingerprint: str | None = None,
        training: dict[str, Any] | None = None,
        finetuned_decoder: bool = False,
    ):
        super().__init__()
        if channels < 1 or num_blocks < 0 or mask_channels not in (0, 1):
            raise ValueError(
                f"FDM needs channels >= 1, num_blocks >= 0 and mask_channels in (0, 1); got channels="
                f"{channels}, num_blocks={num_blocks}, mask_channels={mask_channels}."
            )
        hidden = channels if hidden_channels is None else hidden_channels
        if hidden < 2:
            raise ValueError(f"hidden_channels must be at least 2 (each block narrows to half); got {hidden}.")
        self.channels = channels
        self.mask_channels = mask_channels
        self.hidden_channels = hidden
        self.num_blocks = num_blocks
        self.base_model = base_model
        self.base_model_fingerprint = base_model_fingerprint
        self.training_info = dict(training or {})
        self.finetuned_decoder = finetuned_decoder
        self._decoder_state: dict[str, torch.Tensor] | None = None

        self.stem = nn.Conv2d(channels + mask_channels, hidden, 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden, hidden // 2) for _ in range(num_blocks)))
        self.head = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-able (what ``save_pretrained`` writes to config.json)."""
        return {
            "channels": self.channels,
            "mask_channels": self.mask_channels,
            "hidden_channels": self.hidden_channels,
            "num_blocks": self.num_blocks,
            "base_model": self.base_model,
            "base_model_fingerprint": self.base_model_fingerprint,
            "training": self.training_info or None,
            "finetuned_decoder": self.finetuned_decoder,
        }

    @property
    def decoder_state(self) -> dict[str, torch.Tensor] | None:
        """Phase 3: the weights of the decoder fine-tuned with this FDM (``decoder.safetensors`` beside
        ``model.safetensors``, see :mod:`fdm.io.decoder_weights`); the Dequantizer loads them into the base model's
        decoder. Moved and cast with the module (``.to()``, ``.cuda()``, ``.half()``), saved and loaded with it,
        kept out of :meth:`state_dict` (which is the FDM's own weights); None for a phase-2 FDM."""
        return self._decoder_state

    @decoder_state.setter
    def decoder_state(self, state: Mapping[str, torch.Tensor] | None) -> None:
        if state is not None:
            odd = sorted(repr(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
            if odd:
                raise TypeError(f"FDM.decoder_state maps decoder weight names to tensors; these entries do not: "
                                f"{', '.join(odd[:5])}.")
            state = dict(state)
        self._decoder_state = state

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FDM:
        """``nn.Module._apply`` (behind ``.to()``, ``.cuda()``, ``.half()``...), applied to :attr:`decoder_state`
        too."""
        super()._apply(fn, recurse)
        if self._decoder_state is not None:
            self._decoder_state = {name: fn(tensor) for name, tensor in self._decoder_state.items()}
        return self

    def predict_error(
        self, z_q: torch.Tensor, mask: torch.Tensor | None = None, *, check_binary: bool = True
    ) -> torch.Tensor:
        """The predicted residual ``F([z_q, m]) * m``.

        Args:
            z_q: (B, C, h, w) quantized (or partly continuous) feature map.
            mask: (B, 1, h, w) latent-cell mask, 1 = generated cell, or None for all ones.
            check_binary: read ``mask``'s values to check that they are 0 and 1 (a device sync); False for a
                mask the caller checked or built binary (the library's own steps behind a checked entry point).

        Returns:
            (B, C, h, w) residual, zero on cells where ``mask`` is 0.
        """
        check_latent(z_q, self.channels, name="z_q")
        if mask is not None:
            check_latent_mask_shape(mask, z_q)
            if check_binary:
                check_binary_mask(mask)
            mask = mask.to(z_q.dtype)
        if self.mask_channels:
            cell_mask = torch.ones_like(z_q[:, :1]) if mask is None else mask.expand(z_q.shape[0], -1, -1, -1)
            x = torch.cat([z_q, cell_mask], dim=1)  # (B, C + 1, h, w)
        else:
            x = z_q  # (B, C, h, w)
        h = torch.relu(self.stem(x))  # (B, hidden, h, w)
        h = self.blocks(h)  # (B, hidden, h, w)
        residual = self.head(h)  # (B, C, h, w)
        return residual if mask is None else residual * mask

    def forward(
        self, z_q: torch.Tensor, mask: torch.Tensor | None = None, *, check_binary: bool = True
    ) -> torch.Tensor:
        """The dequantized map ``z_q + F([z_q, m]) * m`` (B, C, h, w); see :meth:`predict_error`."""
        return z_q + self.predict_error(z_q, mask, check_binary=check_binary)
