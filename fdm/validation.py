"""Input checks shared by the public API: each raises :class:`fdm.errors.InputError` saying what was
expected and what arrived, instead of letting a wrong shape produce a silently wrong result."""

from __future__ import annotations

import torch

from fdm.errors import FingerprintMismatchError, InputError

__all__ = [
    "check_binary_mask", "check_dtype", "check_fdm_fits", "check_finite", "check_image", "check_latent",
    "check_latent_mask_shape", "check_pixel_mask_shape",
    "check_latent_mask", "check_pixel_mask",
]


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    return x


def check_image(x: torch.Tensor, *, factor: int | None = None, name: str = "image") -> None:
    """Check a (B, 3, H, W) floating-point image batch with H, W multiples of ``factor``.

    The [-1, 1] range is the library's convention; it is not checked here (a value check would sync
    the device on every call), but NaN/Inf is rejected by :func:`check_finite` where data enters training.
    """
    _check_tensor(x, name)
    if x.dim() != 4 or x.shape[1] != 3:
        hint = " Add a batch dimension with x.unsqueeze(0)." if x.dim() == 3 and x.shape[0] == 3 else ""
        raise InputError(f"{name} must have shape (B, 3, H, W); got {_shape(x)}.{hint}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor in [-1, 1]; got dtype {x.dtype}.")
    _check_not_empty(x, name)
    if factor is not None:
        h, w = x.shape[-2:]
        if h % factor or w % factor:
            raise InputError(
                f"{name} size {h}x{w} is not a multiple of the downsampling factor {factor}; crop or pad to "
                f"{h - h % factor or factor}x{w - w % factor or factor}."
            )


def check_latent(z: torch.Tensor, channels: int, *, name: str = "z") -> None:
    """Check a (B, C, h, w) latent map with ``C == channels``."""
    _check_tensor(z, name)
    if z.dim() != 4:
        raise InputError(f"{name} must have shape (B, {channels}, h, w); got {_shape(z)}.")
    if z.shape[1] != channels:
        raise InputError(f"{name} must have {channels} channels (shape (B, {channels}, h, w)); got {_shape(z)}.")
    if not z.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor; got dtype {z.dtype}.")
    _check_not_empty(z, name)


def _check_not_empty(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0:
        raise InputError(f"{name} is empty (shape {_shape(x)}); expected at least one image and one pixel / cell.")


def check_dtype(x: torch.Tensor, expected: torch.dtype, *, name: str = "image") -> None:
    """Check that ``x`` has the model's dtype (``expected``).

    Models in float16, bfloat16 or float64 are supported by moving them (``model.to(dtype)``) and passing inputs of
    that dtype; under ``torch.autocast`` any floating-point input is accepted, autocast choosing the precision.
    """
    if x.dtype != expected and not torch.is_autocast_enabled(x.device.type):
        raise InputError(f"{name} has dtype {x.dtype} but the model's weights are {expected}; convert the input "
                         f"with .to({expected}), move the model with .to({x.dtype}), or run under torch.autocast.")


def check_binary_mask(mask: torch.Tensor, *, name: str = "mask") -> None:
    """Check that a hole mask holds only 0 and 1 (bool masks pass as they are).

    This is the library's one binary check of a mask; it reads the values, so it is a device sync. Public entry
    points run it once per call (through :func:`check_pixel_mask`, :func:`check_latent_mask` or
    :func:`fdm.latent_mask`); the steps behind them check shapes only.
    """
    if _check_tensor(mask, name).dtype == torch.bool:
        return
    if not torch.all((mask == 0) | (mask == 1)):
        values = torch.unique(mask.detach().flatten()[:1000].float().cpu())[:5].tolist()
        raise InputError(
            f"{name} must be binary (0 or 1, 1 = hole); got values such as {values}. "
            "Threshold it first, e.g. (mask > 0.5).float()."
        )


def check_pixel_mask_shape(mask: torch.Tensor, image: torch.Tensor, *, name: str = "mask") -> None:
    """Check that a (B, 1, H, W) hole mask matches ``image`` (B, 3, H, W); its values are not read."""
    _check_tensor(mask, name)
    b, _, h, w = image.shape
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (h, w) or mask.shape[0] not in (1, b):
        raise InputError(f"{name} must have shape ({b}, 1, {h}, {w}) to match the image; got {_shape(mask)}.")


def check_pixel_mask(mask: torch.Tensor, image: torch.Tensor, *, name: str = "mask") -> None:
    """Check a binary (B, 1, H, W) hole mask (1 = hole) that matches ``image`` (B, 3, H, W): shape and values."""
    check_pixel_mask_shape(mask, image, name=name)
    check_binary_mask(mask, name=name)


def check_latent_mask_shape(mask: torch.Tensor, z: torch.Tensor, *, name: str = "mask") -> None:
    """Check that a (B, 1, h, w) latent-cell mask matches ``z`` (B, C, h, w); its values are not read."""
    _check_tensor(mask, name)
    b, _, h, w = z.shape
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (h, w) or mask.shape[0] not in (1, b):
        raise InputError(
            f"{name} must be a latent-cell mask of shape ({b}, 1, {h}, {w}) to match the feature map "
            f"{_shape(z)}; got {_shape(mask)}. Convert pixel masks with fdm.latent_mask(mask, factor)."
        )


def check_latent_mask(mask: torch.Tensor, z: torch.Tensor, *, name: str = "mask") -> None:
    """Check a binary (B, 1, h, w) latent-cell mask (1 = generated cell) that matches ``z``: shape and values."""
    check_latent_mask_shape(mask, z, name=name)
    check_binary_mask(mask, name=name)


def check_finite(x: torch.Tensor, *, name: str = "image") -> None:
    """Reject tensors holding NaN or Inf."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name} holds {bad} NaN/Inf values; expected finite numbers.")


def check_fdm_fits(fdm_module: torch.nn.Module, channels: int, *, masked: bool = False) -> None:
    """Check that an FDM can serve a base model whose quantized map has ``channels`` channels and, with ``masked``,
    that it takes the cell-mask input that training with hole masks feeds it.

    Raises:
        FingerprintMismatchError: the FDM works on another number of channels (it was made for another model).
        InputError: ``masked`` but the FDM has no mask input (``mask_channels=0``).
    """
    if fdm_module.channels != channels:
        raise FingerprintMismatchError(
            f"The FDM works on {fdm_module.channels}-channel features but the model's quantized map has {channels} "
            "channels: this FDM was made for another base model."
        )
    if masked and fdm_module.mask_channels == 0:
        raise InputError("training with hole masks (hole_ratio set) needs an FDM with mask_channels=1; "
                         "set hole_ratio=None for mask-free training.")
