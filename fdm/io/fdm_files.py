"""The files of an :class:`fdm.FDM`: ``save_pretrained`` / ``from_pretrained`` (``model.safetensors`` with its
digest, ``config.json``, a model card, and ``decoder.safetensors`` for a phase-3 FDM), the Hub through
``huggingface_hub``'s :class:`~huggingface_hub.PyTorchModelHubMixin`, and the weights released with the paper.

:class:`FDMFiles` is mixed into :class:`fdm.FDM` (``fdm/module.py`` holds the network): its methods use the FDM's
``config``, ``finetuned_decoder`` and ``decoder_state``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin

from fdm.config_io import read_json
from fdm.errors import CheckpointError, HubError
from fdm.io.decoder_weights import read_decoder_weights, save_decoder_weights
from fdm.io.hub import (
    WEIGHTS_NAME,
    _is_generated_model_card,
    build_model_card,
    file_in_folder,
    locate,
    resolve_file,
)
from fdm.io.official import load_official_fdm
from fdm.io.weights import load_state_dict_strict, read_safetensors, write_weights
from fdm.limits import current as current_limits

__all__ = ["FDMFiles"]

logger = logging.getLogger(__name__)


def _check_size(config: dict[str, Any], source: str) -> None:
    """Refuse sizes that are not integers, or an FDM larger than ``fdm.limits`` ``max_fdm_parameters``, before
    building it."""
    sizes = {k: config.get(k, default) for k, default in
             (("channels", 256), ("mask_channels", 1), ("hidden_channels", None), ("num_blocks", 8))}
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"{source}: {name} must be an integer; got {value!r}.")
    c, m, blocks = sizes["channels"], sizes["mask_channels"], sizes["num_blocks"]
    h = c if sizes["hidden_channels"] is None else sizes["hidden_channels"]
    count = 9 * (c + m) * h + blocks * (9 * h * (h // 2) + (h // 2) * h) + 9 * h * c  # convolution weights
    most = current_limits().max_fdm_parameters
    if count > most:
        raise CheckpointError(f"{source} describes an FDM of about {count:,} parameters (channels {c}, hidden "
                              f"{h}, {blocks} blocks); more than {most:,} is refused (fdm.limits).")


class FDMFiles(PyTorchModelHubMixin):
    """Saving, loading and pushing an :class:`fdm.FDM` (mixed into it; see the module docstring)."""

    @classmethod
    def from_official_checkpoint(
        cls, path_or_state_dict: str | Path | dict[str, torch.Tensor], **config: Any
    ) -> FDMFiles:
        """Load the weights released with the paper (hyudsl/FDM).

        Accepts a ``{'model': state_dict}`` file (``.pth``, read by :func:`fdm.io.torch_files.read_checkpoint`, which runs no pickled code) or a state
        dict; FDM keys are ``fdm.mix.*`` (older releases: ``lip.mix.*``); other keys (codec, sampler,
        ``loss.*``) are ignored. Every FDM key and shape is checked.

        Args:
            path_or_state_dict: checkpoint path or an already loaded state dict.
            **config: extra constructor arguments (``base_model``, ``base_model_fingerprint``...).

        Returns:
            An :class:`FDM` in eval mode whose outputs equal the official module's.
        """
        return load_official_fdm(cls, path_or_state_dict, **config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> FDMFiles:
        """Load an FDM from a folder written by :meth:`save_pretrained` or from a Hub repo.

        Args:
            pretrained_model_name_or_path: a folder, or a Hub repo id ``owner/name`` or ``hf://owner/name``
                (downloaded through the huggingface_hub cache; ``HF_HUB_OFFLINE=1`` loads a cached copy without
                network). :func:`fdm.io.hub.locate` decides which: a missing local path (``./fdm``, ``runs/a/fdm``,
                ``a/b`` while a folder ``./a`` exists) fails at once, without trying the Hub.
            **kwargs: ``revision``, ``cache_dir``, ``force_download``, ``local_files_only``, ``token`` (Hub
                options); ``map_location`` (device of the loaded module, default ``"cpu"``); any other keyword
                overrides the config.json entry of that name.

        Returns:
            The FDM in eval mode; every weight key and shape was checked against config.json.

        Raises:
            CheckpointError: config.json or model.safetensors is missing, unreadable, truncated or corrupted,
                model.safetensors lacks the digest :meth:`save_pretrained` records, a file of the folder is a link
                leading out of it, or config.json does not describe the weights (names the missing / unexpected /
                mis-shaped keys); a file given where a folder was expected.
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
            config_file = file_in_folder(source, "config.json")
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
    ) -> FDMFiles:
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
            load_state_dict_strict(module, read_safetensors(weights_path, require_digest=True, require_finite=True),
                                   source=f"weight file {weights_path}")
        except CheckpointError as err:
            arch = {k: module.config[k] for k in ("channels", "mask_channels", "hidden_channels", "num_blocks")}
            message = f"config.json of {model_id} ({arch}) does not match its weights. {err}"
            raise CheckpointError(message) from err
        if module.finetuned_decoder:
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
        generated is regenerated; a hand-written one (without :data:`fdm.io.hub.MODEL_CARD_MARKER`) is kept.

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
            save_decoder_weights(save_directory, self.decoder_state)

    def generate_model_card(self, *, repo_id: str | None = None) -> ModelCard:
        """The README.md model card (:func:`fdm.io.hub.build_model_card`): base model and fingerprint, training
        record, fine-tuned decoder, parameter count, usage and citation; ``repo_id`` names the repo in the
        usage snippet."""
        info = self._hub_mixin_info
        return build_model_card(
            self.config, num_parameters=sum(p.numel() for p in self.parameters()),
            card_data=info.model_card_data, paper_url=info.paper_url, repo_url=info.repo_url,
            docs_url=info.docs_url, repo_id=repo_id,
        )
