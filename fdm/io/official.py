"""Key mapping between the FDM weights released with the paper (hyudsl/FDM, WACV 2025) and :class:`fdm.FDM`.

The official module is one ``nn.Sequential`` named ``mix``: ``mix.0`` conv3x3 (C+1 -> C), ``mix.1`` ReLU,
``mix.2`` .. ``mix.9`` residual blocks (``conv.0`` conv3x3 C -> C/2, ``conv.2`` conv1x1 C/2 -> C),
``mix.10`` conv3x3 C -> C. Checkpoints store it under ``fdm.mix.*`` (older releases ``lip.mix.*``), inside
``{'model': state_dict}`` next to the codec (``content_codec.*``), the sampler (``generator.*``) and ``loss.*``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from fdm.errors import CheckpointError
from fdm.io.torch_files import read_checkpoint
from fdm.io.weights import check_state_dict, load_state_dict_strict

FDMType = TypeVar("FDMType", bound=nn.Module)  # fdm.FDM (not imported here: fdm.module imports this module)

__all__ = [
    "OFFICIAL_PREFIXES",
    "fdm_to_official_state_dict",
    "load_official_fdm",
    "official_key",
    "official_to_fdm_state_dict",
]

OFFICIAL_PREFIXES = ("fdm.mix.", "lip.mix.")
_NUM_BLOCKS = 8
_HEAD_INDEX = 2 + _NUM_BLOCKS
_BLOCK_KEY = re.compile(r"^(\d+)\.conv\.([02])\.(weight|bias)$")


def _official_module_dict(source: str | Path | dict) -> tuple[dict[str, torch.Tensor], str]:
    """The ``mix.*`` tensors of an official checkpoint keyed without the ``fdm.mix.`` / ``lip.mix.`` prefix, and
    that prefix."""
    obj = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    if not isinstance(obj, dict):
        raise CheckpointError(f"Expected a state dict or {{'model': state_dict}}; got {type(obj).__name__}.")
    state = check_state_dict(obj.get("model", obj.get("state_dict", obj)), source="official FDM checkpoint")
    for prefix in OFFICIAL_PREFIXES:
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found, prefix
    sample = sorted(state)[:5]
    raise CheckpointError(
        f"No FDM weights in this checkpoint: expected keys starting with {' or '.join(OFFICIAL_PREFIXES)}; "
        f"found keys such as {sample}."
    )


def _to_fdm_keys(mix: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], int]:
    if "0.weight" not in mix:
        raise CheckpointError(f"The official FDM weights lack {prefix}0.weight (the first conv); found keys such as "
                              f"{[prefix + k for k in sorted(mix)[:6]]}.")
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
            unexpected.append(prefix + key)
    if unexpected:
        raise CheckpointError(f"Unexpected keys in the official FDM weights (read as the official {prefix}* "
                              f"layout: {prefix}0, {prefix}2..9.conv.{{0,2}}, {prefix}10): {sorted(unexpected)}.")
    if mix["0.weight"].dim() != 4 or mix["0.weight"].shape[1] != channels + 1:
        raise CheckpointError(
            f"{prefix}0.weight should take {channels} feature channels + 1 mask channel; got shape "
            f"{tuple(mix['0.weight'].shape)}."
        )
    return mapped, channels


def official_to_fdm_state_dict(source: str | Path | dict) -> tuple[dict[str, torch.Tensor], int]:
    """Map an official FDM checkpoint to :class:`fdm.FDM` keys.

    Args:
        source: path of a ``{'model': state_dict}`` file, or a (possibly nested) state dict.

    Returns:
        (state dict with ``stem.* / blocks.N.{reduce,expand}.* / head.*`` keys, channel count C).

    Raises:
        CheckpointError: keys are missing, unexpected or mis-shaped for the official layout (named as the file
            spells them).
    """
    return _to_fdm_keys(*_official_module_dict(source))


def official_key(key: str, prefix: str = "fdm.") -> str:
    """How the official layout spells the :class:`fdm.FDM` key ``key`` (``blocks.2.expand.weight`` ->
    ``fdm.mix.4.conv.2.weight``); keys of no official counterpart are returned unchanged."""
    layer, _, rest = key.partition(".")
    if layer == "stem":
        return f"{prefix}mix.0.{rest}"
    if layer == "head":
        return f"{prefix}mix.{_HEAD_INDEX}.{rest}"
    if layer == "blocks" and (m := re.match(r"^(\d+)\.(reduce|expand)\.(\w+)$", rest)):
        conv = "0" if m.group(2) == "reduce" else "2"
        return f"{prefix}mix.{int(m.group(1)) + 2}.conv.{conv}.{m.group(3)}"
    return key


def load_official_fdm(cls: type[FDMType], source: str | Path | dict, **config: Any) -> FDMType:
    """Build ``cls`` (:class:`fdm.FDM`) from an official checkpoint: the implementation of
    :meth:`fdm.FDM.from_official_checkpoint`. Errors name keys as the file spells them (``fdm.mix.4.conv.2.weight``).
    """
    mix, prefix = _official_module_dict(source)
    state_dict, channels = _to_fdm_keys(mix, prefix)
    module = cls(channels=channels, mask_channels=1, hidden_channels=channels, num_blocks=_NUM_BLOCKS, **config)
    what = f"official FDM checkpoint {source}" if isinstance(source, (str, Path)) else "official FDM weights"
    root = prefix.removesuffix("mix.")
    load_state_dict_strict(module, state_dict, source=what, file_key=lambda key: official_key(key, root),
                           layout=f"official FDM {prefix}*")
    return module.eval()


def fdm_to_official_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "fdm.") -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_fdm_state_dict` for an 8-block FDM: keys ``{prefix}mix.*``."""
    out = {}
    for key, tensor in state_dict.items():
        official = official_key(key, prefix)
        if official == key:
            raise CheckpointError(f"Not an FDM key: {key}")
        out[official] = tensor
    return out
