"""Loading PUT (liuqk3/PUT, CVPR 2022) and FDM-authors (hyudsl/FDM, WACV 2025) checkpoints into
:class:`~fdm.adapters.put.PUT`, with the key remaps between the two layouts in both directions.

Formats (``torch.save({'model': state_dict})``, read with ``weights_only=True``):

- PUT P-VQVAE: ``encoder.* quantize.* quant_conv.* post_quant_conv.* decoder.*`` (+ training-only ``loss.*``).
- PUT transformer: ``emb_proj pos_emb blocks.* layer_norm to_logits`` plus its codec as ``content_codec.*``.
- FDM authors: ``content_codec.*`` (FDM layout), ``fdm.mix.*`` or ``lip.mix.*``, ``generator.*``, ``loss.*``,
  ``temp``. The FDM layout writes PUT's leading ReLUs as separate layers, which shifts Sequential indices:
  encoder ``res_layers.N.layers.{1,3}`` <-> ``{0,2}`` and ``post_layers.1`` <-> ``0``; decoder
  ``res_layers.N.conv.{1,3}`` <-> ``{0,2}`` and ``post_layers.1`` <-> ``0``. Same weights, same function.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fdm.adapters.put.model import PUT
from fdm.adapters.put.pvqvae import PVQVAE
from fdm.adapters.put.transformer import UQTransformer
from fdm.errors import CheckpointError
from fdm.io.hub import resolve_file
from fdm.io.official import fdm_to_official_state_dict
from fdm.io.torch_files import read_checkpoint
from fdm.io.weights import check_state_dict, load_state_dict_strict
from fdm.module import FDM

__all__ = [
    "fdm_authors_state_dict",
    "fdm_to_put_layout",
    "load_model",
    "put_state_dicts",
    "put_to_fdm_layout",
    "pvqvae_config_from_state_dict",
    "split_checkpoint",
    "transformer_config_from_state_dict",
]

logger = logging.getLogger(__name__)

# (PUT-layout pattern, FDM-layout replacement) for P-VQVAE keys; all other keys are the same in both.
_PUT_TO_FDM = [
    (r"^encoder\.res_layers\.(\d+)\.layers\.1\.", r"encoder.res_layers.\1.layers.0."),
    (r"^encoder\.res_layers\.(\d+)\.layers\.3\.", r"encoder.res_layers.\1.layers.2."),
    (r"^encoder\.post_layers\.1\.", "encoder.post_layers.0."),
    (r"^decoder\.res_layers\.(\d+)\.conv\.1\.", r"decoder.res_layers.\1.conv.0."),
    (r"^decoder\.res_layers\.(\d+)\.conv\.3\.", r"decoder.res_layers.\1.conv.2."),
    (r"^decoder\.post_layers\.1\.", "decoder.post_layers.0."),
]
_FDM_TO_PUT = [
    (r"^encoder\.res_layers\.(\d+)\.layers\.0\.", r"encoder.res_layers.\1.layers.1."),
    (r"^encoder\.res_layers\.(\d+)\.layers\.2\.", r"encoder.res_layers.\1.layers.3."),
    (r"^encoder\.post_layers\.0\.", "encoder.post_layers.1."),
    (r"^decoder\.res_layers\.(\d+)\.conv\.0\.", r"decoder.res_layers.\1.conv.1."),
    (r"^decoder\.res_layers\.(\d+)\.conv\.2\.", r"decoder.res_layers.\1.conv.3."),
    (r"^decoder\.post_layers\.0\.", "decoder.post_layers.1."),
]
_FDM_LAYOUT_ONLY = re.compile(r"^(encoder\.res_layers\.\d+\.layers\.0|encoder\.post_layers\.0|"
                              r"decoder\.res_layers\.\d+\.conv\.0|decoder\.post_layers\.0)\.")
_CODEC_ROOTS = {"encoder", "decoder", "quantize", "quant_conv", "post_quant_conv"}
_TRANSFORMER_ROOTS = {"emb_proj", "pos_emb", "blocks", "layer_norm", "to_logits"}
# leftovers of hyudsl/FDM's script/convert_from_put.py (the pre-conversion copies of the same weights)
_CONVERT_LEFTOVERS = re.compile(r"^(encoder|decoder)\._(pre|res|post)_layers\.")


def _remap_key(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _remap(state_dict: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    return {_remap_key(key, rules): tensor for key, tensor in state_dict.items()}


@dataclass(frozen=True)
class _Spelling:
    """How a checkpoint spells the keys of one part (P-VQVAE or UQ-Transformer): a prefix, and for the P-VQVAE
    whether the FDM authors' Sequential indices are used. ``key`` maps a PUT-layout key to the file's spelling."""

    prefix: str = ""
    fdm_layout: bool = False
    transformer: bool = False

    def key(self, key: str) -> str:
        return self.prefix + (_remap_key(key, _PUT_TO_FDM) if self.fdm_layout else key)

    @property
    def layout(self) -> str:
        """The layout's name in messages."""
        if self.fdm_layout:
            return f"FDM authors' (hyudsl/FDM) {self.prefix}*" if self.prefix else "FDM authors' (hyudsl/FDM)"
        if self.transformer:
            return f"FDM authors' (hyudsl/FDM) {self.prefix}*" if self.prefix else "PUT transformer"
        return f"PUT transformer-file {self.prefix}*" if self.prefix else "PUT P-VQVAE"


