"""Loading released taming-transformers models (CVPR 2021): a ``*-project.yaml`` / ``model.yaml`` config plus a
Lightning ``.ckpt`` or a ``.safetensors`` file, from local paths or the Hugging Face Hub.

Checkpoints are read without executing pickled code (:func:`fdm.io.torch_files.read_checkpoint`), the model is
built on the meta device from a config cleaned by :func:`~fdm.adapters.taming.compat.inference_config`
(no LPIPS download, no ``ckpt_path`` side-loading), and every expected key and shape is checked. Every
``target`` of the config, at every depth, must name one of taming's own classes unless ``trust_config=True``
(:func:`~fdm.adapters.taming.compat.check_targets`, before anything is imported).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fdm.adapters.taming.compat import (
    SIZE_LIMITS,
    _to_container,
    check_targets,
    import_taming,
    inference_config,
    instantiate_from_config,
    trusted_targets,
)
from fdm.config_io import check_sizes, read_yaml
from fdm.errors import CheckpointError, ConfigError
from fdm.io.hub import resolve_file
from fdm.io.torch_files import read_checkpoint
from fdm.io.weights import check_state_dict, load_state_dict_strict, read_safetensors
from fdm.limits import current as current_limits

__all__ = ["build_model", "load_config", "load_model", "model_state_dict"]

logger = logging.getLogger(__name__)

_LOSS_KEY = re.compile(r"^(?:(?:first|cond)_stage_model\.)?loss\.")
_FIRST_STAGE_PREFIX = "first_stage_model."


def load_config(config: Any, *, repo_id: str | None = None, revision: str | None = None,
                trust_config: bool = False) -> dict[str, Any]:
    """The ``model`` section (``target`` + ``params``) of a taming config, as a plain dict.

    Only the ``model`` section is read; other sections (``data``, ``lightning``) are dropped unread. YAML files are
    parsed with ``yaml.safe_load`` (no ``!!python`` tags).

    Args:
        config: a path / Hub reference (``hf://owner/repo/path.yaml``) to a ``*-project.yaml`` or ``model.yaml``,
            or a dict / OmegaConf holding either the whole file or its ``model`` section. A missing local path
            fails at once (:func:`fdm.io.hub.locate`).
        trust_config: allow any class as a ``target``. By default every ``target`` of the model section, at every
            depth (``model.target``, ``model.params.first_stage_config.target``, ``lossconfig``...), must be one
            of taming's own classes (:data:`~fdm.adapters.taming.compat.ALLOWED_TARGETS`), checked before anything
            is imported or built: a config names code that loading it runs, so pass True only for configs you
            trust (custom model classes, say).

    Raises:
        ConfigError: the file does not parse, a ``target`` is not allowed, or a size is out of
            :data:`~fdm.adapters.taming.compat.SIZE_LIMITS` (:func:`fdm.config_io.check_sizes`; naming its key path
            and value).
        CheckpointError: there is no ``model`` section with a ``target``.
    """
    if isinstance(config, (str, Path)):
        source = resolve_file(repo_id, str(config), layout=None, revision=revision) if repo_id else \
            resolve_file(config, revision=revision)
        config = read_yaml(source, "taming config")  # ConfigError naming the file and line if it does not parse
    model_config = _to_container(config)
    if isinstance(model_config, dict) and "model" in model_config and "target" not in model_config:
        model_config = model_config["model"]
    if not isinstance(model_config, dict) or "target" not in model_config:
        raise CheckpointError(
            "A taming config needs a `model:` section with `target:` (e.g. taming.models.vqgan.VQModel) and "
            f"`params:`; got keys {sorted(model_config) if isinstance(model_config, dict) else model_config!r}."
        )
    if not trust_config:
        check_targets(model_config, prefix="model")  # every depth, before anything is imported
        if not str(model_config["target"]).startswith("taming."):
            raise CheckpointError(f"Expected a taming model target (taming.models...); got {model_config['target']!r}.")
    cleaned = inference_config(model_config)
    check_sizes(cleaned, SIZE_LIMITS, prefix="model")  # before anything is built: no millions of modules
    return cleaned


def build_model(config: Any, *, device: str | torch.device | None = None, trust_config: bool = False) -> nn.Module:
    """Construct the taming model a config describes, without weights.

    Args:
        config: as for :func:`load_config` (already cleaned configs are accepted too).
        device: where parameters are allocated; ``"meta"`` builds a full-size model without memory.
        trust_config: allow any class as a ``target`` (see :func:`load_config`).

    Returns:
        The taming model (VQModel, GumbelVQ or Net2NetTransformer) in eval mode.

    Raises:
        ConfigError: a ``target`` is not allowed or a size is out of bounds (before anything is imported), or
            taming refuses the constructor arguments (a missing or misspelt one: taming's TypeError or assertion).
    """
    model_config = load_config(config, trust_config=trust_config)
    import_taming()
    chatter = io.StringIO()  # taming prints shapes and notices while building: keep them out of stdout
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext(), \
                contextlib.redirect_stdout(chatter), trusted_targets(trust_config):
            model = instantiate_from_config(model_config)
    except (TypeError, ValueError, LookupError, AssertionError) as err:  # taming's constructors check with asserts
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"The taming config does not describe a model taming can build ({model_config['target']}): "
                          f"{type(err).__name__}: {err}") from err
    if chatter.getvalue().strip():
        logger.debug("taming: %s", chatter.getvalue().strip())
    return model.eval()


def model_state_dict(checkpoint: dict[str, Any], model: nn.Module, *, source: str) -> dict[str, torch.Tensor]:
    """The weights of ``model`` from a checkpoint dict: Lightning ``state_dict`` unwrapped, ``loss.*`` dropped.

    A transformer checkpoint given for a first-stage model contributes its ``first_stage_model.*`` keys.
    """
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    state_dict = check_state_dict(state_dict, source=source)
    state_dict = {k: v for k, v in state_dict.items() if not _LOSS_KEY.match(k)}
    expected = model.state_dict()
    if not any(k in expected for k in state_dict) and any(k.startswith(_FIRST_STAGE_PREFIX) for k in state_dict):
        logger.info("%s: using the first_stage_model.* weights of a transformer checkpoint", source)
        state_dict = {k[len(_FIRST_STAGE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_FIRST_STAGE_PREFIX)}
    # load_state_dict(assign=True) keeps the file's dtypes: cast to the model's, as a copy would.
    return {k: v.to(expected[k].dtype) if k in expected and v.is_floating_point() else v
            for k, v in state_dict.items()}


def load_model(
    config: Any,
    checkpoint: str | Path,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    trust_config: bool = False,
) -> nn.Module:
    """Load a released (or your own) taming model.

    Args:
        config: ``*-project.yaml`` / ``model.yaml`` path, ``hf://owner/repo/path.yaml`` Hub reference, or a dict /
            OmegaConf of the config (whole file or its ``model`` section).
        checkpoint: Lightning ``.ckpt`` (read without executing pickled code) or ``.safetensors``; local path
            or ``hf://`` Hub reference. Standalone VQGAN keys (``encoder.*``...; ``loss.*`` keys are dropped) and
            transformer keys (``first_stage_model.*``, ``cond_stage_model.*``, ``transformer.*``).
        repo_id: when given, string ``config`` and ``checkpoint`` are filenames in this Hub repo.
        revision: Hub revision (branch, tag or commit).
        trust_config: allow any class as a ``target`` of the config. By default only taming's own classes are
            built (checked at every depth before anything is imported; see :func:`load_config`): pass True only
            for a config you trust, since the classes it names are imported and run.

    Returns:
        The taming model (``VQModel``, ``GumbelVQ`` or ``Net2NetTransformer``, with taming's own attribute and
        method names) on the CPU, in eval mode.

    Raises:
        CheckpointError: the checkpoint misses expected keys, has unexpected ones or wrong shapes (all named), or
            is refused by :func:`fdm.io.torch_files.read_checkpoint`.
        ConfigError: the config does not parse, names a class that is not allowed (key path and value), or
            describes a model larger than ``fdm.limits`` ``max_model_parameters``.
        FileNotFoundError: ``file not found: PATH`` for a missing local path (anything but ``hf://...`` or
            ``repo_id=``: :func:`fdm.io.hub.locate`), at once, without trying the Hub.

    Example:
        >>> from fdm.adapters.taming import load_model                                  # doctest: +SKIP
        >>> vqgan = load_model("logs/vqgan_imagenet_f16_1024/configs/model.yaml",
        ...                    "logs/vqgan_imagenet_f16_1024/checkpoints/last.ckpt")   # doctest: +SKIP
    """
    model_config = load_config(config, repo_id=repo_id if isinstance(config, (str, Path)) else None,
                               revision=revision, trust_config=trust_config)
    path = resolve_file(repo_id, str(checkpoint), layout=None, revision=revision) if repo_id else \
        resolve_file(checkpoint, revision=revision)
    raw = read_safetensors(path) if path.suffix == ".safetensors" else read_checkpoint(path)
    model = build_model(model_config, device="meta", trust_config=trust_config)
    count = sum(p.numel() for p in model.parameters())
    if count > (most := current_limits().max_model_parameters):
        raise ConfigError(f"The config describes a {type(model).__name__} of {count:,} parameters, more than the "
                          f"{most:,} allowed (fdm.limits); raise max_model_parameters for a model you trust.")
    source = f"checkpoint {path.name}"
    state_dict = model_state_dict(raw, model, source=source)
    raw_keys = raw.get("state_dict", raw) if isinstance(raw, dict) else {}
    if state_dict and not any(k in raw_keys for k in state_dict):  # first_stage_model.* of a transformer file
        spell, layout = (lambda k: _FIRST_STAGE_PREFIX + k), "taming transformer-checkpoint first_stage_model.*"
    else:
        spell, layout = None, "taming"
    load_state_dict_strict(model, state_dict, source=source, assign=True, file_key=spell, layout=layout)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{source}: these tensors were not loaded: {leftover}.")
    logger.info("loaded %s from %s", type(model).__name__, path)
    return model.eval()
