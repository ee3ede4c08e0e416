"""Hugging Face Hub layout of an FDM (Park & Jung, WACV 2025): ``model.safetensors`` with an integrity digest,
``config.json``, and a ``README.md`` model card built from a template and the FDM's config.

:class:`fdm.FDM` uses these through ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``
(huggingface_hub's ``PyTorchModelHubMixin``); see ``docs/hub.md``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import validate_repo_id

from fdm.errors import CheckpointError, FdmError, HubEntryNotFoundError, HubError, InputError

__all__ = [
    "MODEL_CARD_MARKER",
    "WEIGHTS_NAME",
    "FILE_SUFFIXES",
    "HUB_PREFIX",
    "build_model_card",
    "convert_hub_error",
    "locate",
    "repo_with_subfolder",
    "resolve_file",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
#: First line of the body of every card fdm-vq writes; ``save_pretrained`` regenerates a README.md carrying it
#: and keeps any other README.md.
MODEL_CARD_MARKER = "<!-- fdm-vq model card: save_pretrained regenerates it; delete this line to keep edits -->"

_CITATION = """@inproceedings{park2025fdm,
  title         = {Improving Detail in Pluralistic Image Inpainting with Feature Dequantization},
  author        = {Park, Kyungri and Jung, Woohwan},
  booktitle     = {IEEE/CVF Winter Conference on Applications of Computer Vision (WACV)},
  year          = {2025},
  eprint        = {2412.01046},
  archivePrefix = {arXiv},
}"""

_MODEL_CARD_TEMPLATE = """---
{card_data}
---

{marker}

# FDM for {base_model_name}

A Feature Dequantization Module ([FDM]({paper_url}); Park & Jung, WACV 2025) for **{base_model_name}**,
made with [fdm-vq]({repo_url}). It predicts the quantization residual `z - z_q` of the base model from its
quantized feature map and adds it back before decoding, `z_dq = z_q + F([z_q, m]) * m`, restoring detail and
colour fidelity that the codebook throws away.

## Base model

| | |
|---|---|
| Base model | {base_model_cell} |
| Codebook fingerprint | {fingerprint_cell} |
| Feature channels | {channels} |
| Decoder | {decoder_cell} |

`fdm.Dequantizer` compares the fingerprint with the codebook of the model it is given and refuses another
model (`FingerprintMismatchError`) unless `check_fingerprint=False` is passed; a model whose quantized map has
a different channel count is always refused.
{decoder_section}
## Architecture

| channels | mask channels | hidden channels | residual blocks | parameters |
|---|---|---|---|---|
| {channels} | {mask_channels} | {hidden_channels} | {num_blocks} | {num_parameters} |

{mask_sentence}

## Training

{training_section}

## Usage

```python
import fdm

model = ...  # the base model named above, e.g. fdm.adapters.taming.load_model(config, checkpoint)
dequantizer = fdm.Dequantizer(model, fdm.FDM.from_pretrained("{repo_id}"))
{usage_call}
```

Inside a model's own sampling code, `with dequantizer.attached({attach_args}): ...` applies the FDM to every
decode of the model. Details: {docs_url}.

## Citation

```bibtex
{citation}
```
"""

_DECODER_SECTION = """
## Fine-tuned decoder

