"""The image-source interface (:class:`ImageSource`), the folder source, subsets of a source (held-out parts,
readable images), and what every source shares."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from fdm.errors import InputError, UsageError
from fdm.images import as_rgb8, open_image
from fdm.io.fingerprint import json_digest

__all__ = ["IMAGE_EXTENSIONS", "FolderSource", "ImageSource", "ImageSubset", "bounds", "check_index", "file_stats",
           "list_images", "skip_unreadable"]

logger = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
"""File name endings (case-insensitive) read as training images."""


def list_images(root: str | Path) -> list[Path]:
    """The image files under ``root`` (recursively), sorted by relative path.

    Raises:
        InputError: ``root`` is not a folder, or holds no file ending in one of :data:`IMAGE_EXTENSIONS`.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"Training data folder not found: {root} (expected a folder of images).")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(
            f"No training images in {root}: expected files ending in {', '.join(IMAGE_EXTENSIONS)}."
        )
    return files


class ImageSource(ABC):
    """An ordered collection of images with a known length.

    Subclasses implement ``__len__``, :meth:`identity`, :meth:`names` and :meth:`describe`, and either
    :meth:`image` (random access; :meth:`iter_images` then reads by index) or :meth:`iter_images` (a stream).
    """

    #: Whether :meth:`image` works (False for streaming sources, which only :meth:`iter_images`).
    random_access: bool = True

    @abstractmethod
    def __len__(self) -> int:
        """Number of images."""

    def image(self, index: int) -> Image.Image:
        """Image ``index`` as an 8-bit RGB PIL image.

        Raises:
            UsageError: the source streams (no random access).
            IndexError: ``index`` is out of range.
            InputError: the image cannot be read or decoded (names it).
        """
        raise UsageError(f"{self.describe()} streams its images in order; random access (training views by "
                         "index) needs a non-streaming source.")

    def iter_images(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Image.Image]]:
        """``(index, image)`` for the images ``start <= index < stop`` (default: to the end), in order.

        Raises:
            IndexError: the range is not within ``[0, len(self)]``.
            InputError: an image cannot be read or decoded (names it).
        """
        for index in range(*bounds(start, stop, len(self))):
            yield index, self.image(index)

    @abstractmethod
    def identity(self) -> Any:
        """JSON-serialisable data that identifies this exact list of images (files with sizes and times...)."""

    def fingerprint(self) -> str:
        """Id of this exact list of images: :meth:`identity` hashed (16 hex digits)."""
        return json_digest(self.identity())

    @abstractmethod
    def names(self) -> list[str]:
        """An identifier per image, in order, for metadata (see the module docstring)."""

    @abstractmethod
    def describe(self) -> str:
        """What the source is, in a few words, for logs and error messages."""


class FolderSource(ImageSource):
    """The image files under ``root`` (recursively, see :data:`IMAGE_EXTENSIONS`), sorted by relative path.

    Raises:
        InputError: ``root`` is not a folder or holds no image file.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.files = list_images(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int) -> Image.Image:
        check_index(index, len(self))
        with open_image(self.files[index], "training image") as img:
            return as_rgb8(img)

    def identity(self) -> list[tuple[str, int, int]]:
        """(path relative to the root, size, modification time in ns) of every file."""
        return file_stats(self.files, self.root)

    def names(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.files]

    def describe(self) -> str:
        return f"folder {self.root}"


def file_stats(files: Sequence[Path], root: Path | None = None) -> list[tuple[str, int, int]]:
    """(path relative to ``root``, or file name without ``root``; size; modification time in ns) of each file."""
    stats = []
    for path in files:
        stat = path.stat()
        stats.append((str(path.relative_to(root)) if root is not None else path.name, stat.st_size,
                      stat.st_mtime_ns))
    return stats


def bounds(start: int, stop: int | None, length: int) -> tuple[int, int]:
    """``(start, stop)`` with ``stop`` defaulting to ``length``; IndexError unless ``0 <= start <= stop <= length``."""
    stop = length if stop is None else stop
    if not 0 <= start <= stop <= length:
        raise IndexError(f"range [{start}, {stop}) is not within the {length} items")
    return start, stop


def check_index(index: int, length: int) -> None:
    if not 0 <= index < length:
        raise IndexError(f"image index {index} out of range for {length} images")


class ImageSubset(ImageSource):
    """The images of ``source`` at ``indices`` (sorted), in order; streams when ``source`` does."""

    def __init__(self, source: ImageSource, indices: list[int], role: str):
        self.source = source
        self.indices = sorted(indices)
        self.role = role
        self.random_access = source.random_access

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, index: int) -> Image.Image:
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} {self.role} images")
        return self.source.image(self.indices[index])

    def iter_images(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Image.Image]]:
        """Runs of consecutive indices are read through the parent's :meth:`iter_images` (a tar shard is opened
        once per run, a stream is read once); images between runs are skipped by index where the source allows."""
        start, stop = bounds(start, stop, len(self))
        own = start
        while own < stop:
            end = own + 1
            while end < stop and self.indices[end] == self.indices[end - 1] + 1:
                end += 1
            first = self.indices[own]
            for parent, image in self.source.iter_images(first, self.indices[end - 1] + 1):
                yield own + parent - first, image
            own = end

    def identity(self) -> Any:
        return {"source": self.source.identity(), self.role: self.indices}

    def names(self) -> list[str]:
        names = self.source.names()
        return [names[i] for i in self.indices]

    def describe(self) -> str:
        return f"{len(self)} {self.role} image{'s' if len(self) != 1 else ''} of {self.source.describe()}"


def skip_unreadable(source: ImageSource, *, progress: bool = True) -> tuple[ImageSource, list[str]]:
    """The images of ``source`` that decode, and the names of those that do not (every image is read once).

    Raises:
        UsageError: ``source`` streams (its images cannot be skipped by index).
        InputError: no image of ``source`` decodes.
    """
    if not source.random_access:
        raise UsageError(f"skipping unreadable images reads them by index, which {source.describe()} cannot do (it "
                         "streams); drop streaming=1 or the option.")
    names, readable, unreadable = source.names(), [], []
    for index in tqdm(range(len(source)), desc="checking images", unit="image", disable=not progress):
        try:
            source.image(index)
        except InputError as err:
            logger.debug("unreadable: %s", err)
            unreadable.append(names[index])
        else:
            readable.append(index)
    if not readable:
        raise InputError(f"none of the {len(source)} images of {source.describe()} can be read.")
    return (source if not unreadable else ImageSubset(source, readable, "readable")), unreadable
