"""Training checkpoints that resume without losing or repeating a step: module weights as safetensors, the
rest (optimizer and scheduler states, step counter, every RNG state) as a plain-tensor file read back with
:func:`fdm.io.torch_files.read_checkpoint` (the library's one restricted unpickler), after every file was checked
against the checkpoint's manifest. Shared by the phase-2 and phase-3 trainers.

Layout of one checkpoint folder (written to a temporary name and renamed, so a crash never leaves a
half-written checkpoint under the final name)::

    <root>/step-00001000/
        <name>.safetensors      one file per module passed to save_checkpoint (fdm, decoder, ...), with its digest
        training_state.pt       optimizers, schedulers, step, RNG states, config: plain dicts and tensors
        manifest.json           the sha256 of every file above, checked before anything is read back
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fdm.config_io import read_json
from fdm.errors import CheckpointError, ConfigError
from fdm.io.torch_files import read_checkpoint
from fdm.io.weights import (
    check_finite_weights,
    file_sha256,
    load_state_dict_strict,
    read_safetensors,
    write_weights,
)

__all__ = [
    "check_resumable",
    "latest_checkpoint",
    "load_checkpoint",
    "run_identity",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

_STATE_FILE = "training_state.pt"
_MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random-number state a training step may consume, as plain tensors / numbers.

    Args:
        generators: extra named ``torch.Generator`` objects (a mask generator, say).

    Returns:
        ``{"torch", "cuda" (list, one per device; empty without CUDA), "python", "numpy", "generators"}``.
    """
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }


def _restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`_capture_rng_state` captured (into ``generators`` for the named generators)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    for name, generator in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"checkpoint has no state for the random generator {name!r}")
        generator.set_state(state["generators"][name])