This FDM was trained jointly with the base model's decoder (phase 3 of the paper). `decoder.safetensors` in
this repository holds that decoder; `fdm.Dequantizer` loads it into the base model and refuses to run this FDM
without it.
"""

_TRAINING_LABELS = {
    "phase": "Phase",
    "steps": "Optimizer steps",
    "data": "Training data",
    "views": "Training views",
    "crop_size": "Crop size",
    "hole_ratio": "Hole ratio of the random masks",
    "batch_size": "Batch size (per process)",
    "world_size": "Processes",
    "lr": "Peak learning rate",
    "warmup_steps": "Warm-up steps",
    "seed": "Seed",
    "final_loss": "Final qe loss",
    "seconds": "Training wall time (s)",
    "minutes": "Time budget (minutes)",
    "heldout.images": "Held-out images (not trained on)",
    "heldout.views": "Held-out views measured",
    "heldout.setting": "Held-out setting",
    "heldout.step": "Weights saved from step (best held-out check)",
    "heldout.feature_ratio": "Held-out feature error ratio",
    "heldout.psnr_vq": "Held-out PSNR, plain VQ (dB)",
    "heldout.psnr_fdm": "Held-out PSNR with FDM (dB)",
    "heldout.psnr_gain": "Held-out PSNR gain (dB)",
}

#: Prefix of an explicit Hugging Face Hub reference: ``hf://owner/name`` or ``hf://owner/name/path/in/repo``.
HUB_PREFIX = "hf://"
#: File suffixes that make a string a local path (compared lower-case): a Hub repo id does not end in one.
FILE_SUFFIXES = frozenset({
    ".yaml", ".yml", ".json", ".ckpt", ".safetensors", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".npz", ".npy",
    ".h5", ".onnx", ".tar", ".zip", ".gz", ".txt", ".png", ".jpg", ".jpeg",
})


def _looks_like_path(text: str) -> bool:
    """True for a string only a local path can be (see :func:`locate` for the rule)."""
    path = Path(os.path.expanduser(text))
    return (Path(text).suffix.lower() in FILE_SUFFIXES or text.count("/") > 1 or text.startswith((".", "/", "~"))
            or "\\" in text or path.is_absolute() or ("/" in text and path.parent.is_dir()))


def _is_repo_id(text: str) -> bool:
    """True for ``owner/name`` that :func:`huggingface_hub.utils.validate_repo_id` accepts."""
    try:
        validate_repo_id(text)
    except hf_errors.HFValidationError:
        return False
    return text.count("/") == 1


def repo_with_subfolder(reference: str, kwargs: dict[str, Any], *, given_as: str) -> str:
    """The repo id of a Hub ``reference`` that :func:`locate` returned (``owner/name``, or ``owner/name/subfolder``
    for ``hf://owner/name/subfolder``); a subfolder it names goes into ``kwargs["subfolder"]`` (a library's
    ``from_pretrained`` keyword).

    Raises:
        InputError: ``kwargs`` names another subfolder (``given_as``: the reference as the user wrote it).
    """
    parts = reference.split("/", 2)
    if len(parts) == 3 and kwargs.setdefault("subfolder", parts[2]) != parts[2]:
        raise InputError(f"{given_as} names the subfolder {parts[2]!r} and subfolder={kwargs['subfolder']!r} was "
                         "given too; give it once.")
    return "/".join(parts[:2])


def locate(source: str | Path) -> Path | str:
    """Decide, without any network access, whether ``source`` is a local file or folder or a Hugging Face Hub
    reference: the one rule of every loader of fdm-vq (and of every ``--config`` / ``--checkpoint`` / ``--fdm`` /
    ``--transformer`` option).

    1. An existing file or folder (``~`` expanded) is local: its :class:`~pathlib.Path` is returned.
    2. ``hf://owner/name`` or ``hf://owner/name/path/in/repo`` is on the Hub: returned without the prefix.
    3. A :class:`~pathlib.Path`, or a string that looks like a path, is local, and missing: it has a file suffix
       (:data:`FILE_SUFFIXES`: ``.yaml``, ``.ckpt``, ``.safetensors``, ``.pt``, ``.pth``, ``.bin``, ``.json`` ...),
       more than one ``/``, starts with ``.``, ``/`` or ``~`` (or is absolute, or holds a ``\\``), or names a
       parent folder that exists (``a/b`` while a folder ``./a`` exists).
    4. ``owner/name`` that :func:`huggingface_hub.utils.validate_repo_id` accepts is a Hub repo id: returned as is.
    5. Anything else (``name`` without an owner, characters a repo id cannot hold) is a missing local path.

    Raises:
        FileNotFoundError: ``file not found: SOURCE`` (cases 3 and 5), at once.
        HubError: an ``hf://`` reference without a valid ``owner/name``.
    """
    text = str(source)
    path = Path(os.path.expanduser(text))
    if path.exists():
        return path
    if isinstance(source, str) and text.startswith(HUB_PREFIX):
        reference = text[len(HUB_PREFIX):]
        if not _is_repo_id("/".join(reference.split("/")[:2])):
            raise HubError(f"{text} is not a Hugging Face Hub reference: expected {HUB_PREFIX}owner/name or "
                           f"{HUB_PREFIX}owner/name/path/in/repo.")
        return reference
    if isinstance(source, Path) or _looks_like_path(text) or not _is_repo_id(text):
        raise FileNotFoundError(f"file not found: {text}")
    return text


def file_in_folder(folder: Path, filename: str) -> Path:
    """``folder / filename``, refused when it is a symbolic link leading out of ``folder`` (a model folder's weights
    linked to another model's would load that model, and be uploaded as this one). A snapshot folder of the
    huggingface_hub cache (``.../snapshots/<revision>/``) links to its own repo's ``blobs/``, which is allowed.

    Raises:
        CheckpointError: naming the file and where it leads.
    """
    path = folder / filename
    target, home = path.resolve(), folder.resolve()
    blobs = home.parent.parent / "blobs" if home.parent.name == "snapshots" else home
    if not (target.is_relative_to(home) or target.parent == blobs):
        raise CheckpointError(f"{path} is a symbolic link to {target}, outside {folder}; a model folder holds its own "
                              "files (copy the file in instead of linking it).")
    return path


def resolve_file(
    source: str | Path,
    filename: str | None = None,
    *,
    layout: str | None = "FDM.save_pretrained / push_to_hub",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local path of a file from a local folder, a local path or a Hugging Face Hub repo: the one resolver of
    fdm-vq (FDMs, their fine-tuned decoders, and the taming, PUT and diffusers loaders). What is local and what is
    on the Hub is decided by :func:`locate`, before any network access.

    Two forms:

    - ``resolve_file(folder_or_repo_id, filename)``: ``filename`` inside a local folder, or inside the Hub repo
      ``owner/name`` (or ``hf://owner/name``);
    - ``resolve_file(reference)``: an existing local file, or ``"hf://owner/name/path/in/repo"`` naming a file of
      a Hub repo.

    Hub files go through :func:`huggingface_hub.hf_hub_download` (cache, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``).

    Args:
        source: folder, Hub repo id, local file or Hub file reference (see above).
        filename: the file inside ``source``; None for the second form.
        layout: what writes the folder / repo layout of the first form, named when ``filename`` is missing;
            None names nothing.
        revision, cache_dir, force_download, local_files_only, token: passed to ``hf_hub_download``.

    Raises:
        FileNotFoundError: ``file not found: SOURCE`` for a missing local path (see :func:`locate`), at once; a
            Hub repo id without a file in the second form.
        CheckpointError: the folder has no ``filename``, or it is a link leading out of the folder
            (:func:`file_in_folder`); ``source`` is a file where a folder was expected.
        IsADirectoryError: a folder where a file was expected (second form).
        HubEntryNotFoundError: the Hub repo has no such file (a :class:`CheckpointError` and a
            ``FileNotFoundError`` too).
        HubError: the repo or revision does not exist or is gated, or offline mode is on without a cached copy
            (see :func:`convert_hub_error`).
    """
    where = locate(source)
    hint = f"expected the layout {layout} writes" if layout else None
    if isinstance(where, Path):
        if filename is None:
            if where.is_dir():
                raise IsADirectoryError(f"{source} is a folder; expected a file.")
            return where
        if not where.is_dir():
            raise CheckpointError(f"{source} is a file; expected a folder holding {filename}"
                                  + (f" ({hint})." if hint else "."))
        if not (where / filename).is_file():
            raise CheckpointError(f"{where} holds no {filename}" + (f"; {hint}." if hint else "."))
        return file_in_folder(where, filename)
    parts = where.split("/", 2)  # owner, name[, path in repo]
    repo_id, inner = "/".join(parts[:2]), "/".join(parts[2:])
    if filename is None:
        if not inner:
            raise FileNotFoundError(f"{source} is a Hub repo id, not a file: name a file of it as "
                                    f"{HUB_PREFIX}{repo_id}/path/in/repo.")
        filename, hint = inner, None
    elif inner:
        filename = f"{inner}/{filename}"
    logger.debug("fetching %s from Hub repo %s", filename, repo_id)
    with _hub_errors(repo_id, filename, revision=revision, hint=hint):
        return Path(hf_hub_download(
            repo_id=repo_id, filename=filename, revision=revision, cache_dir=cache_dir,
            force_download=force_download, local_files_only=local_files_only, token=token,
        ))


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def convert_hub_error(
    err: BaseException,
    repo_id: str,
    filename: str | None = None,
    *,
    revision: str | None = None,
    hint: str | None = None,
) -> FdmError | None:
    """The fdm-vq error for a ``huggingface_hub`` error met while getting ``filename`` from ``repo_id``.

    The one place where Hub errors become fdm-vq errors (:func:`resolve_file`, the taming, PUT and diffusers
    loaders and ``fdm push`` all use it). Returns None for anything that is not a Hub error (re-raise it).

    - repo not found (or private without a token), gated, disabled; revision not found; an invalid repo id;
      another HTTP error of the Hub -> :class:`~fdm.errors.HubError`
    - the repo has no such file -> :class:`~fdm.errors.HubEntryNotFoundError` (also a ``CheckpointError``);
      ``hint`` is appended to its message
    - no cached copy while offline mode is on (``HF_HUB_OFFLINE=1``), with ``local_files_only``, or when the Hub
      cannot be reached -> :class:`~fdm.errors.HubError` saying which
    """
    what = f"{filename} of Hub repo {repo_id}" if filename else f"Hub repo {repo_id}"
    at = f" (revision {revision})" if revision else ""
    endpoint = hf_constants.ENDPOINT.rstrip("/")
    where = "" if endpoint == "https://huggingface.co" else f" on {endpoint}"
    if isinstance(err, hf_errors.OfflineModeIsEnabled):
        return HubError(f"Offline mode is on (HF_HUB_OFFLINE=1): cannot reach {what}{at}.")
    if isinstance(err, hf_errors.LocalEntryNotFoundError):
        if hf_constants.HF_HUB_OFFLINE:
            return HubError(f"{what}{at} is not in the local Hugging Face cache and offline mode is on "
                            "(HF_HUB_OFFLINE=1): download it once with offline mode off, or give a local path.")
        return HubError(f"{what}{at} is not in the local Hugging Face cache and could not be downloaded "
                        f"from {endpoint} (no connection, or local_files_only=True): {_first_line(err)}")
    if isinstance(err, hf_errors.GatedRepoError):
        return HubError(f"Hub repo {repo_id}{where} is gated: accept its conditions on its Hub page and log in "
                        "(hf auth login, or HF_TOKEN).")
    if isinstance(err, hf_errors.RepositoryNotFoundError):
        return HubError(f"Hub repo {repo_id} not found{where} (check the id; a private repo needs a token: "
                        "hf auth login, or HF_TOKEN).")
    if isinstance(err, hf_errors.RevisionNotFoundError):
        return HubError(f"Hub repo {repo_id}{where} has no revision {revision or 'main'} (branch, tag or commit).")
    if isinstance(err, hf_errors.EntryNotFoundError):  # RemoteEntryNotFoundError (local ones are handled above)
        message = f"Hub repo {repo_id}{where} (revision {revision or 'main'}) has no file {filename}"
        return HubEntryNotFoundError(f"{message}; {hint}." if hint else f"{message}.")
    if isinstance(err, hf_errors.DisabledRepoError):
        return HubError(f"Hub repo {repo_id}{where} has been disabled by its owner or the Hub.")
    if isinstance(err, hf_errors.HFValidationError):
        return HubError(f"{repo_id!r} is not a valid Hub repo id (expected 'namespace/name'): {_first_line(err)}")
    if isinstance(err, (hf_errors.HfHubHTTPError, hf_errors.LocalTokenNotFoundError)):
        return HubError(f"Hub request for {what}{at} failed: {_first_line(err)}")
    return None


@contextlib.contextmanager
def _hub_errors(
    repo_id: str, filename: str | None = None, *, revision: str | None = None, hint: str | None = None
) -> Iterator[None]:
    """Run a ``huggingface_hub`` call with its errors converted by :func:`convert_hub_error`."""
    try:
        yield
    except Exception as err:
        converted = convert_hub_error(err, repo_id, filename, revision=revision, hint=hint)
        if converted is None:
            raise
        raise converted from err


def _is_generated_model_card(path: str | Path) -> bool:
    """True if ``path`` is a README.md that fdm-vq wrote (it carries :data:`MODEL_CARD_MARKER`)."""
    path = Path(path)
    return path.is_file() and MODEL_CARD_MARKER in path.read_text(encoding="utf-8", errors="replace")


def build_model_card(
    config: dict[str, Any],
    *,
    num_parameters: int,
    card_data: ModelCardData,
    paper_url: str,
    repo_url: str,
    docs_url: str,
    repo_id: str | None = None,
) -> ModelCard:
    """The model card of an FDM: the library's card template filled from its config.

    Args:
        config: :attr:`fdm.FDM.config` (``base_model``, ``base_model_fingerprint``, ``training``,
            ``finetuned_decoder`` and the architecture).
        num_parameters: parameter count of the FDM.
        card_data: the library's card metadata (``library_name``, ``license``, ``tags``); copied, and
            ``base_model`` is added when it is a Hub repo id (the Hub only accepts repo ids there).
        paper_url, repo_url, docs_url: links written into the card.
        repo_id: where the FDM is published, for the usage snippet (a placeholder when None).
    """
    data = ModelCardData(**card_data.to_dict())
    base_model = config.get("base_model")
    if base_model and _is_repo_id(base_model):
        data.base_model = base_model
    fingerprint = config.get("base_model_fingerprint")
    finetuned = bool(config.get("finetuned_decoder"))
    masked = bool(config["mask_channels"])
    fields = {
        "card_data": data.to_yaml(),
        "marker": MODEL_CARD_MARKER,
        "base_model_name": f"`{base_model}`" if base_model else "an unnamed VQ model",
        "base_model_cell": f"`{base_model}`" if base_model else "not recorded",
        "fingerprint_cell": f"`{fingerprint}`" if fingerprint else "not recorded (nothing to check)",
        "decoder_cell": "fine-tuned with this FDM (decoder.safetensors)" if finetuned else "the model's own",
        "decoder_section": _DECODER_SECTION if finetuned else "",
        "channels": config["channels"],
        "mask_channels": config["mask_channels"],
        "hidden_channels": config["hidden_channels"],
        "num_blocks": config["num_blocks"],
        "num_parameters": f"{num_parameters:,}",
        "mask_sentence": (
            "Mask-conditioned (inpainting): the FDM gets a latent-cell mask, 1 where the cell was generated, "
            "and corrects only those cells." if masked else
            "Mask-free (unconditional / class-conditional generation): every latent cell is corrected."
        ),
        "training_section": _training_section(config.get("training")),
        "repo_id": repo_id or "<namespace>/<this-repo>",
        "usage_call": (
            "image = dequantizer.reconstruct(x, mask)  # x: (B, 3, H, W) in [-1, 1]; mask: (B, 1, H, W) holes"
            if masked else "image = dequantizer.decode_indices(indices)  # indices: (B, h, w) sampled codes"
        ),
        "attach_args": "mask" if masked else "",
        "paper_url": paper_url,
        "repo_url": repo_url,
        "docs_url": docs_url,
        "citation": _CITATION,
    }
    return ModelCard(_MODEL_CARD_TEMPLATE.format(**fields))


def _training_section(training: dict[str, Any] | None) -> str:
    if not training:
        return "No training record: an untrained FDM (an exact identity) or weights imported from elsewhere."
    rows = [f"| {_TRAINING_LABELS.get(key, key)} | {_cell(value)} |" for key, value in _flatten(training)]
    table = "| | |\n|---|---|\n" + "\n".join(rows)
    held = training.get("heldout")
    if not _is_heldout_record(held):
        return table
    verdict = "beats" if held["feature_ratio"] < 1 and held["psnr_gain"] > 0 else "does not beat"
    return (f"On {held['images']} images held out of its training data ({held['setting']}), this FDM {verdict} "
            f"plain VQ: feature error ratio ||z - z_dq|| / ||z - z_q|| {_cell(held['feature_ratio'])}, PSNR gain "
            f"{_cell(held['psnr_gain'])} dB.\n\n{table}")


def _is_heldout_record(held: Any) -> bool:
    """Whether ``held`` is a well-formed held-out record (a crafted config.json gets only the plain table)."""
    return (isinstance(held, dict) and type(held.get("images")) is int
            and held.get("setting") in ("reconstruction", "oracle inpainting")
            and all(type(held.get(k)) is float and math.isfinite(held[k]) for k in ("feature_ratio", "psnr_gain")))


def _flatten(record: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in record.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _cell(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " - ".join(_cell(v) for v in value)
    text = " ".join(str(value).split())  # one line: no Markdown structure from a crafted value
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("`", "\\`")
