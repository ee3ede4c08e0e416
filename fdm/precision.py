"""Mixed precision for training and inference: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (``--precision``).

A precision other than fp32 runs the forward passes under :func:`torch.autocast` of the tensors' device type
(CUDA, CPU, or any device autocast supports): convolutions and matrix products compute in bfloat16 or float16,
while the weights, the gradients and the optimizer state stay float32, and so do the checkpoints and the saved
FDM. fp16 also needs gradient scaling (:func:`grad_scaler`): its 5-bit exponent lets small gradients underflow
to zero. bf16 has float32's exponent range and needs none.

Numerics, what stays float32 whatever the precision:

- the frozen encoder and the nearest-code search: phase 2 caches and phase 3 encodes its features outside
  autocast, and :meth:`fdm.Dequantizer.quantize` leaves autocast for the search (a bfloat16 distance chose
  another code for 17 % of the demo model's latent cells);
- FDM's skip connection: ``z_q + F([z_q, m]) * m`` adds a low-precision residual to the float32 ``z_q``, so under
  autocast ``z_dq`` is float32 and only the predicted correction is rounded (to about 3 significant digits in
  bf16);
- the losses: the qe loss is the float32 mean of ``|z_dq - z|``; L1, gradient, perceptual and adversarial terms
  cast their inputs (reconstructions, backbone activations, discriminator logits) to float32 before subtracting
  and reducing, and the style term's Gram matrices are computed with autocast off (:func:`full_precision`): in
  float16 their sums over ``h * w`` products can overflow;
- the metrics (PSNR, SSIM, feature error ratio, ST-LPIPS, FID) run on float32 copies of the images and features,
  outside autocast.

Devices: bf16 is the choice on NVIDIA GPUs from Ampere on and on CPUs with bfloat16 instructions (AVX512-BF16,
AMX); fp16 is for older GPUs. On a CPU without them (AVX2 only) bfloat16 is emulated: 12x to 140x slower than
fp32 in ``benchmarks/precision.py`` (docs/training.md, Mixed precision), so use fp32 there. On CPU, fp16 autocast
covers fewer operations and is not a speed-up either: it is supported (the same code path, tested), for checks.

Library use, around any call of the :class:`~fdm.Dequantizer` (whose dtype checks accept autocast)::

    with fdm.precision.autocast(x.device, "bf16"):
        image = dequantizer.reconstruct(x)   # float32 weights, bfloat16 compute; .float() the result
"""

from __future__ import annotations

import contextlib

import torch

from fdm.errors import InputError

__all__ = ["PRECISIONS", "autocast", "check_precision", "full_precision", "grad_scaler", "load_scaler_state"]

PRECISIONS = ("fp32", "bf16", "fp16")
"""The precisions ``--precision`` accepts: float32, bfloat16 autocast, float16 autocast with gradient scaling."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`.

    Raises:
        InputError: anything else (the message names the allowed values).
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    return precision


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Context in which forward passes on ``device`` run at ``precision``: :func:`torch.autocast` of the device's
    type with bfloat16 or float16, a null context for fp32 (an enclosing autocast then stays in force)."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(_device_type(device), dtype=_DTYPES[precision])


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Context with autocast switched off on ``device``'s type: operations run in their inputs' dtype."""
    return torch.autocast(_device_type(device), enabled=False)


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A :class:`torch.amp.GradScaler` for ``device`` that scales only for fp16 (for fp32 and bf16 it is disabled:
    ``scale``, ``step`` and ``update`` then pass through)."""
    return torch.amp.GradScaler(_device_type(device), enabled=check_precision(precision) == "fp16")


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict | None) -> None:
    """Restore ``scaler`` from a checkpoint's ``scaler.state_dict()``.

    A run may resume at another precision: when either side is not fp16 (``scaler`` disabled, or ``state`` empty
    or missing, as saved by a disabled scaler or an older checkpoint), ``scaler`` keeps its fresh state.
    """
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)
