"""The fine-tuned decoder of a phase-3 FDM (joint FDM + decoder fine-tuning, WACV 2025): its weights, written
as ``decoder.safetensors`` next to the FDM's ``model.safetensors`` (same folder, same Hub repo), and loading
them into a base model's :meth:`~fdm.VQAdapter.decoder_modules`.

Keys are ``<module name>.<parameter>``, module names being those of ``adapter.decoder_modules()``
(``post_quant_conv.weight``, ``decoder.conv_in.bias``...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fdm.adapter import VQAdapter
from fdm.errors import CheckpointError
from fdm.io.hub import resolve_file
from fdm.io.weights import load_state_dict_strict, read_safetensors, write_weights

__all__ = ["DECODER_WEIGHTS_NAME", "apply_decoder_state", "decoder_state_dict", "read_decoder_weights",
           "save_decoder_weights"]

DECODER_WEIGHTS_NAME = "decoder.safetensors"


def decoder_state_dict(adapter: VQAdapter) -> dict[str, torch.Tensor]:
    """The weights of ``adapter.decoder_modules()`` as one flat CPU state dict."""
    return {k: v.detach().cpu().clone() for k, v in nn.ModuleDict(adapter.decoder_modules()).state_dict().items()}


def apply_decoder_state(adapter: VQAdapter, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``adapter.decoder_modules()`` in place, every key and shape checked.

    Raises:
        CheckpointError: naming missing, unexpected and mis-shaped keys (another base model's decoder).
    """
    load_state_dict_strict(nn.ModuleDict(adapter.decoder_modules()), state, source=source)


def save_decoder_weights(directory: str | Path, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` to ``<directory>/decoder.safetensors`` and return the path."""
    return write_weights(state, Path(directory) / DECODER_WEIGHTS_NAME)


def read_decoder_weights(model_id: str | Path, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """Read ``decoder.safetensors`` from a local folder or a Hub repo.

    Args:
        model_id: folder written by ``save_pretrained`` or Hub repo id.
        **hub_kwargs: ``revision``, ``cache_dir``, ``force_download``, ``token``, ``local_files_only``
            (see :func:`fdm.io.hub.resolve_file`).

    Raises:
        CheckpointError: the file is absent (a phase-3 FDM is not valid without it) or unreadable.
    """
    try:
        path = resolve_file(model_id, DECODER_WEIGHTS_NAME, **hub_kwargs)
    except CheckpointError as err:
        raise CheckpointError(f"{_missing_message(str(model_id))} ({err})") from err
    return read_safetensors(path, require_digest=True, require_finite=True)


def _missing_message(model_id: str) -> str:
    return (
        f"{model_id} holds an FDM fine-tuned jointly with the decoder (phase 3, config finetuned_decoder=true) but "
        f"no {DECODER_WEIGHTS_NAME}: such an FDM is not valid with the original decoder. Re-save it with its "
        "decoder (fdm.training.phase3 writes both) or use the phase-2 FDM."
    )
