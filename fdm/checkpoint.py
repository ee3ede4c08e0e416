"""Safe reading of weight files: safetensors, ``torch.load(weights_only=True)``, and a restricted
unpickler for old Lightning ``.ckpt`` files whose pickled callback objects ``weights_only`` refuses.

Nothing here executes code from a checkpoint: unknown pickled classes become inert placeholders.
"""

from __future__ import annotations

import logging
import pickle
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fdm.errors import CheckpointError

__all__ = ["OpaqueObject", "load_state_dict_strict", "read_checkpoint", "read_safetensors"]

logger = logging.getLogger(__name__)

_TORCH_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("_codecs", "encode"),
}


class OpaqueObject:
    """Stands in for a pickled object of a class that is not allowed (a Lightning callback, say).

    It records the class name and the constructor arguments / state / items it was given, and does nothing
    else. Pickles also call, fill or extend the objects they rebuild (``getattr(cls, name)(...)`` for methods,
    SETITEMS for dict subclasses such as Lightning's AttributeDict): a placeholder records those too.
    """

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:  # pickle's NEWOBJ calls __new__ without __init__
        obj = super().__new__(cls)
        obj.args, obj.kwargs = args, kwargs
        obj.mapping, obj.sequence = {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any):
        pass  # recorded by __new__

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> OpaqueObject:
        result = OpaqueObject(*args, **kwargs)
        result.qualified_name = f"{self.qualified_name}(...)"
        return result

    def __setitem__(self, key: Any, value: Any) -> None:
        self.mapping[key] = value

    def append(self, value: Any) -> None:
        self.sequence.append(value)

    def extend(self, values: Any) -> None:
        self.sequence.extend(values)

    def __repr__(self) -> str:
        return f"<opaque {self.qualified_name}>"


def _is_allowed(module: str, name: str) -> bool:
    if (module, name) in _TORCH_ALLOWED:
        return True
    # storage classes (torch.FloatStorage...) and dtypes (torch.float32...)
    return module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype))


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if _is_allowed(module, name):
            return super().find_class(module, name)
        logger.debug("checkpoint: replacing pickled %s.%s by a placeholder", module, name)
        return type(name, (OpaqueObject,), {"qualified_name": f"{module}.{name}"})


_restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=pickle.load, __name__="restricted")


def read_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a pickled PyTorch checkpoint without executing pickled code.

    Tries ``torch.load(weights_only=True)`` first; if the file holds objects that refuses (old Lightning
    checkpoints pickle their callbacks), re-reads it with a restricted unpickler that keeps tensors and
    plain containers and turns every other object into an inert :class:`OpaqueObject`.

    Raises:
        CheckpointError: the file is missing, truncated or not a PyTorch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        logger.info("%s holds objects weights_only refuses (%s); reading it with a restricted unpickler", path, err)
    except Exception as err:  # zip errors, EOF: a truncated or foreign file
        raise CheckpointError(f"Could not read {path} as a PyTorch checkpoint (truncated or corrupted?): {err}") from err
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_restricted_pickle)
    except Exception as err:
        raise CheckpointError(f"Could not read {path} as a PyTorch checkpoint (truncated or corrupted?): {err}") from err


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file into a CPU state dict.

    Raises:
        CheckpointError: the file is missing, truncated or not safetensors.
    """
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError as err:
        raise CheckpointError(f"Weight file not found: {path}") from err
    except Exception as err:
        raise CheckpointError(f"Could not read {path} as safetensors (truncated or corrupted?): {err}") from err


def load_state_dict_strict(
    module: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str, assign: bool = False
) -> None:
    """Load ``state_dict`` into ``module`` with every key and shape checked.

    ``assign=True`` is passed to ``load_state_dict`` (for modules built on the meta device).

    Raises:
        CheckpointError: naming the missing, unexpected and wrongly shaped keys.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if expected[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"The {source} does not fit {type(module).__name__}: missing keys {missing}, unexpected keys "
            f"{unexpected}, wrong shapes {wrong_shape}."
        )
    module.load_state_dict(state_dict, strict=True, assign=assign)