def save_checkpoint(
    root: str | Path, step: int, modules: dict[str, nn.Module], state: dict[str, Any], *, keep: int | None = 2
) -> Path:
    """Write the checkpoint of ``step`` under ``root`` and prune old ones.

    Args:
        root: folder holding the ``step-*`` checkpoint folders.
        step: number of optimizer steps done.
        modules: modules whose weights are saved as ``<name>.safetensors`` (unwrap DDP first).
        state: everything else (optimizer / scheduler ``state_dict()``, RNG states, config): dicts, lists,
            numbers, strings and tensors only, so that it loads with ``weights_only=True``.
        keep: number of most recent checkpoints to keep (None: keep all).

    Returns:
        The checkpoint folder.
    """
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    for name, module in modules.items():  # before anything is written
        check_finite_weights(module.state_dict(), what=f"the {name} weights of step {step}")
    _check_finite_state(state, f"the training state of step {step}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        write_weights(module.state_dict(), tmp / f"{name}.safetensors")
    torch.save({"step": step, **state}, tmp / _STATE_FILE)
    files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
    (tmp / _MANIFEST_FILE).write_text(json.dumps({"format": "fdm-vq training checkpoint", "step": step,
                                                 "sha256": files}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    logger.info("saved checkpoint %s", final)
    if keep is not None:
        for old in _checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path, modules: dict[str, nn.Module], *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load the module weights of a checkpoint folder in place and return its training state.

    Args:
        path: a ``step-*`` folder written by :func:`save_checkpoint`.
        modules: the modules to fill, by the names they were saved under (every key and shape checked).
        map_location: device for the tensors of the returned state.

    Returns:
        The ``state`` dict given to :func:`save_checkpoint`, plus ``"step"``.

    Raises:
        CheckpointError: a file is missing, unreadable, differs from the digest in ``manifest.json`` (corrupted
            or altered), or does not fit the modules.
    """
    path = Path(path)
    _verify_manifest(path)
    state_file = path / _STATE_FILE
    try:
        state = read_checkpoint(state_file, map_location=map_location)
    except CheckpointError as err:
        raise CheckpointError(f"{err} Delete the checkpoint folder to start over.") from err
    _check_finite_state(state, f"{state_file}")
    for name, module in modules.items():
        weights = path / f"{name}.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"training checkpoint {path} has no weights for {name!r} ({weights.name}).")
        load_state_dict_strict(module, read_safetensors(weights, require_digest=True, require_finite=True),
                               source=str(weights))
    logger.info("resuming from %s (step %d)", path, state["step"])
    return state


def _non_finite(value: Any, where: str) -> Iterator[str]:
    """The places in a training state (nested dicts, lists, tensors, numbers) that hold NaN or Inf."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, f"{where}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _non_finite(item, f"{where}/{index}")
    elif isinstance(value, torch.Tensor) and value.is_floating_point():
        if not bool(torch.isfinite(value).all()):
            yield where
    elif isinstance(value, float) and not math.isfinite(value):
        yield where


def _check_finite_state(state: dict[str, Any], what: str) -> None:
    """Refuse a training state (optimizer moments, held-out records...) that holds NaN or Inf: a run resumed from it,
    or saved with it, would be broken.

    Raises:
        CheckpointError: naming the first places that hold them.
    """
    bad = list(_non_finite(state, ""))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(f"{what} holds NaN or Inf (at {shown}): a run resumed from it, or saved with it, would "
                              "be broken. Delete the checkpoint folder to resume from the one before, or start over.")


def _verify_manifest(path: Path) -> None:
    """Check every file of a checkpoint folder against its manifest, which must list them all (before any byte of it
    is unpickled)."""
    remedy = "Delete the checkpoint folder (training restarts from the previous one or from scratch)."
    manifest_file = path / _MANIFEST_FILE
    if not manifest_file.is_file():
        raise CheckpointError(f"{path} is not a training checkpoint of fdm-vq: {_MANIFEST_FILE} is missing. {remedy}")
    try:
        recorded = read_json(manifest_file, "the checkpoint's manifest").get("sha256")
        if not isinstance(recorded, dict) or _STATE_FILE not in recorded:
            raise ConfigError(f"{manifest_file} has no sha256 entry for {_STATE_FILE}")
    except ConfigError as err:
        raise CheckpointError(f"{err} {remedy}") from err
    unlisted = sorted(p.name for p in path.iterdir() if p.name != _MANIFEST_FILE and p.name not in recorded)
    if unlisted:
        raise CheckpointError(f"training checkpoint {path} holds {', '.join(unlisted)}, which its manifest does not "
                              f"list: the folder was altered. {remedy}")
    for name, expected in recorded.items():
        file = path / Path(name).name
        if file.is_symlink():
            raise CheckpointError(f"{file} is a symbolic link: a checkpoint's files are its own. {remedy}")
        if not file.is_file():
            raise CheckpointError(f"training checkpoint {path} lacks {name}, listed in its manifest. {remedy}")
        if file_sha256(file) != expected:
            raise CheckpointError(f"{file} does not match the sha256 recorded in {manifest_file}: the file is "
                                  f"corrupted or was altered. {remedy}")


_ROLE_WORDS = {
    "base_model": "the base model (codebook fingerprint)",
    "views": "the training views",
    "heldout": "the held-out views",
    "val": "the validation views",
}


def run_identity(base_model: str | None, **views: Any) -> dict[str, Any]:
    """What a run trains on and for: the fingerprint of the base model's codebook, and each set of views given by
    role (``views=``, ``heldout=``...) as its ``settings()`` (images, crop size, views per image, seed...: a
    difference is named field by field), else its ``fingerprint()``, else its length (None stays None). Recorded
    in every checkpoint and ``run.json`` under ``"data"`` and compared by :func:`check_resumable`."""
    def describe(dataset: Any) -> Any:
        if dataset is None:
            return None
        if hasattr(dataset, "settings"):
            return json.loads(json.dumps(dataset.settings()))  # tuples as lists, as they read back
        return dataset.fingerprint() if hasattr(dataset, "fingerprint") else str(len(dataset))
    return {"base_model": base_model, **{role: describe(dataset) for role, dataset in views.items()}}


def _differences(saved: Any, now: Any) -> list[str]:
    """``field: saved (saved), now (now)`` for each differing field of two settings dicts (the whole values
    otherwise)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [f"{key}: {saved.get(key)!r} (saved), {now.get(key)!r} (now)"
                for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
    return [f"{saved!r} (saved), {now!r} (now)"]


def check_resumable(path: str | Path, state: dict[str, Any], *, phase: int, config: dict[str, Any],
                    fields: tuple[str, ...], identity: dict[str, Any], world_size: int) -> None:
    """Refuse to continue a run recorded by ``state`` (a checkpoint's training state, or ``run.json``) as another
    kind of run.

    Args:
        path: the checkpoint or output folder (named in messages).
        state: what it records (``phase``, ``config``, ``data``, ``world_size``).
        phase: the continuing trainer's phase (2 or 3).
        config: the continuing run's config (``to_dict()``); ``fields`` of it must equal the saved ones.
        identity: the continuing run's :func:`run_identity`, which must equal the saved one.
        world_size: the continuing run's process count, which must equal the saved one.

    Raises:
        CheckpointError: another phase, config field, data or base model, or process count (naming each field that
            differs, with both values).
    """
    remedy = "continue it with the same settings, or start the new run in another --out folder (or --overwrite)."
    if state.get("phase") != phase:
        raise CheckpointError(f"{path} belongs to a phase-{state.get('phase')} run, not to this phase-{phase} run: "
                              "start the new run in another --out folder (or --overwrite).")
    saved = state.get("config") or {}
    changed = _differences({k: saved.get(k) for k in fields}, {k: config[k] for k in fields})
    if changed:
        raise CheckpointError(f"{path} belongs to a run with another config ({'; '.join(changed)}): {remedy}")
    saved_identity = state.get("data") or {}
    for role in sorted(set(identity) | set(saved_identity)):
        if saved_identity.get(role) != identity.get(role):
            words = _ROLE_WORDS.get(role, f"the {role} views")
            details = "; ".join(_differences(saved_identity.get(role), identity.get(role)))
            raise CheckpointError(f"{path} belongs to a run on other data or for another base model: {words} "
                                  f"differ ({details}): {remedy}")
    if state.get("world_size") != world_size:
        raise CheckpointError(f"{path} was written by {state.get('world_size')} processes; resume it with as many "
                              f"(got {world_size}).")


def latest_checkpoint(root: str | Path) -> Path | None:
    """The most recent ``step-*`` folder under ``root``, or None when there is none."""
    found = _checkpoints(Path(root))
    return found[-1] if found else None


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]
