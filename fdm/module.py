"""The Feature Dequantization Module (Park & Jung, "Improving Detail in Pluralistic Image Inpainting
with Feature Dequantization", WACV 2025, arXiv:2412.01046).

A small conv net ``F`` that predicts the quantization residual ``z - z_q`` from the quantized map and a
latent-cell mask, so that ``z_dq = z_q + F([z_q, m]) * m`` is closer to the encoder's continuous feature.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import nn

from fdm.checkpoint import load_state_dict_strict, read_safetensors, write_weights
from fdm.config_io import read_json
from fdm.errors import CheckpointError, HubError
from fdm.hub import WEIGHTS_NAME, _is_generated_model_card, build_model_card, locate, resolve_file
from fdm.validation import check_latent, check_latent_mask

__all__ = ["FDM", "ResidualBlock"]

logger = logging.getLogger(__name__)

PAPER_URL = "https://arxiv.org/abs/2412.01046"


class ResidualBlock(nn.Module):
    """conv3x3 (C -> C/2), ReLU, conv1x1 (C/2 -> C), add the input, ReLU (the paper's block)."""

    def __init__(self, channels: int, bottleneck_channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, bottleneck_channels, 3, padding=1)
        self.expand = nn.Conv2d(bottleneck_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.reduce(x))  # (B, C/2, h, w)
        return torch.relu(x + self.expand(h))  # (B, C, h, w)


MAX_LOADED_PARAMETERS = 200_000_000
"""Most parameters an FDM read from a config.json may have (the paper's, at 256 channels, has 3.8 M); checked before
allocating."""


def _check_size(config: dict[str, Any], source: str) -> None:
    """Refuse sizes that are not integers, or an FDM larger than :data:`MAX_LOADED_PARAMETERS`, before building it."""
    sizes = {k: config.get(k, default) for k, default in
             (("channels", 256), ("mask_channels", 1), ("hidden_channels", None), ("num_blocks", 8))}
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"{source}: {name} must be an integer; got {value!r}.")
    c, m, blocks = sizes["channels"], sizes["mask_channels"], sizes["num_blocks"]
    h = c if sizes["hidden_channels"] is None else sizes["hidden_channels"]
    count = 9 * (c + m) * h + blocks * (9 * h * (h // 2) + (h // 2) * h) + 9 * h * c  # convolution weights
    if count > MAX_LOADED_PARAMETERS:
        raise CheckpointError(f"{source} describes an FDM of about {count:,} parameters (channels {c}, hidden "
                              f"{h}, {blocks} blocks); more than {MAX_LOADED_PARAMETERS:,} is refused.")


class FDM(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="fdm-vq",
    repo_url="https://github.com/fdm-vq/fdm-vq",
    paper_url=PAPER_URL,
    docs_url="https://github.com/fdm-vq/fdm-vq/tree/main/docs",
    license="mit",
    tags=["fdm", "vector-quantization", "vqgan", "image-generation", "inpainting"],
):
    """Feature Dequantization Module.

    Args:
        channels: channel count ``C`` of the quantized map (the codebook dimension).
        mask_channels: 1 for mask-conditioned use (inpainting), 0 for unconditional / class-conditional
            models where every latent cell is generated.
        hidden_channels: width of the residual trunk; defaults to ``channels`` (the paper). Each
            residual block narrows to half of it.
        num_blocks: number of residual blocks (8 in the paper).
        base_model: free-text name of the VQ model this FDM was trained for (repo id, config name).
        base_model_fingerprint: fingerprint of that model's codebook (see :mod:`fdm.fingerprint`);
            the :class:`~fdm.Dequantizer` refuses a model whose fingerprint differs.
        training: JSON-able description of how the weights were trained (written to the model card).
        finetuned_decoder: True when the weights were trained jointly with a fine-tuned decoder
            (phase 3); such an FDM is only valid together with that decoder.

    A freshly constructed FDM is an exact identity: its output convolution is zero-initialised.

    Example:
        >>> import torch, fdm
        >>> module = fdm.FDM(channels=8, hidden_channels=16, num_blocks=2)
        >>> z_q = torch.randn(1, 8, 4, 4)
        >>> torch.equal(module(z_q), z_q)
        True
    """

    def __init__(
        self,
        channels: int = 256,
        mask_channels: int = 1,
        hidden_channels: int | None = None,
        num_blocks: int = 8,
        base_model: str | None = None,
        base_model_fingerprint: str | None = None,
        training: dict[str, Any] | None = None,
        finetuned_decoder: bool = False,
    ):
        super().__init__()
        if channels < 1 or num_blocks < 0 or mask_channels not in (0, 1):
            raise ValueError(
                f"FDM needs channels >= 1, num_blocks >= 0 and mask_channels in (0, 1); got channels="
                f"{channels}, num_blocks={num_blocks}, mask_channels={mask_channels}."
            )
        hidden = channels if hidden_channels is None else hidden_channels
        if hidden < 2:
            raise ValueError(f"hidden_channels must be at least 2 (each block narrows to half); got {hidden}.")
        self.channels = channels
        self.mask_channels = mask_channels
        self.hidden_channels = hidden
        self.num_blocks = num_blocks
        self.base_model = base_model
        self.base_model_fingerprint = base_model_fingerprint
        self.training_info = dict(training or {})
        self.finetuned_decoder = finetuned_decoder
        #: Phase 3: weights of the decoder fine-tuned with this FDM (``decoder.safetensors``, see
        #: :mod:`fdm.finetuned_decoder`); the Dequantizer loads them into the base model's decoder.
        self.decoder_state: dict[str, torch.Tensor] | None = None

        self.stem = nn.Conv2d(channels + mask_channels, hidden, 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden, hidden // 2) for _ in range(num_blocks)))
        self.head = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-able (what ``save_pretrained`` writes to config.json)."""
        return {
            "channels": self.channels,
            "mask_channels": self.mask_channels,
            "hidden_channels": self.hidden_channels,
            "num_blocks": self.num_blocks,
            "base_model": self.base_model,
            "base_model_fingerprint": self.base_model_fingerprint,
            "training": self.training_info or None,
            "finetuned_decoder": self.finetuned_decoder,
        }

    def predict_error(
        self, z_q: torch.Tensor, mask: torch.Tensor | None = None, *, check_binary: bool = True
    ) -> torch.Tensor:
        """The predicted residual ``F([z_q, m]) * m``.

        Args:
            z_q: (B, C, h, w) quantized (or partly continuous) feature map.
            mask: (B, 1, h, w) latent-cell mask, 1 = generated cell, or None for all ones.
            check_binary: check that ``mask`` holds only 0 and 1 (a device sync); False for a mask the caller
                checked or built (the :class:`~fdm.Dequantizer` passes False).

        Returns:
            (B, C, h, w) residual, zero on cells where ``mask`` is 0.
        """
        check_latent(z_q, self.channels, name="z_q")
        if mask is not None:
            check_latent_mask(mask, z_q, check_binary=check_binary)
            mask = mask.to(z_q.dtype)
        if self.mask_channels:
            cell_mask = torch.ones_like(z_q[:, :1]) if mask is None else mask.expand(z_q.shape[0], -1, -1, -1)
            x = torch.cat([z_q, cell_mask], dim=1)  # (B, C + 1, h, w)
        else:
            x = z_q  # (B, C, h, w)
        h = torch.relu(self.stem(x))  # (B, hidden, h, w)
        h = self.blocks(h)  # (B, hidden, h, w)
        residual = self.head(h)  # (B, C, h, w)
        return residual if mask is None else residual * mask

    def forward(
        self, z_q: torch.Tensor, mask: torch.Tensor | None = None, *, check_binary: bool = True
    ) -> torch.Tensor:
        """The dequantized map ``z_q + F([z_q, m]) * m`` (B, C, h, w); see :meth:`predict_error`."""
        return z_q + self.predict_error(z_q, mask, check_binary=check_binary)

    @classmethod
    def from_official_checkpoint(
        cls, path_or_state_dict: str | Path | dict[str, torch.Tensor], **config: Any
    ) -> FDM:
        """Load the weights released with the paper (hyudsl/FDM).

        Accepts a ``{'model': state_dict}`` file (``.pth``, read by :func:`fdm.checkpoint.read_checkpoint`, which runs no pickled code) or a state
        dict; FDM keys are ``fdm.mix.*`` (older releases: ``lip.mix.*``); other keys (codec, sampler,
        ``loss.*``) are ignored. Every FDM key and shape is checked.

        Args:
            path_or_state_dict: checkpoint path or an already loaded state dict.
            **config: extra constructor arguments (``base_model``, ``base_model_fingerprint``...).

        Returns:
            An :class:`FDM` in eval mode whose outputs equal the official module's.
        """
        from fdm.official_checkpoint import load_official_fdm

        return load_official_fdm(cls, path_or_state_dict, **config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> FDM:
        """Load an FDM from a folder written by :meth:`save_pretrained` or from a Hub repo.

        Args:
            pretrained_model_name_or_path: a folder, or a Hub repo id ``owner/name`` or ``hf://owner/name``
                (downloaded through the huggingface_hub cache; ``HF_HUB_OFFLINE=1`` loads a cached copy without
                network). :func:`fdm.hub.locate` decides which: a missing local path (``./fdm``, ``runs/a/fdm``,
                ``a/b`` while a folder ``./a`` exists) fails at once, without trying the Hub.
            **kwargs: ``revision``, ``cache_dir``, ``force_download``, ``local_files_only``, ``token`` (Hub
                options); ``map_location`` (device of the loaded module, default ``"cpu"``); any other keyword
                overrides the config.json entry of that name.

        Returns:
            The FDM in eval mode; every weight key and shape was checked against config.json.

        Raises:
            CheckpointError: config.json or model.safetensors is missing, unreadable, truncated or corrupted, or
                config.json does not describe the weights (names the missing / unexpected / mis-shaped keys); a
                file given where a folder was expected.
            ConfigError: config.json does not parse (names the file and line).
            HubError: the Hub repo or revision does not exist, or offline mode is on without a cached copy; a Hub
                reference with a path inside the repo.
            FileNotFoundError: ``file not found: PATH`` for a local path that does not exist.
        """
        source = locate(pretrained_model_name_or_path)  # a missing local path fails here, before any network
        if isinstance(source, str) and source.count("/") > 1:
            raise HubError(f"{pretrained_model_name_or_path}: an FDM is a whole Hub repo; expected owner/name, "
                           "without a path inside the repo.")
        if isinstance(source, Path) and source.is_dir():
            config_file = source / "config.json"
        else:  # a local file is refused; a Hub config.json is fetched here so that Hub errors become fdm errors
            hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
            config_file = resolve_file(source, "config.json", **hub_kwargs)
        if config_file.is_file():
            read_json(config_file, "FDM config")  # the mixin's json.load names no file
        return super().from_pretrained(str(source), **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        config: dict[str, Any] | None = None,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> FDM:
        """Hub-mixin hook behind :meth:`from_pretrained`; the mixin passes config.json as ``config`` and its
        entries (plus the caller's overrides) as ``model_kwargs``.

        Replaces the mixin's loader, which prints and loads with ``strict=False``. A phase-3 FDM
        (``finetuned_decoder=True``) also reads ``decoder.safetensors`` into :attr:`decoder_state`.
        """
        if not strict:
            raise ValueError("FDM.from_pretrained checks every key and shape; strict=False is not supported.")
        hub_kwargs = {"revision": revision, "cache_dir": cache_dir, "force_download": force_download,
                      "local_files_only": local_files_only, "token": token}
        weights_path = resolve_file(model_id, WEIGHTS_NAME, **hub_kwargs)
        if config is None:
            raise CheckpointError(f"{model_id} has no config.json next to {WEIGHTS_NAME}; it is needed to "
                                  "build the FDM (FDM.save_pretrained writes both).")
        known = list(cls._hub_mixin_init_parameters)[1:]  # [1:]: self
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise CheckpointError(f"config.json of {model_id} has unknown entries {unknown}; an FDM config "
                                  f"has {known}.")
        _check_size(model_kwargs, f"config.json of {model_id}")
        try:
            module = cls(**model_kwargs)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"config.json of {model_id} (with the keyword arguments given) does not "
                                  f"describe a valid FDM: {err}") from err
        try:
            load_state_dict_strict(module, read_safetensors(weights_path, require_finite=True),
                                   source=f"weight file {weights_path}")
        except CheckpointError as err:
            arch = {k: module.config[k] for k in ("channels", "mask_channels", "hidden_channels", "num_blocks")}
            message = f"config.json of {model_id} ({arch}) does not match its weights. {err}"
            raise CheckpointError(message) from err
        if module.finetuned_decoder:
            from fdm.finetuned_decoder import read_decoder_weights

            module.decoder_state = read_decoder_weights(model_id, **hub_kwargs)
        return module.to(map_location).eval()

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: dict[str, Any] | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write ``model.safetensors``, ``config.json`` and a ``README.md`` model card to ``save_directory``.

        config.json is always the current :attr:`config` (the mixin would write the constructor arguments,
        missing fields set later such as ``base_model_fingerprint`` or ``training``). A README.md that fdm-vq
        generated is regenerated; a hand-written one (without :data:`fdm.hub.MODEL_CARD_MARKER`) is kept.

        Args:
            save_directory: folder to write (created if needed).
            config: None, or equal to :attr:`config` (the config is derived from the module).
            repo_id, push_to_hub, **push_to_hub_kwargs: also push to the Hub (see :meth:`push_to_hub`).
            model_card_kwargs: ``{"repo_id": ...}`` for the card's usage snippet.

        Returns:
            The commit URL when pushing, else None.
        """
        self._check_config()  # before anything is written: a bad field would fail after the weights
        if config is not None and json.loads(json.dumps(config)) != json.loads(json.dumps(self.config)):
            raise ValueError(f"config is derived from the module and cannot be overridden; got {config}, the "
                             f"module's is {self.config}. Set the attributes (e.g. base_model) instead.")
        card_path = Path(save_directory) / "README.md"
        if _is_generated_model_card(card_path):
            card_path.unlink()  # the mixin writes README.md only when absent
        elif card_path.exists():
            logger.info("keeping the hand-written model card %s", card_path)
        return super().save_pretrained(save_directory, config=self.config, repo_id=repo_id,
                                       push_to_hub=push_to_hub, model_card_kwargs=model_card_kwargs,
                                       **push_to_hub_kwargs)

    def _check_config(self) -> None:
        """Raise TypeError unless the fields set after construction fit config.json (strings, a dict of plain
        data)."""
        for name in ("base_model", "base_model_fingerprint"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"FDM.{name} must be a string or None; got {type(value).__name__} {value!r}.")
        if not isinstance(self.training_info, dict):
            raise TypeError(f"FDM.training_info must be a dict; got {type(self.training_info).__name__}.")
        try:
            json.dumps(self.config)
        except (TypeError, ValueError) as err:
            raise TypeError(f"FDM.training_info must hold only JSON data (numbers, strings, lists, dicts): {err}.") \
                from err

    def push_to_hub(
        self, repo_id: str, *, model_card_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> str:
        """Upload the :meth:`save_pretrained` files to the Hub repo ``repo_id`` (created if needed).

        Same options as :meth:`huggingface_hub.PyTorchModelHubMixin.push_to_hub` (``private``, ``token``,
        ``branch``, ``commit_message``...); the model card's usage snippet names ``repo_id``.

        Returns:
            The commit URL.
        """
        card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card_kwargs, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        """Hub-mixin hook: ``model.safetensors`` (with its digest), and ``decoder.safetensors`` in phase 3."""
        if self.finetuned_decoder != (self.decoder_state is not None):
            raise CheckpointError(
                "finetuned_decoder=True needs decoder_state (the fine-tuned decoder weights) and decoder_state "
                f"needs finetuned_decoder=True; got finetuned_decoder={self.finetuned_decoder}, decoder_state "
                f"{'set' if self.decoder_state is not None else 'None'}."
            )
        write_weights(self.state_dict(), save_directory / WEIGHTS_NAME)
        if self.decoder_state is not None:
            from fdm.finetuned_decoder import save_decoder_weights

            save_decoder_weights(save_directory, self.decoder_state)

    def generate_model_card(self, *, repo_id: str | None = None) -> ModelCard:
        """The README.md model card (:func:`fdm.hub.build_model_card`): base model and fingerprint, training
        record, fine-tuned decoder, parameter count, usage and citation; ``repo_id`` names the repo in the
        usage snippet."""
        info = self._hub_mixin_info
        return build_model_card(
            self.config, num_parameters=sum(p.numel() for p in self.parameters()),
            card_data=info.model_card_data, paper_url=info.paper_url, repo_url=info.repo_url,
            docs_url=info.docs_url, repo_id=repo_id,
        )
