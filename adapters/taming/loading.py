"""Loading released taming-transformers models (CVPR 2021): a ``*-project.yaml`` / ``model.yaml`` config plus a
Lightning ``.ckpt`` or a ``.safetensors`` file, from local paths or the Hugging Face Hub.

Checkpoints are read without executing pickled code (:func:`fdm.checkpoint.read_checkpoint`), the model is
built on the meta device from a config cleaned by :func:`~fdm.adapters.taming.compat.inference_config`
(no LPIPS download, no ``ckpt_path`` side-loading), and every expected key and shape is checked.
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

from fdm.adapters.taming.compat import import_taming, inference_config, instantiate_from_config
from fdm.checkpoint import load_state_dict_strict, read_checkpoint, read_safetensors
from fdm.errors import CheckpointError

__all__ = ["build_model", "load_config", "load_model", "model_state_dict", "resolve_file"]

logger = logging.getLogger(__name__)

_LOSS_KEY = re.compile(r"^(?:(?:first|cond)_stage_model\.)?loss\.")
_FIRST_STAGE_PREFIX = "first_stage_model."
_HUB_SPEC = re.compile(r"^(?:hf://)?([\w.-]+/[\w.-]+)/(.+)$")


def resolve_file(spec: str | Path, *, repo_id: str | None = None, revision: str | None = None) -> Path:
    """A local path for ``spec``: an existing file, a filename in ``repo_id``, or ``owner/repo/path/in/repo``.

    Hub files are fetched with ``huggingface_hub.hf_hub_download`` (cached; honours ``HF_HUB_OFFLINE``).

    Raises:
        FileNotFoundError: ``spec`` is neither a local file nor a Hub file reference.
    """
    path = Path(spec)
    if repo_id is None:
        if path.is_file():
            return path
        match = _HUB_SPEC.match(str(spec)) if isinstance(spec, str) and not path.is_absolute() else None
        if match is None:
            raise FileNotFoundError(
                f"{spec} is not a local file. Pass an existing path, 'owner/repo/file-in-repo' for a Hub file, "
                "or repo_id= with the filename."
            )
        repo_id, filename = match.groups()
    else:
        filename = str(spec)
    from huggingface_hub import hf_hub_download

    logger.info("fetching %s from Hub repo %s", filename, repo_id)
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except Exception as err:  # huggingface_hub raises its own error types (offline, 404, auth)
        raise FileNotFoundError(f"Could not get {filename!r} from Hub repo {repo_id!r}: {err}") from err


def load_config(config: Any, *, repo_id: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """The ``model`` section (``target`` + ``params``) of a taming config, as a plain dict.

    Args:
        config: a path / Hub reference to a ``*-project.yaml`` or ``model.yaml``, or a dict / OmegaConf
            holding either the whole file or its ``model`` section.
    """
    if isinstance(config, (str, Path)):
        import yaml

        source = resolve_file(config, repo_id=repo_id, revision=revision)
        with open(source) as f:
            config = yaml.safe_load(f)
    model_config = inference_config(config)
    if "model" in model_config and "target" not in model_config:
        model_config = model_config["model"]
    if not isinstance(model_config, dict) or "target" not in model_config:
        raise CheckpointError(
            "A taming config needs a `model:` section with `target:` (e.g. taming.models.vqgan.VQModel) and "
            f"`params:`; got keys {sorted(model_config) if isinstance(model_config, dict) else model_config!r}."
        )
    if not str(model_config["target"]).startswith("taming."):
        raise CheckpointError(f"Expected a taming model target (taming.models...); got {model_config['target']!r}.")
    return model_config


def build_model(config: Any, *, device: str | torch.device | None = None) -> nn.Module:
    """Construct the taming model a config describes, without weights.

    Args:
        config: as for :func:`load_config` (already cleaned configs are accepted too).
        device: where parameters are allocated; ``"meta"`` builds a full-size model without memory.

    Returns:
        The taming model (VQModel, GumbelVQ or Net2NetTransformer) in eval mode.
    """
    import_taming()
    model_config = load_config(config)
    chatter = io.StringIO()  # taming prints shapes and notices while building: keep them out of stdout
    with torch.device(device) if device is not None else contextlib.nullcontext(), \
            contextlib.redirect_stdout(chatter):
        model = instantiate_from_config(model_config)
    if chatter.getvalue().strip():
        logger.debug("taming: %s", chatter.getvalue().strip())
    return model.eval()


def model_state_dict(checkpoint: dict[str, Any], model: nn.Module, *, source: str) -> dict[str, torch.Tensor]:
    """The weights of ``model`` from a checkpoint dict: Lightning ``state_dict`` unwrapped, ``loss.*`` dropped.

    A transformer checkpoint given for a first-stage model contributes its ``first_stage_model.*`` keys.
    """
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{source} holds {type(checkpoint).__name__}, not a state dict.")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: these state-dict entries are not tensors: {not_tensors[:10]}.")
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
) -> nn.Module:
    """Load a released (or your own) taming model.

    Args:
        config: ``*-project.yaml`` / ``model.yaml`` path, ``owner/repo/path.yaml`` Hub reference, or a dict /
            OmegaConf of the config (whole file or its ``model`` section).
        checkpoint: Lightning ``.ckpt`` (read without executing pickled code) or ``.safetensors``; local path
            or Hub reference. Standalone VQGAN keys (``encoder.*``...; ``loss.*`` keys are dropped) and
            transformer keys (``first_stage_model.*``, ``cond_stage_model.*``, ``transformer.*``).
        repo_id: when given, string ``config`` and ``checkpoint`` are filenames in this Hub repo.
        revision: Hub revision (branch, tag or commit).

    Returns:
        The taming model (``VQModel``, ``GumbelVQ`` or ``Net2NetTransformer``, with taming's own attribute and
        method names) on the CPU, in eval mode.

    Raises:
        CheckpointError: the checkpoint misses expected keys, has unexpected ones or wrong shapes (all named).
        FileNotFoundError: a file is neither local nor on the Hub.

    Example:
        >>> from fdm.adapters.taming import load_model                                  # doctest: +SKIP
        >>> vqgan = load_model("logs/vqgan_imagenet_f16_1024/configs/model.yaml",
        ...                    "logs/vqgan_imagenet_f16_1024/checkpoints/last.ckpt")   # doctest: +SKIP
    """
    model_config = load_config(config, repo_id=repo_id if isinstance(config, (str, Path)) else None,
                               revision=revision)
    path = resolve_file(checkpoint, repo_id=repo_id, revision=revision)
    raw = read_safetensors(path) if path.suffix == ".safetensors" else read_checkpoint(path)
    model = build_model(model_config, device="meta")
    source = f"checkpoint {path.name}"
    state_dict = model_state_dict(raw, model, source=source)
    load_state_dict_strict(model, state_dict, source=source, assign=True)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{source}: these tensors were not loaded: {leftover}.")
    logger.info("loaded %s from %s", type(model).__name__, path)
    return model.eval()
