"""Key mapping between the FDM weights released with the paper (hyudsl/FDM, WACV 2025) and :class:`fdm.FDM`.

The official module is one ``nn.Sequential`` named ``mix``: ``mix.0`` conv3x3 (C+1 -> C), ``mix.1`` ReLU,
``mix.2`` .. ``mix.9`` residual blocks (``conv.0`` conv3x3 C -> C/2, ``conv.2`` conv1x1 C/2 -> C),
``mix.10`` conv3x3 C -> C. Checkpoints store it under ``fdm.mix.*`` (older releases ``lip.mix.*``), inside
``{'model': state_dict}`` next to the codec (``content_codec.*``), the sampler (``generator.*``) and ``loss.*``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fdm.checkpoint import read_checkpoint
from fdm.errors import CheckpointError

__all__ = ["OFFICIAL_PREFIXES", "fdm_to_official_state_dict", "official_to_fdm_state_dict"]

OFFICIAL_PREFIXES = ("fdm.mix.", "lip.mix.")
_NUM_BLOCKS = 8
_HEAD_INDEX = 2 + _NUM_BLOCKS
_BLOCK_KEY = re.compile(r"^(\d+)\.conv\.([02])\.(weight|bias)$")


def _official_module_dict(source: str | Path | dict) -> dict[str, torch.Tensor]:
    """The ``mix.*`` tensors of an official checkpoint, keyed without the ``fdm.`` / ``lip.`` prefix."""
    obj = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    if not isinstance(obj, dict):
        raise CheckpointError(f"Expected a state dict or {{'model': state_dict}}; got {type(obj).__name__}.")
    state = obj.get("model", obj.get("state_dict", obj))
    for prefix in OFFICIAL_PREFIXES:
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found
    sample = sorted(state)[:5]
    raise CheckpointError(
        f"No FDM weights in this checkpoint: expected keys starting with {' or '.join(OFFICIAL_PREFIXES)}; "
        f"found keys such as {sample}."
    )


def official_to_fdm_state_dict(source: str | Path | dict) -> tuple[dict[str, torch.Tensor], int]:
    """Map an official FDM checkpoint to :class:`fdm.FDM` keys.

    Args:
        source: path of a ``{'model': state_dict}`` file, or a (possibly nested) state dict.

    Returns:
        (state dict with ``stem.* / blocks.N.{reduce,expand}.* / head.*`` keys, channel count C).

    Raises:
        CheckpointError: keys are missing, unexpected or mis-shaped for the official layout.
    """
    mix = _official_module_dict(source)
    if "0.weight" not in mix:
        raise CheckpointError(f"Official FDM weights lack mix.0.weight; found {sorted(mix)[:6]}...")
    channels = mix["0.weight"].shape[0]
    mapped: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in mix.items():
        index, _, rest = key.partition(".")
        if index == "0":
            mapped[f"stem.{rest}"] = tensor
        elif index == str(_HEAD_INDEX):
            mapped[f"head.{rest}"] = tensor
        elif (m := _BLOCK_KEY.match(key)) and 2 <= int(m.group(1)) < _HEAD_INDEX:
            layer = "reduce" if m.group(2) == "0" else "expand"
            mapped[f"blocks.{int(m.group(1)) - 2}.{layer}.{m.group(3)}"] = tensor
        else:
            unexpected.append(f"mix.{key}")
    if unexpected:
        raise CheckpointError(f"Unexpected keys in the official FDM weights: {unexpected}.")
    if mix["0.weight"].shape[1] != channels + 1:
        raise CheckpointError(
            f"mix.0.weight should take {channels} feature channels + 1 mask channel; got shape "
            f"{tuple(mix['0.weight'].shape)}."
        )
    return mapped, channels


def fdm_to_official_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "fdm.") -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_fdm_state_dict` for an 8-block FDM: keys ``{prefix}mix.*``."""
    out = {}
    for key, tensor in state_dict.items():
        layer, _, rest = key.partition(".")
        if layer == "stem":
            out[f"{prefix}mix.0.{rest}"] = tensor
        elif layer == "head":
            out[f"{prefix}mix.{_HEAD_INDEX}.{rest}"] = tensor
        elif layer == "blocks":
            index, name, param = rest.split(".")
            conv = "0" if name == "reduce" else "2"
            out[f"{prefix}mix.{int(index) + 2}.conv.{conv}.{param}"] = tensor
        else:
            raise CheckpointError(f"Not an FDM key: {key}")
    return out
