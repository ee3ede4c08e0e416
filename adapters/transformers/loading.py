"""Loading the image tokenizers of transformers' multimodal models (Janus / Janus-Pro, Emu3) for FDM: a tokenizer
folder (``save_pretrained`` of a ``JanusVQVAE`` / ``Emu3VQVAE``) through ``from_pretrained``, or the tokenizer inside
a whole Janus / Emu3 checkpoint (its ``vq_config`` and its ``vqmodel`` weights only). transformers is imported only
here, when a model is loaded (``pip install ".[transformers]"`` from a clone).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from fdm.config_io import check_sizes, read_json
from fdm.errors import CheckpointError, FdmError, MissingExtraError
from fdm.io.hub import locate, repo_with_subfolder, resolve_file
from fdm.io.weights import check_finite_weights, check_loading_info, load_state_dict_strict

__all__ = ["SIZE_LIMITS", "TOKENIZERS", "import_transformers_class", "is_transformers_class", "load_model"]

logger = logging.getLogger(__name__)

#: The tokenizers fdm-vq handles: ``model_type`` of their config.json -> (model class, config class).
TOKENIZERS = {"janus_vqgan": ("JanusVQVAE", "JanusVQVAEConfig"), "emu3_vqgan": ("Emu3VQVAE", "Emu3VQVAEConfig")}
#: Whole multimodal models whose tokenizer can be loaded alone: ``model_type`` -> the tokenizer's ``model_type``.
MULTIMODAL = {"janus": "janus_vqgan", "emu3": "emu3_vqgan"}
#: Where the tokenizer's weights sit in a whole model's checkpoint (transformers' layout, then the older one).
VQ_PREFIXES = ("model.vqmodel.", "vqmodel.")

#: Largest value a tokenizer config may give a size, checked before transformers builds the model: the released
#: tokenizers (Janus: 16384 codes of 8, base 128; Emu3: 32768 codes of 4, base 256) stay far below.
SIZE_LIMITS: dict[str, int | tuple[int, int | None]] = {
    "embed_dim": 4096, "num_embeddings": 1 << 22, "codebook_size": 1 << 22, "latent_channels": 4096,
    "in_channels": 64, "out_channels": 64, "base_channels": 4096, "channel_multiplier": (8, 64),
    "num_res_blocks": 32, "num_patches": 4096, "temporal_downsample_factor": 64, "attn_resolutions": (8, 8),
}

_INSTALL = 'pip install ".[transformers]" (from a clone of fdm-vq)'
_LAYOUT = "a JanusVQVAE / Emu3VQVAE or a whole Janus / Emu3 model, as save_pretrained writes it"
_WRITER = "JanusVQVAE / Emu3VQVAE (or whole Janus / Emu3 model) save_pretrained"


def is_transformers_class(model: object, name: str) -> bool:
    """Whether ``model`` is (a subclass of) transformers' class ``name``, checked without importing transformers."""
    return any(cls.__name__ == name and cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def import_transformers_class(name: str) -> type:
    """transformers' class ``name``.

    Raises:
        MissingExtraError: transformers is not installed, or too old to have the class (names the extra to install).
    """
    try:
        import transformers
    except ImportError as err:
        raise MissingExtraError(f"transformers is needed for Janus and Emu3 tokenizers: {_INSTALL}") from err
    found = getattr(transformers, name, None)
    if found is None:
        raise MissingExtraError(f"transformers {transformers.__version__} has no {name}: {_INSTALL}")
    return found


def load_model(path_or_repo_id: str | Path, **kwargs: Any) -> nn.Module:
    """Load a ``JanusVQVAE`` or ``Emu3VQVAE``, in eval mode, every key and shape checked, from safetensors only.

    Args:
        path_or_repo_id: a folder or Hub repo id (``owner/name``; ``hf://owner/name/subfolder`` for a sub-folder)
            holding either a tokenizer (config.json with ``model_type`` ``janus_vqgan`` / ``emu3_vqgan``) or a whole
            Janus / Emu3 model (``janus`` / ``emu3``, e.g. ``deepseek-community/Janus-Pro-1B``): then its
            ``vq_config`` is built and only the ``vqmodel`` weights are read (only the shards holding them are
            fetched). :func:`fdm.io.hub.locate` decides what is local; nothing runs code from the checkpoint.
        **kwargs: ``subfolder``, ``revision``, ``cache_dir``, ``local_files_only``, ``token``; for a tokenizer folder
            also the other keywords of ``from_pretrained`` (``torch_dtype``...).

    Returns:
        The tokenizer in eval mode.

    Raises:
        MissingExtraError: transformers is not installed.
        ConfigError: config.json does not parse, or a size in it is out of bounds (:data:`SIZE_LIMITS`).
        CheckpointError: another kind of model; weights that miss keys, have unexpected ones or other shapes; no
            safetensors weights (pickled ``.bin`` files are refused).
        HubError: the repo, revision or file cannot be had (offline without a cached copy...).
        FileNotFoundError: ``file not found: PATH`` for a missing local path, at once.
    """
    where = locate(path_or_repo_id)  # a missing local path fails here, before transformers is imported
    if isinstance(where, Path):
        source = str(where)
    else:  # owner/name, or owner/name/subfolder (written hf://owner/name/subfolder)
        source = repo_with_subfolder(where, kwargs, given_as=str(path_or_repo_id))
    subfolder = kwargs.get("subfolder") or ""
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
    named = f"{source}{f' (subfolder {subfolder})' if subfolder else ''}"

    def fetch(name: str) -> Path:
        return resolve_file(source, f"{subfolder}/{name}" if subfolder else name, layout=_WRITER, **hub)

    config_file = fetch("config.json")
    config = read_json(config_file, "transformers config")
    kind = config.get("model_type")
    if kind in TOKENIZERS:
        check_sizes(config, SIZE_LIMITS, prefix=str(config_file))
        model = _from_pretrained(TOKENIZERS[kind][0], source, named, kwargs)
    elif kind in MULTIMODAL:
        vq_config = config.get("vq_config")
        if not isinstance(vq_config, dict):
            raise CheckpointError(f"{config_file} describes a {kind} model without a vq_config; expected {_LAYOUT}.")
        check_sizes(vq_config, SIZE_LIMITS, prefix=f"{config_file}: vq_config")
        model = _from_whole_model(MULTIMODAL[kind], vq_config, fetch, named)
    else:
        raise CheckpointError(f"{config_file} describes a model of type {kind!r}; expected {_LAYOUT} (model_type "
                              f"{', '.join(sorted(TOKENIZERS) + sorted(MULTIMODAL))}).")
    logger.info("loaded %s from %s", type(model).__name__, named)
    return model.eval()


def _from_pretrained(class_name: str, source: str, named: str, kwargs: dict[str, Any]) -> nn.Module:
    """A tokenizer folder through transformers' ``from_pretrained``: safetensors only, every key reported."""
    model_class = import_transformers_class(class_name)
    from transformers.utils import logging as transformers_logging

    kwargs = {**kwargs, "use_safetensors": True, "output_loading_info": True}  # never the pickled .bin fallback
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its key warnings become the one CheckpointError below
    try:
        model, info = model_class.from_pretrained(source, **kwargs)
    except FdmError:
        raise
    except OSError as err:  # transformers reports missing or unreadable files as EnvironmentError
        raise CheckpointError(f"transformers could not load a {class_name} from {named} (safetensors weights "
                              f"expected): {str(err).splitlines()[0]}") from err
    finally:
        transformers_logging.set_verbosity(verbosity)
    check_loading_info(info, into=f"{named} into the {class_name} its config.json describes")
    return model


def _from_whole_model(kind: str, vq_config: dict[str, Any], fetch: Any, named: str) -> nn.Module:
    """The tokenizer of a whole Janus / Emu3 checkpoint: built from its ``vq_config``, filled with its ``vqmodel``
    weights read from the safetensors shards that hold them."""
    from safetensors import safe_open

    class_name, config_name = TOKENIZERS[kind]
    model_class, config_class = import_transformers_class(class_name), import_transformers_class(config_name)
    shards = _shards(fetch, named)
    prefix = next((p for p in VQ_PREFIXES if any(k.startswith(p) for keys in shards.values() for k in keys)), None)
    if prefix is None:
        raise CheckpointError(f"{named} holds no tokenizer weights: expected keys starting with "
                              f"{' or '.join(VQ_PREFIXES)}.")
    state = {}
    for shard, keys in shards.items():
        wanted = [k for k in keys if k.startswith(prefix)]
        if wanted:
            with safe_open(str(fetch(shard)), framework="pt") as file:
                state.update({k[len(prefix):]: file.get_tensor(k) for k in wanted})
    check_finite_weights(state, what=f"the {class_name} weights of {named}")
    model = model_class(config_class.from_dict({**vq_config, "model_type": kind}))
    load_state_dict_strict(model, state, source=f"{class_name} weights of {named}", file_key=lambda k: prefix + k)
    return model


def _shards(fetch: Any, named: str) -> dict[str, list[str]]:
    """The safetensors files of a whole checkpoint and the keys each holds (from the shard index if there is one)."""
    try:
        index_file = fetch("model.safetensors.index.json")
    except CheckpointError:  # one file, no index (HubEntryNotFoundError is a CheckpointError too)
        from safetensors import safe_open

        single = fetch("model.safetensors")
        with safe_open(str(single), framework="pt") as file:
            return {"model.safetensors": list(file.keys())}
    weight_map = read_json(index_file, "safetensors shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file} has no weight_map of key -> shard file name.")
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if "/" in shard or "\\" in shard or shard.startswith("."):
            raise CheckpointError(f"{index_file} names the shard {json.dumps(shard)}; expected a file name beside it.")
        shards.setdefault(shard, []).append(key)
    return shards
