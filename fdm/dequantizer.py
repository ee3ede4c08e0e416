"""The Dequantizer: a VQ model plus an FDM, with the model's own decode path optionally corrected.

``z_dq = z_q + F([z_q, m]) * m`` is applied on the input of the module that receives the quantized map
(taming's ``post_quant_conv``, for example), either explicitly (:meth:`Dequantizer.decode`) or through a
forward pre-hook (:meth:`Dequantizer.attach`) so third-party sampling code is corrected unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fdm.adapter import VQAdapter
from fdm.errors import CheckpointError, FingerprintMismatchError, InputError
from fdm.io.decoder_weights import apply_decoder_state
from fdm.masks import pool_cells
from fdm.module import FDM
from fdm.padding import crop, pad_image, pad_mask, padded_size
from fdm.pipeline import Latents, encode_latents, quantize
from fdm.registry import find_adapter
from fdm.validation import (
    check_binary_mask,
    check_dtype,
    check_fdm_fits,
    check_image,
    check_latent,
    check_latent_mask_shape,
    check_pixel_mask,
    check_pixel_mask_shape,
)
from fdm.validation import check_finite as _check_finite

__all__ = ["Dequantizer"]


class Dequantizer(nn.Module):
    """Wrap a VQ model and an FDM trained for it.

    Args:
        model: the VQ model (taming VQModel / GumbelVQ / Net2NetTransformer, a PUT codec, a diffusers
            VQModel, or any model with a registered adapter).
        fdm_module: the :class:`~fdm.FDM`; its channel count must match the model's.
        adapter: an adapter instance; chosen from the model's type among the registered families
            (:func:`fdm.find_adapter`) when None.
        check_fingerprint: refuse an FDM whose recorded base-model fingerprint differs from this model's
            codebook. Set False only when you know the FDM suits the model (e.g. a codebook you re-saved).
        load_decoder: what to do with the decoder weights of a phase-3 FDM (see below): ``"copy"`` (default)
            loads them into a deep copy of ``model`` (``self.model``) and leaves yours untouched; ``"in_place"``
            loads them into ``model`` itself (no second copy in memory; every later decode of ``model``, with or
            without FDM, then uses them). Ignored for FDMs without decoder weights (the model is used as given).

    A phase-3 FDM (``fdm_module.finetuned_decoder``) carries the decoder fine-tuned with it
    (``fdm_module.decoder_state``, read by ``FDM.from_pretrained``) and is only valid with it. Such an FDM
    without its decoder weights raises :class:`~fdm.errors.CheckpointError`. With ``load_decoder="copy"`` and a
    given ``adapter``, the adapter is re-created for the copy (``type(adapter)(copy)``).

    Mixed precision: call any method under ``fdm.precision.autocast(x.device, "bf16")`` (or ``"fp16"``); the
    weights stay float32, the inputs' dtype checks accept autocast, and the nearest-code search leaves it
    (:meth:`quantize`).

    Example:
        >>> deq = fdm.Dequantizer(vqgan, fdm.FDM.from_pretrained("user/fdm-vqgan"))  # doctest: +SKIP
        >>> image = deq.reconstruct(x)                                                 # doctest: +SKIP
        >>> with deq.attached():                                                       # doctest: +SKIP
        ...     samples = transformer.decode_to_img(indices, zshape)  # corrected by FDM
    """

    def __init__(
        self,
        model: nn.Module,
        fdm_module: FDM,
        *,
        adapter: VQAdapter | None = None,
        check_fingerprint: bool = True,
        load_decoder: str = "copy",
    ):
        super().__init__()
        if not isinstance(fdm_module, FDM):
            raise TypeError(f"fdm_module must be an fdm.FDM; got {type(fdm_module).__name__}.")
        if load_decoder not in ("copy", "in_place"):
            raise InputError(f"load_decoder must be 'copy' or 'in_place'; got {load_decoder!r}.")
        self.adapter = adapter if adapter is not None else find_adapter(model)
        self.model = model
        self.fdm = fdm_module
        check_fdm_fits(fdm_module, self.adapter.channels)
        if not fdm_module.base_model_fingerprint:
            warnings.warn(
                "This FDM records no base-model fingerprint, so nothing checks that it was trained for this model: it "
                f"attaches to any model with {fdm_module.channels}-channel features. Use FDMs saved by fdm-vq's "
                "trainers (they record the codebook fingerprint) or set fdm_module.base_model_fingerprint.",
                UserWarning, stacklevel=2,
            )
        elif check_fingerprint:
            actual = self.adapter.fingerprint()
            if actual != fdm_module.base_model_fingerprint:
                raise FingerprintMismatchError(
                    f"This FDM was trained for base model {fdm_module.base_model or '(unnamed)'} with codebook "
                    f"fingerprint {fdm_module.base_model_fingerprint}, but the model given has {actual}. "
                    "Load the matching FDM, or pass check_fingerprint=False if you are sure it fits."
                )
        if fdm_module.finetuned_decoder:  # phase 3: the FDM is only valid with the decoder trained with it
            if fdm_module.decoder_state is None:
                raise CheckpointError(
                    "This FDM was fine-tuned jointly with the decoder (phase 3) and is not valid with the model's "
                    "original decoder, but it carries no decoder weights. Load it with FDM.from_pretrained(...), "
                    "which reads decoder.safetensors from the same folder or repo."
                )
            if load_decoder == "copy":
                model = copy.deepcopy(model)
                self.adapter = type(self.adapter)(model)
                self.model = model
            apply_decoder_state(self.adapter, fdm_module.decoder_state, source="fine-tuned decoder of this FDM")
        self._hook: Any = None  # handle from adapter.register_correction_hook
        self._attached_mask: torch.Tensor | None = None
        self._bypass_hook = False  # True while an explicit decode runs (its features are corrected already)

    @property
    def factor(self) -> int:
        """Downsampling factor of the wrapped model."""
        return self.adapter.factor

    def prepare(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, pad: bool = True, check_finite: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Check an image batch ``x`` (B, 3, H, W) and its hole mask (B, 1, H, W) and pad both to multiples of
        the factor: what :meth:`encode` and :meth:`reconstruct` feed the model.

        H and W may be any size: ``x`` is padded at the bottom and right (:func:`fdm.padding.pad_image`: reflect,
        replicate for a side shorter than its padding), ``mask`` with 0, i.e. the padding is known
        (:func:`fdm.padding.pad_mask`). ``pad=False`` refuses sizes that are not multiples of the factor.
        ``check_finite=False`` skips the NaN/Inf check of ``x`` (one device sync) in tight loops over trusted data.

        Returns:
            ``(x, mask)`` padded; the tensors given when H and W are multiples of the factor already.

        Raises:
            InputError: wrong shape, an empty batch, a dtype other than the model's (see
                :func:`fdm.validation.check_dtype`), NaN/Inf values in ``x``, a mask that is not binary or not
                ``x``'s size, or (``pad=False``) a size that is not a multiple of the factor.
        """
        check_image(x, factor=None if pad else self.factor, name="x")
        check_dtype(x, self.adapter.dtype, name="x")
        if check_finite:
            _check_finite(x, name="x")
        if mask is not None:
            check_pixel_mask(mask, x)  # the one check of the mask (later steps take it as checked)
        if not pad:
            return x, mask
        return pad_image(x, self.factor), None if mask is None else pad_mask(mask, self.factor)

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, pad: bool = True,
               check_finite: bool = True) -> torch.Tensor:
        """(B, 3, H, W) image in [-1, 1] -> (B, C, ceil(H/f), ceil(W/f)) continuous feature ``z``.

        Any H and W: ``z`` is the feature of ``x`` padded to multiples of the factor (:meth:`prepare`); cell
        ``(i, j)`` covers the same pixels as without padding, the last row and column also cover padding. Decode
        it back to ``x``'s size with ``decode(z_q, size=x.shape[-2:])``. ``pad=False`` refuses sizes that are not
        multiples of the factor. With ``mask`` (B, 1, H, W), 1 = hole, the features whose known cells an
        inpainting keeps (:meth:`~fdm.VQAdapter.encode_known`: PUT encodes the masked image; other models the
        whole image). ``check_finite``: see :meth:`prepare`.

        Raises:
            InputError: see :meth:`prepare`.
        """
        x, mask = self.prepare(x, mask, pad=pad, check_finite=check_finite)
        z = self.adapter.encode(x)
        return z if mask is None else self.adapter.encode_known(x, mask, z)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` (B, C, h, w) -> (``z_q`` (B, C, h, w), indices (B, h, w); (B, h, w, L) for a residual quantizer).

        The nearest-code search runs in the model's dtype with autocast off, also inside an autocast region
        (see :mod:`fdm.precision`): half-precision distances pick other codes.
        """
        check_latent(z, self.adapter.channels)
        return quantize(self.adapter, z)

    def cell_mask(self, mask: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor | None:
        """Resolve a pixel hole mask (B, 1, H, W) or a latent-cell mask (B, 1, h, w) to the latter, checking its
        shape and its values (0 and 1).

        A pixel mask may have the size of the image before padding (any H, W with ``ceil(H / f) = h`` and
        ``ceil(W / f) = w``, see :meth:`encode`); it is padded as known (:func:`fdm.padding.pad_mask`).
        """
        if mask is not None:
            check_binary_mask(mask)
        return self._cells(mask, z)

    def _cells(self, mask: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor | None:
        """:meth:`cell_mask` of a mask whose values were checked (shapes are checked here)."""
        if mask is None:
            return None
        h, w = z.shape[-2:]
        f = self.factor
        if mask.dim() == 4 and mask.shape[-2:] == (h, w):
            check_latent_mask_shape(mask, z)
            return mask.to(z.dtype)
        if mask.dim() == 4 and (padded_size(mask.shape[-2], f), padded_size(mask.shape[-1], f)) == (h * f, w * f):
            return pool_cells(pad_mask(mask, f), f).to(z.dtype)
        raise InputError(
            f"mask must be a pixel mask (B, 1, {h * f}, {w * f}) (or of the image's size before padding: height "
            f"{(h - 1) * f + 1} to {h * f}, width {(w - 1) * f + 1} to {w * f}) or a latent-cell mask (B, 1, {h}, "
            f"{w}) for features of shape {tuple(z.shape)}; got {tuple(mask.shape)}."
        )

    def correct(self, z_q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Apply FDM: ``z_q + F([z_q, m]) * m``; ``mask`` is a pixel or latent-cell mask, None = all cells."""
        return self.fdm(z_q, self.cell_mask(mask, z_q), check_binary=False)  # cell_mask checked it

    def decode(self, z_q: torch.Tensor, mask: torch.Tensor | None = None, *, image: torch.Tensor | None = None,
               size: tuple[int, int] | None = None, **model_kwargs: Any) -> torch.Tensor:
        """Decode ``z_q`` (B, C, h, w) with FDM applied -> (B, 3, h f, w f) image in [-1, 1], or (B, 3, H, W) with
        ``size``.

        Args:
            z_q: quantized map; on known cells it may hold continuous features (inpainting).
            mask: pixel hole mask (B, 1, h f, w f), or of the image's size before padding (see :meth:`cell_mask`),
                or latent-cell mask (B, 1, h, w); None = every cell generated.
            image: (B, 3, H, W) the image being inpainted, for decoders guided by its known pixels (PUT): the
                model's guide is built from it and the pixel ``mask`` (``adapter.decode_guide``, both padded as
                :meth:`encode` pads them). Decoders that read only the features ignore it.
            size: (H, W) of the image whose padded feature ``z_q`` is (:meth:`encode`): the decoded image is
                cropped to it (:func:`fdm.padding.crop`); None keeps (h f, w f).
            **model_kwargs: passed to the adapter's decode as they are (after the guide built from ``image``).
        """
        z_dq = self.correct(z_q, mask)
        if image is not None:
            model_kwargs = {**self._guide(image, mask), **model_kwargs}
        return crop(self._decode_raw(z_dq, **model_kwargs), size, self.factor)

    def _guide(self, image: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
        """The decoder's guide for ``image`` with pixel holes ``mask`` (values checked already by the caller)."""
        check_image(image, factor=None, name="image")
        image = pad_image(image, self.factor)
        if mask is not None:
            mask = pad_mask(mask, self.factor)
            check_pixel_mask_shape(mask, image, name="mask (a pixel mask of image's size, with image=)")
        return self.adapter.decode_guide(image, mask)

    def decode_indices(
        self, indices: torch.Tensor, mask: torch.Tensor | None = None, *, size: tuple[int, int] | None = None,
        **model_kwargs: Any
    ) -> torch.Tensor:
        """Look up code ``indices`` (B, h, w) and decode them with FDM applied (see :meth:`decode`, also for
        ``size``, which crops the image to the size given to :meth:`encode`). A residual quantizer of L levels
        (:attr:`~fdm.VQAdapter.code_levels`) takes (B, h, w, L).

        Raises:
            InputError: not an integer (B, h, w) ((B, h, w, L)) tensor, empty, or ids outside
                ``[0, codebook size)``.
        """
        levels = self.adapter.code_levels
        shape = "(B, h, w)" if levels == 1 else f"(B, h, w, {levels})"
        if indices.dim() != 3 + (levels > 1) or (levels > 1 and indices.shape[-1] != levels) \
                or indices.is_floating_point() or indices.dtype == torch.bool:
            raise InputError(f"indices must be an integer tensor of shape {shape}; got {tuple(indices.shape)}, "
                             f"dtype {indices.dtype}.")
        if indices.numel() == 0:
            raise InputError(f"indices is empty (shape {tuple(indices.shape)}); expected at least one code.")
        codes = self.adapter.codebook().shape[0]
        low, high = torch.stack(torch.aminmax(indices)).tolist()  # one device sync
        if low < 0 or high >= codes:
            raise InputError(f"indices must lie in [0, {codes}) (the codebook has {codes} codes); got values from "
                             f"{low} to {high}.")
        return self.decode(self.adapter.lookup(indices), mask, size=size, **model_kwargs)

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, use_fdm: bool = True,
                    pad: bool = True, check_finite: bool = True) -> torch.Tensor:
        """Encode, quantize and decode ``x`` (B, 3, H, W) in [-1, 1] -> (B, 3, H, W).

        Without a mask every cell is quantized (plain VQ reconstruction). With a hole mask (B, 1, H, W),
        known cells keep their continuous features and hole cells get the nearest codes of the whole image's
        features: an oracle stand-in for a sampler, which shows what FDM does on generated cells next to known
        ones (:mod:`fdm.pipeline`). ``use_fdm=False`` gives the same without FDM, for comparison. Any H and W:
        ``x`` and ``mask`` are padded to multiples of the factor and the result cropped back (:meth:`prepare`;
        bit-identical to no padding when they are multiples already); ``pad=False`` refuses other sizes.
        ``check_finite``: see :meth:`prepare`.
        """
        lat = self.latents(x, mask, pad=pad, check_finite=check_finite)
        z_in = lat.z_in
        return self.decode_latents(lat, self.fdm(z_in, lat.cells, check_binary=False) if use_fdm else z_in)

    def latents(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, pad: bool = True,
                check_finite: bool = True) -> Latents:
        """Check ``x`` and ``mask`` once and pad them (:meth:`prepare`), then encode and quantize them
        (:func:`fdm.pipeline.encode_latents`): the first half of :meth:`reconstruct`, which ``fdm eval`` and the
        training checks share."""
        padded, padded_mask = self.prepare(x, mask, pad=pad, check_finite=check_finite)
        return encode_latents(self.adapter, padded, padded_mask, size=tuple(x.shape[-2:]))

    def decode_latents(self, latents: Latents, features: torch.Tensor) -> torch.Tensor:
        """Decode ``features`` (B, C, h, w) of a :meth:`latents` batch as given (no FDM; an attached hook is
        lifted) with the batch's guide -> (B, 3, H, W), cropped to the batch's image size."""
        return crop(self._decode_raw(features, **latents.guide), latents.size, self.factor)

    def _decode_raw(self, z: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        """Decode ``z`` as given: an attached hook passes its input through for the call (it stays registered where
        it is, before or after hooks added by others), so it does not correct ``z`` again."""
        bypassed, self._bypass_hook = self._bypass_hook, True
        try:
            return self.adapter.decode(z, **model_kwargs)
        finally:
            self._bypass_hook = bypassed

    # --- hooking the model's own decode path ---------------------------------------------------------

    def attach(self, mask: torch.Tensor | None = None) -> Dequantizer:
        """Install FDM on the model's own decode path (a forward pre-hook on the module receiving z_q).

        Args:
            mask: pixel or latent-cell hole mask for the decodes that follow; None = all cells generated. Its
                values are checked here, once; its shape at each decode (against the map being decoded).
        """
        if mask is not None:
            check_binary_mask(mask)
        self._attached_mask = mask
        if self._hook is None:
            self._hook = self.adapter.register_correction_hook(self._hooked_correction)
        return self

    def detach(self) -> Dequantizer:
        """Remove the hook; the model decodes exactly as it did before :meth:`attach`."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._attached_mask = None
        return self

    @property
    def is_attached(self) -> bool:
        return self._hook is not None

    @contextlib.contextmanager
    def attached(self, mask: torch.Tensor | None = None) -> Iterator[Dequantizer]:
        """Context manager: :meth:`attach` on entry, :meth:`detach` on exit (also on error)."""
        self.attach(mask)
        try:
            yield self
        finally:
            self.detach()

    def _hooked_correction(self, z_q: torch.Tensor) -> torch.Tensor:
        if self._bypass_hook:
            return z_q
        cells = self._cells(self._attached_mask, z_q)  # attach checked its values
        return self.fdm(z_q, cells, check_binary=False)
