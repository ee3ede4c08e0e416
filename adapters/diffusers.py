"""diffusers' ``VQModel`` (VQ-GAN first stages of latent diffusion, VQ-Diffusion, aMUSEd, Kandinsky's MoVQ) with FDM
(Park & Jung, WACV 2025).

FDM works in the space of ``post_quant_conv``'s input, where ``z - z_q`` is defined:
``z = VQModel.encode(x).latents`` (after ``quant_conv``), ``z_q`` = the output of ``VQModel.quantize``.
Models are matched by class name and module prefix ``diffusers.``; diffusers itself is imported only when
a model is loaded (``pip install ".[diffusers]"`` from a clone).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fdm.adapter import VQAdapter
from fdm.config_io import check_sizes, read_json
from fdm.correction_hooks import SpatialNormCorrection, install_spatial_norm_correction
from fdm.errors import CheckpointError, FdmError, InputError, MissingExtraError
from fdm.io.hub import locate, repo_with_subfolder, resolve_file
from fdm.io.weights import check_loading_info
from fdm.registry import CliModel, ModelFamily

__all__ = ["FAMILY", "SIZE_LIMITS", "DiffusersVQAdapter", "import_vqmodel", "load_model"]

logger = logging.getLogger(__name__)


def import_vqmodel() -> type[nn.Module]:
    """diffusers' ``VQModel`` class.

    Raises:
        MissingExtraError: diffusers is not installed (an ImportError naming the extra to install).
    """
    try:
        from diffusers import VQModel
    except ImportError as err:
        raise MissingExtraError(
            'diffusers is needed for diffusers VQModels: pip install ".[diffusers]" (from a clone of fdm-vq)'
        ) from err
    return VQModel


def _is_diffusers_vqmodel(model: object) -> bool:
    return any(cls.__name__ == "VQModel" and cls.__module__.startswith("diffusers.") for cls in type(model).__mro__)


class DiffusersVQAdapter(VQAdapter):
    """diffusers' ``VQModel``.

    - ``encode(x)`` = ``model.encode(x).latents`` (``quant_conv(encoder(x))``), ``(B, C, h, w)`` with
      ``C = vq_embed_dim``; ``x`` in [-1, 1] is first mapped to the model's ``image_range``.
    - ``quantize(z)`` returns the model's own quantizer output (``z + (e - z).detach()``, which equals the code
      vector ``e`` up to float rounding) and the indices reshaped to ``(B, h, w)``, so that decoding it
      reproduces ``model.decode(z)`` bit for bit.
    - ``lookup(indices)`` = ``model.quantize.get_codebook_entry`` (exact code vectors).
    - ``decode(z)`` decodes ``z`` as given: ``model.decode(z, force_not_quantize=True)``. A model with
      ``lookup_from_codebook=True`` (aMUSEd) reads indices, not features, in that call, so its features go
      through ``decoder(post_quant_conv(z), ...)``, the same layers.
    - ``norm_type="spatial"`` (MoVQ): the decoder reads the quantized map twice, through ``post_quant_conv``
      and as the spatial-normalisation condition ``decoder(post_quant_conv(z_q), z_q)``. FDM replaces
      ``z_q`` by ``z_dq`` in **both** places (the corrected map stands in for the continuous feature
      everywhere), explicitly and when attached.

    Args:
        model: the ``VQModel``.
        image_range: (low, high) pixel range the model was trained on. None: (0, 1) for models with
            ``lookup_from_codebook=True`` (aMUSEd, whose pipelines feed [0, 1] images), else (-1, 1)
            (latent diffusion, VQ-Diffusion, MoVQ). Images in and out of the adapter are always in [-1, 1].
    """

    def __init__(self, model: nn.Module, image_range: tuple[float, float] | None = None):
        super().__init__(model)
        if image_range is None:
            image_range = (0.0, 1.0) if model.config.lookup_from_codebook else (-1.0, 1.0)
        low, high = (float(v) for v in image_range)
        if not high > low:
            raise ValueError(f"image_range must be (low, high) with high > low; got {tuple(image_range)}.")
        self.image_range = (low, high)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_diffusers_vqmodel(model)

    @property
    def factor(self) -> int:
        return 2 ** sum(block.downsamplers is not None for block in self.model.encoder.down_blocks)

    @property
    def channels(self) -> int:
        return self.model.quantize.vq_embed_dim

    @property
    def spatial_norm(self) -> bool:
        """True when the decoder takes the quantized map for spatial normalisation (MoVQ)."""
        return self.model.config.norm_type == "spatial"

    def codebook(self) -> torch.Tensor:
        return self.model.quantize.embedding.weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) image in [-1, 1] -> (B, C, H/f, W/f) ``quant_conv(encoder(x))``."""
        low, high = self.image_range
        if (low, high) != (-1.0, 1.0):
            x = (x + 1) * ((high - low) / 2) + low  # [-1, 1] -> [low, high]
        return self.model.encode(x).latents

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = z.shape
        z_q, _, (_, _, indices) = self.model.quantize(z)  # indices flat (B*h*w,) or (B*h*w, 1)
        return z_q, indices.reshape(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dim() != 3:
            raise InputError(f"indices must have shape (B, h, w); got {tuple(indices.shape)}.")
        b, h, w = indices.shape
        return self.model.quantize.get_codebook_entry(indices.reshape(-1), (b, h, w, self.channels))  # (B, C, h, w)

    def decode(self, z: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        """(B, C, h, w) features -> (B, C_out, H, W) image in [-1, 1], decoded without quantization."""
        if model_kwargs:
            raise TypeError(f"diffusers' VQModel decoder takes no extra inputs; got {sorted(model_kwargs)}.")
        if not self.model.config.lookup_from_codebook:
            image = self.model.decode(z, force_not_quantize=True).sample
        else:  # decode(h, force_not_quantize=True) would read h as code indices
            image = self.model.decoder(self.model.post_quant_conv(z), z if self.spatial_norm else None)
        low, high = self.image_range
        if (low, high) != (-1.0, 1.0):
            image = (image - low) * (2 / (high - low)) - 1  # [low, high] -> [-1, 1]
        return image

    def hook_module(self) -> nn.Module:
        return self.model.post_quant_conv

    def decoder_modules(self) -> dict[str, nn.Module]:
        return {"post_quant_conv": self.model.post_quant_conv, "decoder": self.model.decoder}

    def register_correction_hook(self, correct: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        """Correct ``post_quant_conv``'s input; for a spatially normalised decoder also its ``latent_embeds``.

        ``VQModel.decode`` passes the same ``quant`` tensor to ``post_quant_conv`` and then to the decoder:
        the decoder hook reuses the correction computed for that tensor instead of running FDM twice.
        """
        if not self.spatial_norm:
            return super().register_correction_hook(correct)
        hooks = SpatialNormCorrection(correct, condition_index=1, condition_name="latent_embeds")
        return install_spatial_norm_correction(self.model.post_quant_conv, self.model.decoder, hooks)


def _vqmodel_subfolder(folder: Path) -> str:
    """The sub-folder holding the VQModel of a saved diffusers pipeline (``model_index.json``)."""
    index = read_json(folder / "model_index.json", "diffusers pipeline index")
    names = [name for name, spec in index.items() if isinstance(spec, list) and list(spec) == ["diffusers", "VQModel"]]
    if len(names) != 1:
        found = ", ".join(names) or "none"
        raise CheckpointError(
            f"{folder} is a diffusers pipeline folder; expected exactly one VQModel component in model_index.json, "
            f"found {found}. Pass subfolder='<component>' to load_model."
        )
    return names[0]


#: Largest value a VQModel config.json may give a size (checked by :func:`fdm.config_io.check_sizes` before diffusers
#: builds the model): the released VQModels (amused, Kandinsky's MoVQ, LDM's VQ-f4) stay far below. For a list:
#: (most entries, largest entry).
SIZE_LIMITS: dict[str, int | tuple[int, int | None]] = {
    "in_channels": 64, "out_channels": 64, "latent_channels": 16384, "vq_embed_dim": 16384, "num_vq_embeddings": 1 << 22,
    "layers_per_block": 64, "norm_num_groups": 4096, "sample_size": 65536,
    "block_out_channels": (16, 16384), "down_block_types": (16, None), "up_block_types": (16, None),
}


def load_model(path_or_repo_id: str | Path, **kwargs: Any) -> nn.Module:
    """Load a diffusers ``VQModel`` with ``VQModel.from_pretrained``, in eval mode, every key and shape checked.

    diffusers itself only warns about missing or unexpected keys (and fills missing ones with random values);
    here they are errors, as are shapes that differ from the config's.

    Args:
        path_or_repo_id: a folder written by ``VQModel.save_pretrained``, a saved pipeline folder (its
            VQModel component is found through ``model_index.json``), a Hub repo id ``owner/name``, or
            ``hf://owner/name/subfolder`` for the VQModel inside a Hub pipeline repo
            (``hf://amused/amused-256/vqvae``). :func:`fdm.io.hub.locate` decides what is local.
        **kwargs: passed to ``VQModel.from_pretrained`` (``subfolder``, ``revision``, ``torch_dtype``,
            ``cache_dir``, ``local_files_only``...).

    Returns:
        The ``VQModel`` in eval mode.

    Raises:
        MissingExtraError: diffusers is not installed.
        ConfigError: config.json or model_index.json does not parse (names the file and line).
        CheckpointError: a pipeline folder without exactly one VQModel component; weights that miss keys of the
            config's model, have unexpected keys or other shapes (named as the file spells them); a folder
            diffusers cannot load, or one whose config.json values diffusers' constructors refuse.
        HubError: the Hub repo, revision or config.json cannot be had (offline without a cached copy...).
        FileNotFoundError: ``file not found: PATH`` for a missing local path, at once.
    """
    where = locate(path_or_repo_id)  # a missing local path fails here, before diffusers is imported or the Hub asked
    vqmodel_class = import_vqmodel()
    if isinstance(where, Path):
        source = str(where)
        if "subfolder" not in kwargs and where.is_dir() and not (where / "config.json").is_file() \
                and (where / "model_index.json").is_file():
            kwargs["subfolder"] = _vqmodel_subfolder(where)
    else:  # owner/name, or owner/name/subfolder (written hf://owner/name/subfolder)
        source = repo_with_subfolder(where, kwargs, given_as=str(path_or_repo_id))
    subfolder = kwargs.get("subfolder")
    logger.info("loading diffusers VQModel from %s%s", source, f" (subfolder {subfolder})" if subfolder else "")
    config_name = f"{subfolder}/config.json" if subfolder else "config.json"
    # a Hub config.json is fetched here so that Hub errors become fdm errors; diffusers then reads it from the cache
    hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
    config_file = resolve_file(source, config_name, layout="VQModel.save_pretrained", **hub_kwargs)
    check_sizes(read_json(config_file, "diffusers VQModel config"), SIZE_LIMITS, prefix=str(config_file))
    kwargs.setdefault("use_safetensors", True)  # never diffusers' pickled .bin fallback (see docs/security.md)
    kwargs.setdefault("ignore_mismatched_sizes", True)  # reported below, all at once, instead of the first only
    kwargs.pop("output_loading_info", None)  # always asked for: the keys are checked below
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its key warnings become the one CheckpointError below
    try:
        model, info = vqmodel_class.from_pretrained(source, output_loading_info=True, **kwargs)
    except FdmError:
        raise
    except OSError as err:  # diffusers reports missing or unreadable files as EnvironmentError
        raise CheckpointError(f"diffusers could not load a VQModel from {source}"
                              f"{f' (subfolder {subfolder})' if subfolder else ''}: {err}") from err
    except (TypeError, ValueError, LookupError, AssertionError) as err:  # config values its constructors refuse
        raise CheckpointError(f"diffusers could not build the VQModel that {config_file} describes: "
                              f"{type(err).__name__}: {err}") from err
    finally:
        diffusers_logging.set_verbosity(verbosity)
    check_loading_info(info, into=f"{source}{f' (subfolder {subfolder})' if subfolder else ''} into the VQModel its "
                                  "config.json describes (keys read in the diffusers VQModel layout)")
    return model.eval()


def _load_from_options(args: Any) -> nn.Module:
    return load_model(args.checkpoint)


#: The family's declaration for :mod:`fdm.registry` (``--model diffusers`` on the command line).
FAMILY = ModelFamily(
    name="diffusers",
    adapters=(DiffusersVQAdapter,),
    load_model=load_model,
    extra="diffusers",
    cli_models={"diffusers": CliModel(_load_from_options, requires=("checkpoint",))},
)
