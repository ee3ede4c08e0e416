"""PUT's P-VQVAE (Liu et al., "Reduce Information Loss in Transformers for Pluralistic Image Inpainting",
CVPR 2022): patch encoder, dual-half EMA codebook and guided decoder, with PUT's parameter names.

Written from the architecture of the released code (liuqk3/PUT ``patch_vqgan.py``: PatchEncoder2,
VectorQuantizer, PatchConvDecoder2); the state-dict keys are PUT's own, so PUT checkpoints load as they are.
Inputs are images in [-1, 1] (PUT's ``x / 127.5 - 1``) and masks with 1 = hole (PUT uses 1 = known).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fdm.errors import InputError
from fdm.masks import pool_cells
from fdm.validation import check_image, check_pixel_mask, check_pixel_mask_shape

__all__ = ["PVQVAE", "PatchEncoder", "DualCodebookQuantizer", "GuidedDecoder", "masked_input"]


def masked_input(image: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
    """PUT's masked image: hole pixels (``pixel_mask`` = 1) set to -1, i.e. 0 in PUT's 0..255 range."""
    if pixel_mask is None:
        return image
    return torch.where(pixel_mask.bool(), torch.full_like(image, -1.0), image)


class _LinearResBlock(nn.Module):
    """ReLU, Linear (C -> C'), ReLU, Linear (C' -> C), plus the input *after* the first ReLU.

    PUT's first ReLU is in place, so the residual branch adds ``relu(x)``, not ``x``; the released weights
    were trained that way. Keys ``layers.1`` / ``layers.3`` as in PUT.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(nn.ReLU(), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        return self.layers(x) + x


class _ConvResBlock(nn.Module):
    """ReLU, conv3x3 (C -> C'), ReLU, conv1x1 (C' -> C), plus ``relu(x)`` (PUT's in-place ReLU). Keys ``conv.1/3``."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        return self.conv(x) + x


class PatchEncoder(nn.Module):
    """Non-overlapping patches -> Linear -> residual MLP blocks -> ReLU, Linear, ReLU (PUT's PatchEncoder2).

    Each patch is encoded independently of the others, so a patch's feature only sees its own pixels.
    """

    def __init__(self, patch_size: int, channels: int, out_channels: int, num_blocks: int, block_channels: int):
        super().__init__()
        self.patch_size = patch_size
        self.pre_layers = nn.Sequential(nn.Linear(3 * patch_size * patch_size, channels))
        self.res_layers = nn.Sequential(*(_LinearResBlock(channels, block_channels) for _ in range(num_blocks)))
        self.post_layers = nn.Sequential(nn.ReLU(), nn.Linear(channels, out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, h*w, 3*p*p)
        y = self.post_layers(self.res_layers(self.pre_layers(patches)))  # (B, h*w, C)
        return y.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, C, h, w)


class DualCodebookQuantizer(nn.Module):
    """PUT's EMA codebook split in two halves.

    Codes ``[0, known_codes)`` quantize patches without any hole pixel, codes ``[known_codes, N)`` patches
    with holes; the UQ-Transformer samples from the first half only. Buffers (PUT's names): ``embedding``
    (N, C), ``cluster_size`` (N,), ``embedding_avg`` (N, C); the last two are EMA training statistics,
    kept for checkpoint compatibility (this implementation does not train the codebook).
    """

    def __init__(self, num_codes: int, channels: int, known_codes: int):
        super().__init__()
        if not 0 < known_codes <= num_codes:
            raise ValueError(f"known_codes must be in (0, {num_codes}]; got {known_codes}.")
        self.num_codes, self.channels, self.known_codes = num_codes, channels, known_codes
        self.register_buffer("embedding", torch.randn(num_codes, channels))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embedding_avg", self.embedding.clone())

    def _nearest(self, z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(L, C) features -> (L,) index of the nearest row of ``codes`` (squared euclidean, first on ties)."""
        d = z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * z @ codes.t()  # (L, n)
        return d.argmin(dim=1)

    def quantize(self, z: torch.Tensor, known_cells: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes of ``z`` (B, C, h, w).

        Args:
            z: continuous features.
            known_cells: (B, h, w) bool, True where the patch has no hole pixel; those cells use the first
                half of the codebook, the others the second. None = every cell known (first half).

        Returns:
            (z_q (B, C, h, w), indices (B, h, w) long).
        """
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
        k = self.known_codes
        if known_cells is None:
            indices = self._nearest(flat, self.embedding[:k])
        else:
            known = known_cells.reshape(-1)
            indices = torch.empty(flat.shape[0], dtype=torch.long, device=z.device)
            indices[known] = self._nearest(flat[known], self.embedding[:k])
            indices[~known] = self._nearest(flat[~known], self.embedding[k:]) + k
        indices = indices.view(b, h, w)
        return self.lookup(indices), indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> (B, C, h, w) code vectors."""
        return F.embedding(indices, self.embedding).permute(0, 3, 1, 2)


class _UpSample(nn.Module):
    """ReLU then a 4x4 stride-2 transposed convolution (PUT's UpSample, ``activate_before='relu'``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deconv(torch.relu(x))


class GuidedDecoder(nn.Module):
    """PUT's PatchConvDecoder2 with the masked-image guide branch (``up_layer_with_image=True``).

    Token branch: conv3x3, residual conv blocks, ``log2(patch)`` transposed-conv up-samplings, ReLU, conv3x3.
    Guide branch (``encoder.layers``): conv3x3 then stride-2 4x4 convs over the masked image. Before every
    up-sampling and before the last conv, known pixels (mask resized by nearest neighbour) take the guide
    features and holes keep the token branch.

    Args:
        in_channels: channels of the ``post_quant_conv`` output.
        channels: width of the residual trunk (256 in the release).
        num_blocks / block_channels: residual blocks and their bottleneck width.
        base_channels: width after the last up-sampling (64 in the release); doubles per level.
        patch_size: 2 ** number of up-samplings.
    """

    def __init__(self, in_channels: int, channels: int, num_blocks: int, block_channels: int, base_channels: int,
                 patch_size: int):
        super().__init__()
        levels = patch_size.bit_length() - 1
        if 2 ** levels != patch_size:
            raise ValueError(f"patch_size must be a power of two; got {patch_size}.")
        widths = [base_channels * 2 ** i for i in range(levels)]  # finest first: 64, 128, 256
        self.pre_layers = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1))
        self.res_layers = nn.Sequential(*(_ConvResBlock(channels, block_channels) for _ in range(num_blocks)))
        ups_in = [channels, *widths[::-1][:-1]]  # coarsest first: 256 -> 256, 256 -> 128, 128 -> 64
        self.up_layers = nn.Sequential(*(_UpSample(i, o) for i, o in zip(ups_in, widths[::-1])))
        self.post_layers = nn.Sequential(nn.ReLU(), nn.Conv2d(base_channels, 3, 3, padding=1))
        guide = [nn.Conv2d(3, base_channels, 3, padding=1)]
        guide += [nn.Conv2d(i, o, 4, stride=2, padding=1) for i, o in zip(widths, [*widths[1:], channels])]
        self.encoder = nn.Module()
        self.encoder.layers = nn.Sequential(*guide)

    def guide_features(self, masked_image: torch.Tensor) -> list[torch.Tensor]:
        """Guide-branch features, finest first: (B, 64, H, W), (B, 128, H/2, W/2), ..., (B, C, H/p, W/p).

        Each is taken before its ReLU (the next layers apply it), as in PUT.
        """
        feats, x = [], masked_image
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x if i == 0 else torch.relu(x))
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, masked_image: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Decode.

        Args:
            x: (B, C_in, h, w) output of ``post_quant_conv``.
            masked_image: (B, 3, H, W) image in [-1, 1] with holes set to -1.
            known: (B, 1, H, W) float, 1 = known pixel (PUT's convention).

        Returns:
            (B, 3, H, W) image, not clamped.
        """
        x = self.res_layers(self.pre_layers(x))  # (B, C, h, w)
        guide = self.guide_features(masked_image)
        for level, up in zip(range(len(guide) - 1, 0, -1), self.up_layers):
            m = F.interpolate(known, size=x.shape[-2:], mode="nearest")  # (B, 1, h', w')
            x = up(x * (1 - m) + guide[level] * m)  # (B, C', 2h', 2w')
        x = x * (1 - known) + guide[0] * known  # (B, 64, H, W)
        return self.post_layers(x)  # (B, 3, H, W)


class PVQVAE(nn.Module):
    """PUT's P-VQVAE: patch encoder, 1x1 ``quant_conv``, dual codebook, 1x1 ``post_quant_conv``, guided decoder.

    Defaults are the released Places / Paris / FFHQ / ImageNet configuration (patch 8, codebook 1024 x 256 of
    which 512 codes are for fully known patches). All sizes can be read back from a checkpoint's shapes
    (:func:`fdm.adapters.put.checkpoints.pvqvae_config_from_state_dict`).

    The FDM correction lives between the codebook and ``post_quant_conv``: ``z`` below is the
    ``quant_conv`` output, the space of the code vectors.
    """

    def __init__(
        self,
        patch_size: int = 8,
        encoder_channels: int = 256,
        encoder_out_channels: int = 256,
        encoder_blocks: int = 8,
        encoder_block_channels: int = 128,
        num_codes: int = 1024,
        embed_dim: int = 256,
        known_codes: int = 512,
        decoder_in_channels: int = 256,
        decoder_channels: int = 256,
        decoder_blocks: int = 8,
        decoder_block_channels: int = 128,
        base_channels: int = 64,
    ):
        super().__init__()
        self.config: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.patch_size = patch_size
        self.encoder = PatchEncoder(patch_size, encoder_channels, encoder_out_channels, encoder_blocks,
                                    encoder_block_channels)
        self.quant_conv = nn.Conv2d(encoder_out_channels, embed_dim, 1)
        self.quantize = DualCodebookQuantizer(num_codes, embed_dim, known_codes)
        self.post_quant_conv = nn.Conv2d(embed_dim, decoder_in_channels, 1)
        self.decoder = GuidedDecoder(decoder_in_channels, decoder_channels, decoder_blocks, decoder_block_channels,
                                     base_channels, patch_size)

    @property
    def embed_dim(self) -> int:
        return self.quantize.channels

    def known_cells(self, pixel_mask: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor:
        """(B, h, w) bool: True where the patch has no hole pixel (PUT's token type 1)."""
        p = self.patch_size
        b, _, height, width = image.shape
        if pixel_mask is None:
            return torch.ones(b, height // p, width // p, dtype=torch.bool, device=image.device)
        # PUT's convention (True = known) is the inverse of fdm.latent_mask's (1 = generated): inverted here only
        return (pool_cells(pixel_mask, p) == 0)[:, 0].expand(b, -1, -1)

    def encode(self, image: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) image in [-1, 1] -> (B, C, H/p, W/p) continuous features ``z``.

        With ``pixel_mask`` (B, 1, H, W, 1 = hole) the masked image is encoded (hole pixels = -1), as PUT
        does for inpainting; cells without hole pixels then get exactly the features of the full image.
        """
        self._check(image, pixel_mask)
        return self.quant_conv(self.encoder(masked_input(image, pixel_mask)))

    def decode(self, z: torch.Tensor, image: torch.Tensor | None = None,
               pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decode features ``z`` (B, C, h, w) -> (B, 3, H, W) image in [-1, 1].

        Args:
            z: code vectors and/or continuous features (the ``post_quant_conv`` input).
            image: (B, 3, H, W) the image whose known pixels guide the decoder (hole pixels are ignored).
            pixel_mask: (B, 1, H, W) 1 = hole. Without ``pixel_mask`` and ``image`` every pixel is treated as
                a hole, i.e. a pure decode of ``z`` with no guide.
        """
        b, _, h, w = z.shape
        p = self.patch_size
        if pixel_mask is None and image is not None:
            raise InputError("PUT's decoder was given an image but no pixel_mask saying which pixels are holes.")
        if pixel_mask is None:  # a pure decode: every pixel a hole, no guide (nothing to read back)
            pixel_mask = torch.ones(b, 1, h * p, w * p, dtype=z.dtype, device=z.device)
            image = torch.zeros(b, 3, h * p, w * p, dtype=z.dtype, device=z.device)
        elif image is None:
            if not pixel_mask.bool().all():
                raise InputError("PUT's decoder needs the image whose known pixels guide it: pass image=... "
                                 "together with a pixel_mask that has known pixels.")
            image = torch.zeros(b, 3, h * p, w * p, dtype=z.dtype, device=z.device)
        self._check(image, pixel_mask)
        if image.shape[-2:] != (h * p, w * p):
            raise InputError(f"features of size {h}x{w} decode to {h * p}x{w * p} pixels, but the guide image is "
                             f"{image.shape[-2]}x{image.shape[-1]}.")
        known = 1 - pixel_mask.to(z.dtype).expand(b, -1, -1, -1)
        out = self.decoder(self.post_quant_conv(z), masked_input(image, pixel_mask).expand(b, -1, -1, -1), known)
        return out.clamp(-1, 1)

    def reconstruct(self, image: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """PUT's own reconstruction: encode, quantize every cell (hole cells with the second codebook half),
        decode guided by the known pixels. (B, 3, H, W) in [-1, 1]."""
        if pixel_mask is not None:
            check_pixel_mask(pixel_mask, image)  # the one binary check of pixel_mask
        z = self.encode(image, pixel_mask)
        z_q, _ = self.quantize.quantize(z, self.known_cells(pixel_mask, image))
        return self.decode(z_q, image if pixel_mask is not None else None, pixel_mask)

    def _check(self, image: torch.Tensor, pixel_mask: torch.Tensor | None) -> None:
        """Shapes only: the values of ``pixel_mask`` (0 and 1) are checked by the entry points that take a mask
        from a caller (:meth:`reconstruct`, the Dequantizer, :func:`fdm.adapters.put.inpaint`)."""
        check_image(image, factor=self.patch_size, name="image")
        if pixel_mask is not None:
            check_pixel_mask_shape(pixel_mask, image)
