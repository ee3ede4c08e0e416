"""Safe reading of weight files: safetensors, ``torch.load(weights_only=True)``, and a restricted
unpickler for old Lightning ``.ckpt`` files whose pickled callback objects ``weights_only`` refuses.

Nothing here executes code from a checkpoint: unknown pickled classes become inert placeholders.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fdm.errors import CheckpointError

__all__ = [
    "DIGEST_KEY",
    "OpaqueObject",
    "load_state_dict_strict",
    "read_checkpoint",
    "file_sha256",
    "read_safetensors",
    "state_dict_digest",
    "write_weights",
]

logger = logging.getLogger(__name__)

#: safetensors metadata key holding :func:`state_dict_digest` of the tensors, checked on every load.
DIGEST_KEY = "fdm_vq.sha256"

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


def read_safetensors(path: str | Path, *, require_digest: bool = False) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file into a CPU state dict, checking the digest :func:`write_weights` recorded.

    Args:
        path: the file.
        require_digest: refuse a file without a recorded digest (files fdm-vq wrote itself: training
            checkpoints, fine-tuned decoders). Third-party safetensors files carry none and are read as they are.

    Raises:
        CheckpointError: the file is missing, truncated or not safetensors; its tensors do not match the
            recorded digest (corrupted bytes); no digest where one is required; a tensor is not floating point
            where weights are expected (see :func:`load_state_dict_strict`).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(DIGEST_KEY)
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open API)
    except FileNotFoundError as err:
        raise CheckpointError(f"Weight file not found: {path}") from err
    except Exception as err:
        raise CheckpointError(f"Could not read {path} as safetensors (truncated or corrupted?): {err}. "
                              "Download or copy it again.") from err
    if recorded is None:
        if require_digest:
            raise CheckpointError(f"{path} carries no {DIGEST_KEY} digest, which every file fdm-vq writes has: it "
                                  "was altered or not written by fdm-vq. Download or copy it again.")
    elif recorded != (actual := state_dict_digest(state_dict)):
        raise CheckpointError(
            f"{path} is corrupted: its tensors hash to sha256 {actual}, but {recorded} was recorded when the "
            "file was written. Download or copy it again."
        )
    return state_dict


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in key order: the one digest of weights in
    fdm-vq (recorded under :data:`DIGEST_KEY` in every file it writes, and the id of a base model's weights)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (integrity of the non-tensor files fdm-vq writes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_weights(state_dict: dict[str, torch.Tensor], path: str | Path, *,
                  metadata: dict[str, str] | None = None) -> Path:
    """Write ``state_dict`` as safetensors with :func:`state_dict_digest` in its metadata; returns the path.

    The file is written under a temporary name and renamed, so an interrupted write never leaves a truncated file
    under ``path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={**(metadata or {}), "format": "pt", DIGEST_KEY: state_dict_digest(tensors)})
    tmp.replace(path)
    return path


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
