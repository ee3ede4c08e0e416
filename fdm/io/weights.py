"""Weight files fdm-vq writes and reads: safetensors with a recorded digest of their tensors, the finite-weights
check, and strict loading into a module with every key, shape and dtype checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fdm.errors import CheckpointError

__all__ = [
    "DIGEST_KEY",
    "check_finite_weights",
    "check_loading_info",
    "check_state_dict",
    "file_sha256",
    "load_state_dict_strict",
    "read_safetensors",
    "state_dict_digest",
    "write_weights",
]

#: safetensors metadata key holding :func:`state_dict_digest` of the tensors, checked on every load.
DIGEST_KEY = "fdm_vq.sha256"


def read_safetensors(path: str | Path, *, require_digest: bool = False,
                     require_finite: bool = False) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file into a CPU state dict, checking the digest :func:`write_weights` recorded.

    Args:
        path: the file.
        require_digest: refuse a file without a recorded digest (files fdm-vq wrote itself: training
            checkpoints, fine-tuned decoders). Third-party safetensors files carry none and are read as they are.
        require_finite: refuse NaN or Inf in a floating-point tensor (:func:`check_finite_weights`; weights that
            fdm-vq trains).

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
    if require_finite:
        check_finite_weights(state_dict, what=f"the weights in {path}")
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


def check_state_dict(obj: object, *, source: str) -> dict[str, torch.Tensor]:
    """``obj``, checked to be a state dict: a dict mapping names (``str``) to tensors.

    Raises:
        CheckpointError: naming ``source`` and up to five entries that are not name -> tensor (an integer key, a
            number where a tensor is expected), or what ``obj`` is when it is not a dict.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"The {source} must be a state dict (names -> tensors); got {type(obj).__name__}.")
    odd = sorted(f"{k!r}: {type(v).__name__}" for k, v in obj.items()
                 if type(k) is not str or not isinstance(v, torch.Tensor))
    if odd:
        raise CheckpointError(f"The {source} must map names to tensors; these entries do not: "
                              f"{', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''}.")
    return obj


def check_finite_weights(state_dict: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Refuse weights that hold NaN or Inf.

    Raises:
        CheckpointError: naming ``what`` and up to five of the tensors that hold NaN or Inf.
    """
    bad = sorted(k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(f"{what} hold NaN or Inf values ({', '.join(bad[:5])}{more}): weights like these are "
                              "neither saved nor loaded (a run that diverged: lower --lr, or start again).")


def write_weights(state_dict: dict[str, torch.Tensor], path: str | Path, *,
                  metadata: dict[str, str] | None = None) -> Path:
    """Write ``state_dict`` as safetensors with :func:`state_dict_digest` in its metadata; returns the path.

    The file is written under a temporary name and renamed, so an interrupted write never leaves a truncated file
    under ``path``.

    Raises:
        CheckpointError: a floating-point tensor holds NaN or Inf (:func:`check_finite_weights`); nothing is written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    check_finite_weights(state_dict, what=f"the weights to write to {path}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={**(metadata or {}), "format": "pt", DIGEST_KEY: state_dict_digest(tensors)})
    tmp.replace(path)
    return path


def load_state_dict_strict(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str,
    assign: bool = False,
    file_key: Mapping[str, str] | Callable[[str], str] | None = None,
    layout: str | None = None,
) -> None:
    """Load ``state_dict`` into ``module`` with every key, shape and dtype checked.

    ``assign=True`` is passed to ``load_state_dict`` (for modules built on the meta device).

    Args:
        module: the module to fill.
        state_dict: its weights, under the module's own key names.
        source: what the weights are, for messages (``"PUT checkpoint p_vqvae.pth"``).
        assign: passed to ``load_state_dict``.
        file_key: how the file spells each of the module's keys, when a converter renamed them (a mapping or a
            function; keys it does not cover are spelled as they are). Messages name missing, unexpected and
            mis-shaped keys as the file spells them, or would spell them.
        layout: the key layout the file was read as (``"FDM authors'"``), named in messages.

    Raises:
        CheckpointError: naming entries that are not name -> tensor, the missing, unexpected and wrongly shaped
            keys, and floating-point weights given as integer, bool or complex tensors, which are refused instead of
            cast.
    """
    if file_key is None:
        def spell(key: str) -> str:
            return key
    elif callable(file_key):
        spell = file_key
    else:
        def spell(key: str) -> str:
            return file_key.get(key, key)

    check_state_dict(state_dict, source=source)
    expected = module.state_dict()
    missing = sorted(spell(k) for k in set(expected) - set(state_dict))
    unexpected = sorted(spell(k) for k in set(state_dict) - set(expected))
    common = sorted(set(expected) & set(state_dict))
    wrong_shape = [
        f"{spell(k)}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in common
        if expected[k].shape != state_dict[k].shape
    ]
    wrong_dtype = [
        f"{spell(k)}: expected floating point ({expected[k].dtype}), got {state_dict[k].dtype}"
        for k in common
        if expected[k].is_floating_point() and not state_dict[k].is_floating_point()
    ]
    if missing or unexpected or wrong_shape or wrong_dtype:
        read_as = f" (keys read in the {layout} layout)" if layout else ""
        dtypes = f", wrong dtypes {wrong_dtype} (integer and complex weights are refused, not cast)" if wrong_dtype else ""
        raise CheckpointError(
            f"Cannot load the {source} into {type(module).__name__}{read_as}: missing keys {missing}, unexpected "
            f"keys {unexpected}, wrong shapes {wrong_shape}{dtypes}."
        )
    module.load_state_dict(state_dict, strict=True, assign=assign)


def check_loading_info(info: Mapping[str, Any], *, into: str) -> None:
    """Refuse a load through a library's ``from_pretrained(..., output_loading_info=True)`` (diffusers,
    transformers) that left keys missing or unexpected, or read them in another shape.

    Args:
        info: the loading info (``missing_keys``, ``unexpected_keys``, ``mismatched_keys`` as (key, got, expected)).
        into: what was loaded into what, for the message (``"vqmodel/ into the VQModel its config.json describes"``).

    Raises:
        CheckpointError: naming each missing, unexpected and mis-shaped key.
    """
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    wrong_shape = [f"{key}: expected {tuple(expected)}, got {tuple(got)}"
                   for key, got, expected in sorted(info["mismatched_keys"])]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(f"Cannot load the weights of {into}: missing keys {missing}, unexpected keys "
                              f"{unexpected}, wrong shapes {wrong_shape}.")

