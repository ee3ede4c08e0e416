"""A VQ autoencoder assembled from your own parts and a quantizer of lucidrains' vector-quantize-pytorch
(``VectorQuantize``, ``ResidualVQ``): the model that FDM (Park & Jung, WACV 2025) attaches to.

vector-quantize-pytorch ships quantizers, not models: you write the encoder and the decoder. :class:`VQAutoencoder`
holds the three parts (plus optional projections around the quantizer), moves feature maps into the layout the
quantizer was built for and back, and decodes code indices. The library is never imported here: the quantizer
is recognised by its class.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fdm.errors import ConfigError, InputError
from fdm.io.weights import load_state_dict_strict, read_safetensors, write_weights

__all__ = ["QUANTIZERS", "VQAutoencoder", "load_weights", "save_weights"]

#: The quantizer classes of vector-quantize-pytorch that :class:`VQAutoencoder` takes.
QUANTIZERS = ("VectorQuantize", "ResidualVQ")


def quantizer_kind(quantizer: object) -> str | None:
    """``"VectorQuantize"`` or ``"ResidualVQ"`` for a quantizer of vector-quantize-pytorch (or a subclass), else
    None; checked by class name and module, without importing the library."""
    for cls in type(quantizer).__mro__:
        if cls.__name__ in QUANTIZERS and cls.__module__.startswith("vector_quantize_pytorch."):
            return cls.__name__
    return None


def _check_quantizer(quantizer: nn.Module) -> str:
    """The quantizer's kind, after refusing what :class:`VQAutoencoder` cannot decode exactly from indices.

    Raises:
        TypeError: not a ``VectorQuantize`` or ``ResidualVQ``.
        ConfigError: an option whose code vectors are not rows of the codebook, naming it.
    """
    kind = quantizer_kind(quantizer)
    if kind is None:
        raise TypeError(f"quantizer must be a VectorQuantize or ResidualVQ of vector-quantize-pytorch; got "
                        f"{type(quantizer).__module__}.{type(quantizer).__name__}.")
    layers = list(quantizer.layers) if kind == "ResidualVQ" else [quantizer]
    refused = {
        "heads > 1 (multi-head codes)": any(layer.heads != 1 for layer in layers),
        "accept_3d_fmap=True (video maps)": any(layer.accept_3d_fmap for layer in layers),
        "affine_param=True (codes rescaled by batch statistics)": any(layer._codebook.affine_param for layer in layers),
        "vq_bridge (codes transformed by a network)": any(layer._codebook.vq_bridge is not None for layer in layers),
    }
    if kind == "ResidualVQ":
        refused |= {
            "implicit_neural_codebook=True (codes computed by MLPs)": quantizer.implicit_neural_codebook,
            "diveq=True": quantizer.diveq,
            "eval_beam_size > 1 (beam search)": (quantizer.eval_beam_size or 1) > 1,
            "accept_image_fmap=True or channel_last=False (ResidualVQ runs on channel-last sequences only; "
            "VQAutoencoder reshapes the maps for it)": quantizer.accept_image_fmap or not layers[0].channel_last,
        }
    bad = [option for option, present in refused.items() if present]
    if bad:
        raise ConfigError(f"{kind} with {', '.join(bad)} is not supported by fdm's VQAutoencoder.")
    return kind


class VQAutoencoder(nn.Module):
    """``decoder(post_quant(quantizer(pre_quant(encoder(x)))))`` with a vector-quantize-pytorch quantizer.

    The parts are used as given (not copied): wrapping the modules of a model you trained elsewhere shares their
    weights. Feature maps between the parts are channel-first ``(B, C, h, w)``; the quantizer may be built for
    any layout it supports (``accept_image_fmap=True`` maps, or ``(B, h*w, C)`` sequences with
    ``channel_last=True``, or ``(B, C, h*w)`` with ``channel_last=False``) and with a ``codebook_dim``
    projection. ``ResidualVQ`` (vector-quantize-pytorch 1.32) runs on channel-last sequences only.

    Args:
        encoder: ``(B, 3, H, W)`` image in [-1, 1] -> ``(B, C', H/f, W/f)`` feature map.
        quantizer: ``VectorQuantize(dim=C, ...)`` or ``ResidualVQ(dim=C, ...)``.
        decoder: ``(B, C'', h, w)`` -> ``(B, 3, H, W)`` image in [-1, 1].
        factor: the downsampling factor ``f`` from image to feature map.
        pre_quant: optional module ``(B, C', h, w) -> (B, C, h, w)`` between encoder and quantizer (a 1x1 conv).
        post_quant: optional module ``(B, C, h, w) -> (B, C'', h, w)`` between quantizer and decoder.

    Example:
        >>> from vector_quantize_pytorch import VectorQuantize
        >>> model = VQAutoencoder(nn.Conv2d(3, 8, 4, stride=4), VectorQuantize(dim=8, codebook_size=32,
        ...                       accept_image_fmap=True), nn.ConvTranspose2d(8, 3, 4, stride=4), factor=4)
        >>> image, indices, loss = model(torch.rand(1, 3, 16, 16) * 2 - 1)
        >>> tuple(image.shape), tuple(indices.shape)
        ((1, 3, 16, 16), (1, 4, 4))
    """

    def __init__(self, encoder: nn.Module, quantizer: nn.Module, decoder: nn.Module, *, factor: int,
                 pre_quant: nn.Module | None = None, post_quant: nn.Module | None = None):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ConfigError(f"factor must be a positive integer (the image-to-feature-map downsampling); got "
                              f"{factor!r}.")
        self.kind = _check_quantizer(quantizer)
        self.factor = factor
        self.encoder = encoder
        self.pre_quant = pre_quant if pre_quant is not None else nn.Identity()
        self.quantizer = quantizer
        self.post_quant = post_quant if post_quant is not None else nn.Identity()
        self.decoder = decoder

    @property
    def levels(self) -> list[nn.Module]:
        """The quantizer's ``VectorQuantize`` levels (one for a ``VectorQuantize``)."""
        return list(self.quantizer.layers) if self.kind == "ResidualVQ" else [self.quantizer]

    @property
    def channels(self) -> int:
        """C: channels of the quantizer's input and output maps."""
        if self.kind == "VectorQuantize":
            return self.quantizer.dim
        project_in = self.quantizer.project_in
        return project_in.in_features if self.quantizer.has_projections else self.quantizer.codebook_dim

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """Codes per level."""
        return tuple(level.codebook_size for level in self.levels)

    def _layout(self) -> str:
        """``"map"`` (B, C, h, w), ``"last"`` (B, n, C) or ``"first"`` (B, C, n): what the quantizer reads."""
        first = self.levels[0]
        return "map" if first.accept_image_fmap else "last" if first.channel_last else "first"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, C, h, w) ``z``, the quantizer's input."""
        return self.pre_quant(self.encoder(x))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The quantizer's own forward on ``z`` (B, C, h, w), in the quantizer's layout.

        Returns:
            ``z_q`` (B, C, h, w) (a ``ResidualVQ``: the sum of its levels), the indices (B, h, w) (a ``ResidualVQ``
            of L levels: (B, h, w, L)), and the quantizer's auxiliary loss summed to a scalar.
        """
        if z.dim() != 4 or z.shape[1] != self.channels:
            raise InputError(f"z must be a (B, {self.channels}, h, w) feature map; got shape {tuple(z.shape)}.")
        b, c, h, w = z.shape
        layout = self._layout()
        given = z if layout == "map" else z.flatten(2) if layout == "first" else z.flatten(2).transpose(1, 2)
        z_q, indices, loss = self.quantizer(given)  # map: (B, C, h, w); first: (B, C, n); last: (B, n, C)
        if layout == "last":
            z_q = z_q.transpose(1, 2)  # (B, n, C) -> (B, C, n)
        per_level = indices.shape[-1:] if self.kind == "ResidualVQ" else ()
        return z_q.reshape(b, c, h, w), indices.reshape(b, h, w, *per_level), loss.sum()

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w), or (B, h, w, L) for a ``ResidualVQ`` of L levels, -> ``z_q`` (B, C, h, w): bit
        for bit what :meth:`quantize` returns for the features these indices came from (codes taken from each
        level's ``codebook``, added level after level as ``ResidualVQ`` adds them, then ``project_out``).

        Raises:
            InputError: indices of another shape, or outside a level's ``[0, codebook_size)``.
        """
        levels, sizes, residual = self.levels, self.codebook_sizes, self.kind == "ResidualVQ"
        if indices.dim() != 3 + residual or (residual and indices.shape[-1] != len(levels)):
            shape = f"(B, h, w, {len(levels)})" if residual else "(B, h, w)"
            raise InputError(f"indices must have shape {shape}; got {tuple(indices.shape)}.")
        per_level = indices.flatten(1, 2) if residual else indices.flatten(1, 2).unsqueeze(-1)  # (B, n, L)
        bounds = torch.tensor(sizes, device=indices.device)
        if bool(((per_level < 0) | (per_level >= bounds)).any()):
            raise InputError(f"indices must lie in [0, codebook size) of their level (sizes {list(sizes)}); got "
                             f"values from {int(indices.min())} to {int(indices.max())}.")
        codes = None
        for level, level_indices in zip(levels, per_level.unbind(-1)):
            level_codes = level.codebook[level_indices]  # (B, n, d)
            codes = level_codes if codes is None else codes + level_codes
        z_q = self.quantizer.project_out(codes).transpose(1, 2)  # (B, C, n)
        b, h, w = indices.shape[:3]
        return z_q.reshape(b, -1, h, w)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) quantized map -> (B, 3, H, W) image: ``decoder(post_quant(z_q))``."""
        return self.decoder(self.post_quant(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (see :meth:`lookup`) -> (B, 3, H, W) image (what a prior over the codes is decoded with)."""
        return self.decode(self.lookup(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) image -> (reconstruction (B, 3, H, W), indices, the quantizer's auxiliary loss)."""
        z_q, indices, loss = self.quantize(self.encode(x))
        return self.decode(z_q), indices, loss


def save_weights(model: VQAutoencoder, path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s state dict (codebooks and their EMA statistics included) to a ``.safetensors`` file with
    fdm-vq's digest; non-finite weights are refused. Each tensor is written as a copy of its own: a ``ResidualVQ``
    with ``shared_codebook=True`` holds one codebook under every level's name, which safetensors refuses to share."""
    return write_weights({key: value.clone() for key, value in model.state_dict().items()}, path, metadata=metadata)


def load_weights(model: VQAutoencoder, path: str | Path) -> VQAutoencoder:
    """Fill ``model`` (built by your code with the architecture the file was saved from) with the weights of a
    ``.safetensors`` file, every key and shape checked, and return it in eval mode. No pickle is ever read.

    Raises:
        CheckpointError: unreadable file, missing, unexpected or wrongly shaped keys (named).
    """
    load_state_dict_strict(model, read_safetensors(path, require_finite=True), source=f"weights {path}")
    return model.eval()
