"""Compatibility layer for importing taming-transformers (Esser et al., CVPR 2021) with current packages.

Three upstream imports break or drag in training-only dependencies:

1. ``taming.models.vqgan`` and ``taming.models.cond_transformer`` import ``instantiate_from_config`` from
   ``taming.main`` (``main`` in a git clone), a training script that imports torchvision and
   ``pytorch_lightning.utilities.distributed`` (removed in pytorch-lightning 2).
2. ``taming.modules.transformer.mingpt`` imports ``transformers.top_k_top_p_filtering`` (removed from
   transformers, and transformers may not be installed at all).
3. ``taming.modules.losses`` (the ``lossconfig`` of every released config) imports torchvision and
   downloads LPIPS weights when the loss is constructed.

:func:`import_taming` handles 1 and 2 without patching anything permanently: while it imports taming's
model modules it places small stand-in modules in ``sys.modules`` (a ``taming.main`` / ``main`` that only
provides ``instantiate_from_config``, and, where transformers is not installed, a ``transformers`` that only
provides ``top_k_top_p_filtering``; an installed transformers gets that function for the duration of the import
instead, so that pytorch-lightning's torchmetrics, which imports transformers when it is installed, finds the real
package), then restores ``sys.modules`` and transformers exactly as they were. Modules a user already imported are
left alone. :func:`inference_config` handles 3: it swaps every ``lossconfig`` for
``torch.nn.Identity`` (the losses hold no inference weights) and drops ``ckpt_path`` entries, so that
constructing a model neither downloads nor unpickles anything.

Configs name classes by import path (``target``) at every depth: :func:`check_targets` refuses, before anything
is imported or built, every ``target`` that is not in :data:`ALLOWED_TARGETS` (taming's own model, quantizer,
transformer, permuter, conditioning-stage, scheduler and loss classes), unless the user opts in with
``trust_config=True`` (:func:`trusted_targets`). :func:`instantiate_from_config`, which taming's models call for
their nested configs, checks again.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import importlib
import logging
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch

from fdm.errors import ConfigError, MissingExtraError

__all__ = [
    "ALLOWED_TARGETS",
    "INSTALL_HINT",
    "SIZE_LIMITS",
    "check_targets",
    "import_taming",
    "inference_config",
    "instantiate_from_config",
    "top_k_top_p_filtering",
    "trusted_targets",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install ".[taming]" (from a clone of fdm-vq)'

#: Modules that make up taming's inference path (imported by :func:`import_taming`).
MODEL_MODULES = ("taming.models.vqgan", "taming.models.cond_transformer", "taming.modules.transformer.mingpt")

_IDENTITY_LOSS = {"target": "torch.nn.Identity"}

#: The classes a taming config may name as ``target`` (at any depth) without ``trust_config=True``: those of
#: taming-transformers (``taming-transformers-rom1504`` 0.0.6, or a CompVis clone) that released configs use.
#: Loss classes are only recorded: :func:`inference_config` replaces every ``lossconfig`` by ``torch.nn.Identity``
#: (the target of the demo model's own ``lossconfig``) before anything is built.
ALLOWED_TARGETS = frozenset({
    # models
    "taming.models.vqgan.VQModel",
    "taming.models.vqgan.GumbelVQ",
    "taming.models.vqgan.VQSegmentationModel",
    "taming.models.vqgan.VQNoDiscModel",
    "taming.models.cond_transformer.Net2NetTransformer",
    # quantizers
    "taming.modules.vqvae.quantize.VectorQuantizer",
    "taming.modules.vqvae.quantize.VectorQuantizer2",
    "taming.modules.vqvae.quantize.GumbelQuantize",
    # transformer and permuters
    "taming.modules.transformer.mingpt.GPT",
    *(f"taming.modules.transformer.permuter.{name}" for name in
      ("Identity", "Subsample", "ZCurve", "SpiralOut", "SpiralIn", "Random", "AlternateParsing")),
    # conditioning stages
    "taming.modules.misc.coord.CoordStage",
    "taming.modules.util.Labelator",
    "taming.modules.util.SOSProvider",
    # schedulers
    "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
    # losses (recorded, never built)
    "taming.modules.losses.DummyLoss",
    "taming.modules.losses.vqperceptual.DummyLoss",
    "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
    "taming.modules.losses.segmentation.BCELoss",
    "taming.modules.losses.segmentation.BCELossWithQuant",
    "torch.nn.Identity",
})

_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("fdm_taming_trust_config", default=False)


@contextlib.contextmanager
def trusted_targets(trust: bool = True) -> Iterator[None]:
    """While active (with ``trust=True``), :func:`instantiate_from_config` builds any ``target``: the
    ``trust_config=True`` opt-in of :func:`~fdm.adapters.taming.load_model`."""
    token = _TRUSTED.set(bool(trust))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def _check_target(target: Any, path: str) -> None:
    if not isinstance(target, str) or target not in ALLOWED_TARGETS:
        raise ConfigError(
            f"{path} = {target!r} is not one of the taming-transformers classes fdm-vq builds from a config (see "
            "fdm.adapters.taming.compat.ALLOWED_TARGETS); a config names the class it wants imported and run, so "
            "others are refused. If you trust this config and the code it names, pass trust_config=True "
            "(fdm: --trust-config)."
        )


def check_targets(config: Any, *, prefix: str = "model") -> None:
    """Check every ``target`` of ``config`` (dicts and lists, at every depth) against :data:`ALLOWED_TARGETS`, and
    refuse a quantizer's ``remap`` file (taming reads any path it names with numpy while building the model).

    Args:
        config: plain nested dicts / lists (the ``model`` section of a taming config).
        prefix: key path of ``config`` itself, for messages.

    Raises:
        ConfigError: naming the key path (``model.params.first_stage_config.target``) and the value.
    """
    if isinstance(config, dict):
        for key, value in config.items():
            path = f"{prefix}.{key}"
            if key == "target":
                _check_target(value, path)
            elif key == "remap" and value is not None:  # taming's quantizers np.load() this path while being built
                raise ConfigError(f"{path} = {value!r}: a file that taming reads while building the model; released "
                                  "configs have none. If you trust this config and the file, pass trust_config=True "
                                  "(fdm: --trust-config).")
            check_targets(value, prefix=path)
    elif isinstance(config, (list, tuple)):
        for index, value in enumerate(config):
            check_targets(value, prefix=f"{prefix}[{index}]")


def _get_obj_from_str(target: str) -> Any:
    module, name = target.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def instantiate_from_config(config: Any) -> Any:
    """Build ``target(**params)`` from a ``{"target": ..., "params": {...}}`` mapping (taming's convention).

    ``target`` must be in :data:`ALLOWED_TARGETS` unless inside :func:`trusted_targets`.

    Raises:
        KeyError: the mapping has no ``target``.
        ConfigError: ``target`` is not allowed (checked before it is imported).
    """
    if "target" not in config:
        raise KeyError(f"Expected key `target` to instantiate; got keys {sorted(config)}.")
    if not _TRUSTED.get():
        _check_target(config["target"], "target")
    return _get_obj_from_str(config["target"])(**config.get("params", {}))


def top_k_top_p_filtering(
    logits: torch.Tensor,
    top_k: int | None = 0,
    top_p: float | None = 1.0,
    filter_value: float = -float("inf"),
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """Stand-in for the removed ``transformers.top_k_top_p_filtering`` (same signature and semantics)."""
    from fdm.adapters.taming.sampling import filter_logits

    return filter_logits(logits, top_k=top_k, top_p=top_p, filter_value=filter_value,
                         min_tokens_to_keep=min_tokens_to_keep)


def _stand_in(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name, f"fdm-vq stand-in for {name} (see fdm.adapters.taming.compat)")
    module.__dict__.update(attributes)
    return module


@contextlib.contextmanager
def _temporary_modules(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    """Put ``modules`` into ``sys.modules`` where the name is free (absent or blocked with None), then restore
    ``sys.modules``."""
    missing = object()
    saved = {name: sys.modules.get(name, missing) for name in modules}
    try:
        for name, module in modules.items():
            if sys.modules.get(name) is None:
                sys.modules[name] = module
        yield
    finally:
        for name, previous in saved.items():
            if previous is missing:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


@contextlib.contextmanager
def _temporary_attribute(module: types.ModuleType, name: str, value: Any) -> Iterator[None]:
    """Give ``module`` the attribute ``name`` while the block runs, if it has none."""
    if hasattr(module, name):
        yield
        return
    setattr(module, name, value)
    try:
        yield
    finally:
        delattr(module, name)


def _installed_transformers() -> types.ModuleType | None:
    """The transformers package when it is installed (pytorch-lightning's torchmetrics then imports it too)."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        return None


def import_taming() -> None:
    """Import taming's model modules (VQModel, GumbelVQ, Net2NetTransformer, minGPT) safely.

    Works for the ``taming-transformers-rom1504`` package and for a git clone on ``sys.path``. Neither torchvision
    nor taming's training script is imported; transformers only where it is installed. Idempotent.

    Raises:
        MissingExtraError: taming is not installed (an ImportError naming the extra to install).
    """
    if all(name in sys.modules for name in MODEL_MODULES):
        return
    try:
        importlib.import_module("taming")
    except ImportError as err:
        raise MissingExtraError(
            f"taming-transformers is required for taming models: {INSTALL_HINT} (or put a clone of "
            "CompVis/taming-transformers on sys.path)."
        ) from err
    main = _stand_in("main", instantiate_from_config=instantiate_from_config)
    stand_ins = {"taming.main": main, "main": main}
    transformers = _installed_transformers()
    if transformers is None:
        stand_ins["transformers"] = transformers = _stand_in("transformers")
    with _temporary_modules(stand_ins), _temporary_attribute(transformers, "top_k_top_p_filtering",
                                                             top_k_top_p_filtering):
        for name in MODEL_MODULES:
            importlib.import_module(name)
    logger.debug("imported %s with fdm-vq's stand-ins for taming.main and transformers", ", ".join(MODEL_MODULES))


#: Largest value a taming config may give a size (at any depth, checked by :func:`fdm.config_io.check_sizes`): a
#: crafted config must not make taming build millions of modules (even on the meta device) or tensors of terabytes. The released models stay far below: f16
#: VQGAN ch 128, num_res_blocks 2, n_embed 16384; the transformers n_layer 24-48, n_embd 1536, block_size 512-1024.
#: For a list (``ch_mult``, ``attn_resolutions``): (most entries, largest entry).
SIZE_LIMITS: dict[str, int | tuple[int, int | None]] = {
    "ch": 4096, "out_ch": 64, "in_channels": 4096, "z_channels": 4096, "embed_dim": 4096, "num_res_blocks": 64,
    "resolution": 16384, "n_embed": 1 << 20, "vocab_size": 1 << 20, "block_size": 1 << 16, "n_layer": 256,
    "n_head": 256, "n_embd": 16384, "n_unmasked": 1 << 16, "n_classes": 1 << 20,
    "ch_mult": (16, 64), "attn_resolutions": (64, 16384),
}


def inference_config(config: Any) -> dict[str, Any]:
    """A copy of a taming model config, made safe to construct for inference.

    Every ``lossconfig`` becomes ``torch.nn.Identity`` (no LPIPS download, no torchvision) and every
    ``ckpt_path`` / ``ignore_keys`` entry is dropped (weights are loaded afterwards, strictly).

    Args:
        config: the ``model`` section: a mapping with ``target`` and ``params`` (dict or OmegaConf).

    Returns:
        A plain nested dict.

    Raises:
        ConfigError: a ``params`` beside a ``target`` that is not a mapping (naming its key path).
    """
    plain = _to_container(config)

    def clean(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            if "target" in node and not isinstance(node.get("params", {}), dict):
                raise ConfigError(f"{path}.params must be a mapping of constructor arguments; got "
                                  f"{type(node['params']).__name__}.")
            out = {}
            for key, value in node.items():
                if key in ("ckpt_path", "ignore_keys"):
                    continue
                out[key] = copy.deepcopy(_IDENTITY_LOSS) if key == "lossconfig" else clean(value, f"{path}.{key}")
            return out
        if isinstance(node, list):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(node)]
        return node

    return clean(plain, "model")


def _to_container(config: Any) -> Any:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # plain dicts only
        raise TypeError(f"config must be a dict or an OmegaConf DictConfig; got {type(config).__name__}.") from None
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    raise TypeError(f"config must be a dict or an OmegaConf DictConfig; got {type(config).__name__}.")
