"""Where training images come from: one interface, :class:`ImageSource`, over a folder of image files, a Hugging
Face ``datasets`` dataset and WebDataset-style tar shards, and :func:`open_source`, which turns the ``--data``
string of ``fdm train`` / ``fdm finetune`` into one of them.

Every source is an ordered list of images with a known length. It yields them as 8-bit RGB PIL images, in
order (:meth:`ImageSource.iter_images`), and, unless it streams, by index (:meth:`ImageSource.image`). The
same images give the same pixels whatever the source holds them in, so :class:`~fdm.training.SeededViews`
makes the same training views of a folder, of a dataset saved from that folder and of tar shards of it.

``--data`` forms (see :func:`open_source`)::

    photos/train                                   a folder of images (searched recursively)
    shards/train-{000000..000009}.tar              tar shards: one path, a glob or a brace pattern
    hf:data/ffhq-saved                             a dataset written by Dataset.save_to_disk
    hf:photos/train?split=train&column=image       an imagefolder (any folder that is no saved dataset)
    hf:data/places?streaming=1&num_images=1803460  streamed: read in order only, never by index

:meth:`ImageSource.names` lists an identifier per image for the metadata of a feature cache: the path relative
to the folder, ``shard.tar:member`` for tar shards, ``split[i]`` for a dataset's rows (a row has no name of
its own; the dataset is identified by :meth:`ImageSource.fingerprint`). The list is never shortened; whoever
records it may keep a part.
"""

from __future__ import annotations

from pathlib import Path

from fdm.errors import InputError, UsageError
from fdm.training.sources.base import IMAGE_EXTENSIONS, FolderSource, ImageSource, list_images
from fdm.training.sources.hf_datasets import HFDatasetSource, hf_options
from fdm.training.sources.tar_shards import TarShardSource

__all__ = [
    "DATA_FORMS",
    "IMAGE_EXTENSIONS",
    "FolderSource",
    "HFDatasetSource",
    "ImageSource",
    "TarShardSource",
    "list_images",
    "open_source",
]

DATA_FORMS = ("a folder of images (searched recursively), WebDataset .tar shards (a path, a glob or a brace "
              "pattern such as shards/train-{000000..000009}.tar) or hf:PATH for a Hugging Face dataset folder "
              "(save_to_disk or imagefolder)")
"""What :func:`open_source` accepts, in words (for error messages and command-line help)."""


def open_source(spec: str | Path) -> ImageSource:
    """The image source a ``--data`` string names.

    Forms:
        - an existing folder: :class:`FolderSource`;
        - a path ending in ``.tar``, a glob (``*``, ``?``, ``[``) or a brace pattern (``{000000..000009}``,
          ``{a,b}``): :class:`TarShardSource`;
        - ``hf:PATH`` or ``hf:PATH?OPTION=VALUE&...``: :class:`HFDatasetSource` of the folder ``PATH``, options
          ``split`` (default ``train``), ``column`` (default ``image``), ``streaming`` (``1`` / ``0``, also
          ``true`` / ``false``) and ``num_images`` (a positive integer). E.g.
          ``hf:data/places?split=train&streaming=1&num_images=1803460``.

    Raises:
        UsageError: an ``hf:`` option that is unknown or has a bad value; an existing file that is no tar shard.
        InputError: nothing exists at the path, or the source itself cannot be opened.
        MissingExtraError: ``hf:`` without the ``datasets`` package.
    """
    text = str(spec)
    if text.startswith("hf:"):
        path, _, query = text[3:].partition("?")
        if not path:
            raise UsageError(f"--data {text}: expected hf:PATH, the folder of a Hugging Face dataset.")
        return HFDatasetSource(path, **hf_options(text, query))
    path = Path(text)
    if path.is_dir():
        return FolderSource(path)
    if text.lower().endswith(".tar") or any(c in text for c in "*?[{"):
        return TarShardSource(text)
    if path.exists():
        raise UsageError(f"--data {text}: not a folder, a .tar shard or hf:PATH; expected {DATA_FORMS}.")
    raise InputError(f"Training data not found: {text} (expected {DATA_FORMS}).")