def _source_name(source: Any) -> str:
    return f"checkpoint {source}" if isinstance(source, (str, Path)) else "checkpoint dict"


def put_to_fdm_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """P-VQVAE keys in PUT's layout -> the FDM authors' layout (keys without a ``content_codec.`` prefix)."""
    return _remap(state_dict, _PUT_TO_FDM)


def fdm_to_put_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """P-VQVAE keys in the FDM authors' layout -> PUT's layout (inverse of :func:`put_to_fdm_layout`)."""
    return _remap(state_dict, _FDM_TO_PUT)


def _get(sd: dict[str, torch.Tensor], key: str, what: str, spell: Callable[[str], str] | None = None) -> torch.Tensor:
    if key not in sd:
        spell = spell or (lambda k: k)
        raise CheckpointError(f"The {what} weights lack {spell(key)!r}; found keys such as "
                              f"{[spell(k) for k in sorted(sd)[:6]]}.")
    return sd[key]


def _count(sd: dict[str, torch.Tensor], pattern: str, what: str, spell: Callable[[str], str]) -> int:
    """1 + the highest index matching ``pattern`` (a block with a missing key then shows up as that key).

    Raises:
        CheckpointError: an index larger than the file's tensor count (each block has tensors of its own: a crafted
            key such as ``blocks.1000000000.ln1.weight`` must not make a model of a billion blocks).
    """
    regex = re.compile(pattern)
    indices = {int(m.group(1)): k for k in sd if (m := regex.match(k))}
    count = 1 + max(indices, default=-1)
    if count > len(sd):
        raise CheckpointError(f"The {what} weights name block {count - 1} ({spell(indices[count - 1])}) but hold only "
                              f"{len(sd)} tensors: a file this size has no such block (corrupted or crafted).")
    return count


def _dims(sd: dict[str, torch.Tensor], key: str, ndim: int, what: str, spell: Callable[[str], str]) -> torch.Tensor:
    tensor = _get(sd, key, what, spell)
    if tensor.dim() != ndim:
        raise CheckpointError(f"The {what} weight {spell(key)} has shape {tuple(tensor.shape)}; expected {ndim} "
                              "dimensions.")
    return tensor


def pvqvae_config_from_state_dict(
    sd: dict[str, torch.Tensor], known_codes: int | None = None, *, file_key: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """:class:`PVQVAE` constructor arguments read from the shapes of a PUT-layout state dict.

    ``known_codes`` (the size of the codebook half for known patches) is not in the weights: it defaults
    to half the codebook, as in every released model. ``file_key`` spells keys in messages as the file does.
    """
    what, spell = "P-VQVAE", file_key or (lambda k: k)
    pre = _dims(sd, "encoder.pre_layers.0.weight", 2, what, spell)
    patch = math.isqrt(pre.shape[1] // 3)
    if 3 * patch * patch != pre.shape[1]:
        raise CheckpointError(f"{spell('encoder.pre_layers.0.weight')} has {pre.shape[1]} inputs, not 3 x patch^2.")
    enc_blocks = _count(sd, r"^encoder\.res_layers\.(\d+)\.layers\.1\.weight$", what, spell)
    dec_blocks = _count(sd, r"^decoder\.res_layers\.(\d+)\.conv\.1\.weight$", what, spell)
    num_codes = _dims(sd, "quantize.embedding", 2, what, spell).shape[0]
    dec_pre = _dims(sd, "decoder.pre_layers.0.weight", 4, what, spell)
    return {
        "patch_size": patch,
        "encoder_channels": pre.shape[0],
        "encoder_out_channels": _dims(sd, "encoder.post_layers.1.weight", 2, what, spell).shape[0],
        "encoder_blocks": enc_blocks,
        "encoder_block_channels": (_get(sd, "encoder.res_layers.0.layers.1.weight", what, spell).shape[0]
                                   if enc_blocks else pre.shape[0] // 2),
        "num_codes": num_codes,
        "embed_dim": _dims(sd, "quant_conv.weight", 4, what, spell).shape[0],
        "known_codes": known_codes or num_codes // 2,
        "decoder_in_channels": _dims(sd, "post_quant_conv.weight", 4, what, spell).shape[0],
        "decoder_channels": dec_pre.shape[0],
        "decoder_blocks": dec_blocks,
        "decoder_block_channels": (_get(sd, "decoder.res_layers.0.conv.1.weight", what, spell).shape[0]
                                   if dec_blocks else dec_pre.shape[0] // 2),
        "base_channels": _dims(sd, "decoder.post_layers.1.weight", 4, what, spell).shape[1],
    }


def transformer_config_from_state_dict(
    sd: dict[str, torch.Tensor], *, file_key: Callable[[str], str] | None = None, **overrides: Any
) -> dict[str, Any]:
    """:class:`UQTransformer` constructor arguments read from a state dict's shapes (``n_head`` and
    ``activation`` are not in the weights: defaults 8 and ``"gelu2"``, as released; pass ``overrides``).
    ``file_key`` spells keys in messages as the file does."""
    what, spell = "UQ-Transformer", file_key or (lambda k: k)
    proj = _dims(sd, "emb_proj.weight", 2, what, spell)
    n_embd = proj.shape[0]
    config = {
        "embed_dim": proj.shape[1],
        "n_embd": n_embd,
        "n_layer": _count(sd, r"^blocks\.(\d+)\.ln1\.weight$", what, spell),
        "num_codes": _dims(sd, "to_logits.weight", 2, what, spell).shape[0],
        "seq_len": _dims(sd, "pos_emb", 3, what, spell).shape[1],
        "mlp_ratio": _get(sd, "blocks.0.mlp.0.weight", what, spell).shape[0] // n_embd,
    }
    config.update(overrides)
    return config


def split_checkpoint(source: str | Path | dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a PUT or FDM-authors checkpoint into its parts.

    Args:
        source: a file (``.pth`` / ``.safetensors``) or an already loaded ``{'model': state_dict}`` / state dict.

    Returns:
        ``{"codec": ..., "transformer": ..., "fdm": ...}``: the P-VQVAE in PUT's layout (FDM-layout keys are
        remapped), the UQ-Transformer (unprefixed keys), and the official FDM weights (``fdm.mix.*`` /
        ``lip.mix.*``, for :meth:`fdm.FDM.from_official_checkpoint`). Absent parts are empty dicts.
        Training-only keys (``loss.*``, ``temp``) are dropped.

    Raises:
        CheckpointError: keys that belong to none of the parts.
    """
    return _split(source)[0]


def _split(source: str | Path | dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, _Spelling]]:
    """:func:`split_checkpoint`, plus how the file spells the keys of the codec and transformer parts."""
    obj = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    if not isinstance(obj, dict):
        raise CheckpointError(f"Expected a state dict or {{'model': state_dict}}; got {type(obj).__name__}.")
    state = check_state_dict(obj.get("model", obj.get("state_dict", obj)), source=f"PUT {_source_name(source)}")
    parts: dict[str, dict[str, torch.Tensor]] = {"codec": {}, "transformer": {}, "fdm": {}}
    prefixes: dict[str, set[str]] = {"codec": set(), "transformer": set()}
    dropped, unknown = [], []
    for key, tensor in state.items():
        root = key.split(".", 1)[0]
        if root == "loss" or key == "temp":
            dropped.append(key)
        elif root in ("fdm", "lip"):
            parts["fdm"][key] = tensor
        elif root == "content_codec":
            parts["codec"][key[len("content_codec."):]] = tensor
            prefixes["codec"].add("content_codec.")
        elif root == "generator":
            parts["transformer"][key[len("generator."):]] = tensor
            prefixes["transformer"].add("generator.")
        elif root in _CODEC_ROOTS:
            parts["codec"][key] = tensor
            prefixes["codec"].add("")
        elif root in _TRANSFORMER_ROOTS:
            parts["transformer"][key] = tensor
            prefixes["transformer"].add("")
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"Keys that are neither PUT P-VQVAE, UQ-Transformer nor FDM weights: {unknown[:10]}.")
    codec = parts["codec"]
    leftovers = [k for k in codec if _CONVERT_LEFTOVERS.match(k)]
    for key in leftovers:
        del codec[key]
    fdm_layout = any(_FDM_LAYOUT_ONLY.match(k) for k in codec)
    if fdm_layout:
        parts["codec"] = fdm_to_put_layout(codec)
    if dropped or leftovers:
        logger.debug("checkpoint: dropped %d training-only / conversion keys", len(dropped) + len(leftovers))
    spellings = {
        "codec": _Spelling(prefix=max(prefixes["codec"], default=""), fdm_layout=fdm_layout),
        "transformer": _Spelling(prefix=max(prefixes["transformer"], default=""), transformer=True),
    }
    return parts, spellings


def load_model(
    checkpoint: str | Path | dict[str, Any],
    transformer: str | Path | dict[str, Any] | None = None,
    *,
    n_head: int = 8,
    activation: str = "gelu2",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> PUT:
    """Load a PUT model, sizes inferred from the weights' shapes, every key and shape checked.

    Args:
        checkpoint: the P-VQVAE: a PUT ``p_vqvae`` checkpoint, a PUT transformer checkpoint (its
            ``content_codec``), or an FDM-authors checkpoint; a path, a loaded dict, or ``"hf://owner/repo/file"``
            on the Hugging Face Hub (a missing local path fails at once: :func:`fdm.io.hub.locate`). If it also
            holds UQ-Transformer weights they are loaded too.
        transformer: a separate UQ-Transformer checkpoint (PUT transformer file or FDM ``generator.pth``).
        n_head / activation: UQ-Transformer settings the weights do not record (released: 8, ``"gelu2"``).
        revision / cache_dir / local_files_only: passed to ``hf_hub_download`` for Hub ids.

    Returns:
        A :class:`PUT` in eval mode (``transformer`` None when no sampler weights were given).

    Example:
        >>> model = load_model("p_vqvae_places.pth", "transformer_places.pth")  # doctest: +SKIP
    """
    def parts_of(source: str | Path | dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                               dict[str, _Spelling], str]:
        if not isinstance(source, dict):
            source = resolve_file(source, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        return (*_split(source), _source_name(source))

    main, spelling, name = parts_of(checkpoint)
    if not main["codec"]:
        raise CheckpointError(f"No P-VQVAE weights in {name} (expected keys encoder.*, decoder.*, "
                              "quantize.* ... or content_codec.*).")
    sampler_sd, sampler_spelling, sampler_name = main["transformer"], spelling["transformer"], name
    if transformer is not None:
        extra, extra_spelling, sampler_name = parts_of(transformer)
        if not extra["transformer"]:
            raise CheckpointError(f"No UQ-Transformer weights in the transformer {sampler_name} (expected "
                                  "emb_proj, pos_emb, blocks.* ... or generator.*).")
        sampler_sd, sampler_spelling = extra["transformer"], extra_spelling["transformer"]
        _check_same_codebook(main["codec"], extra["codec"])
    t_config = transformer_config_from_state_dict(sampler_sd, file_key=sampler_spelling.key, n_head=n_head,
                                                  activation=activation) if sampler_sd else None
    codec_spelling = spelling["codec"]
    codec = PVQVAE(**pvqvae_config_from_state_dict(main["codec"], t_config and t_config["num_codes"],
                                                   file_key=codec_spelling.key))
    load_state_dict_strict(codec, main["codec"], source=f"P-VQVAE weights of {name}", file_key=codec_spelling.key,
                           layout=codec_spelling.layout)
    sampler = None
    if sampler_sd:
        sampler = UQTransformer(**t_config)
        load_state_dict_strict(sampler, sampler_sd, source=f"UQ-Transformer weights of {sampler_name}",
                               file_key=sampler_spelling.key, layout=sampler_spelling.layout)
    return PUT(codec, sampler).eval()


def _check_same_codebook(codec: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    a, b = codec.get("quantize.embedding"), other.get("quantize.embedding")
    if a is not None and b is not None and (a.shape != b.shape or not torch.equal(a, b)):
        raise CheckpointError("The transformer checkpoint was trained with another codebook than the P-VQVAE "
                              "given (their quantize.embedding differ): the two files are not a pair.")


def put_state_dicts(model: PUT) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``model`` in PUT's own layout: (P-VQVAE state dict, transformer state dict with ``content_codec.*``)."""
    codec = {k: v.detach() for k, v in model.codec.state_dict().items()}
    if model.transformer is None:
        return codec, None
    sampler = {k: v.detach() for k, v in model.transformer.state_dict().items()}
    sampler.update({f"content_codec.{k}": v for k, v in codec.items()})
    return codec, sampler


def fdm_authors_state_dict(model: PUT, fdm_module: FDM | None = None) -> dict[str, torch.Tensor]:
    """``model`` (and an :class:`fdm.FDM` of the paper's shape) in the FDM authors' layout: ``content_codec.*``
    (FDM layout), ``generator.*``, ``fdm.mix.*``; save it as ``{'model': ...}`` to get their file format."""
    if fdm_module is not None and (fdm_module.num_blocks != 8 or fdm_module.hidden_channels != fdm_module.channels
                                   or fdm_module.mask_channels != 1):
        raise ValueError("The FDM authors' format holds an FDM with 8 blocks, hidden_channels == channels and a "
                         f"mask channel; this one has {fdm_module.config}.")
    out = {f"content_codec.{k}": v.detach() for k, v in put_to_fdm_layout(model.codec.state_dict()).items()}
    if model.transformer is not None:
        out.update({f"generator.{k}": v.detach() for k, v in model.transformer.state_dict().items()})
    if fdm_module is not None:
        out.update(fdm_to_official_state_dict(fdm_module.state_dict()))
    return out
