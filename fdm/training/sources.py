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

import itertools
import logging
import os
import re
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from glob import glob
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl

from PIL import Image

from fdm.errors import InputError, MissingExtraError, UsageError
from fdm.fingerprint import json_digest
from fdm.images import as_rgb8, decode_image, open_image

__all__ = [
    "DATA_FORMS",
    "IMAGE_EXTENSIONS",
    "MAX_MEMBER_BYTES",
    "FolderSource",
    "HFDatasetSource",
    "ImageSource",
    "TarShardSource",
    "list_images",
    "open_source",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
"""File name endings (case-insensitive) read as training images."""

MAX_MEMBER_BYTES = 256 * 2**20
"""Largest image member of a tar shard (bytes); a larger one is refused as corrupt or hostile."""

_DATA_EXTRA = 'pip install ".[data]" (from a clone of fdm-vq)'
_MAX_BRACE_EXPANSION = 100_000  # shard names one brace pattern may stand for
_HF_OPTIONS = ("split", "column", "streaming", "num_images")
DATA_FORMS = ("a folder of images (searched recursively), WebDataset .tar shards (a path, a glob or a brace "
              "pattern such as shards/train-{000000..000009}.tar) or hf:PATH for a Hugging Face dataset folder "
              "(save_to_disk or imagefolder)")
"""What :func:`open_source` accepts, in words (for error messages and command-line help)."""


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
        for index in range(*_bounds(start, stop, len(self))):
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
        _check_index(index, len(self))
        with open_image(self.files[index], "training image") as img:
            return as_rgb8(img)

    def identity(self) -> list[tuple[str, int, int]]:
        """(path relative to the root, size, modification time in ns) of every file."""
        return _file_stats(self.files, self.root)

    def names(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.files]

    def describe(self) -> str:
        return f"folder {self.root}"


class TarShardSource(ImageSource):
    """The images in WebDataset-style tar shards, in shard order, then member order, read with :mod:`tarfile`.

    A sample is the group of members sharing a key: the member name up to the first dot of its last path part
    (``000001.jpg``, ``000001.cls`` and ``000001.seg.png`` form sample ``000001``). Its image is the first
    member whose extension (what follows that dot: ``jpg``, not ``seg.png``) is an image extension; samples
    without one are skipped, and so are members that are no regular file (links, devices, folders). The shards
    are indexed (every header read once) when the source is made, so images can be read by index. Nothing is
    ever extracted: member names are only names, whatever they say (``../x``, ``/etc/...``).

    Args:
        shards: a path, a glob (``shards/*.tar``), a brace pattern (``shards/train-{000000..000009}.tar``, or
            ``{a,b}``) or a sequence of them. Shards must be uncompressed tar files.

    Raises:
        InputError: a shard is missing, is not an uncompressed tar file, is truncated, has an image member
            larger than :data:`MAX_MEMBER_BYTES`, or the shards hold no image (names the shard and member).
        UsageError: a brace pattern that does not parse or stands for more than 100,000 names.
    """

    def __init__(self, shards: str | Path | Sequence[str | Path]):
        patterns = [shards] if isinstance(shards, (str, Path)) else list(shards)
        self.shards = [shard for pattern in patterns for shard in _resolve_shards(str(pattern))]
        if not self.shards:
            raise InputError("No tar shards given.")
        self._shard_of: list[int] = []
        self._spans: list[tuple[int, int]] = []  # (offset of the data in the shard, size) per image
        self._members: list[str] = []
        skipped = sum(self._index(number, shard) for number, shard in enumerate(self.shards))
        if not self._members:
            raise InputError(f"No images in the tar shards {self._shard_list()}: expected members ending in "
                             f"{', '.join(IMAGE_EXTENSIONS)} (WebDataset naming: KEY.jpg, KEY.png...).")
        logger.info("%d images in %d tar shards (%d other members skipped)", len(self), len(self.shards), skipped)

    def __len__(self) -> int:
        return len(self._members)

    def image(self, index: int) -> Image.Image:
        _check_index(index, len(self))
        with self._open(self._shard_of[index]) as file:
            return self._decode(index, file)

    def iter_images(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Image.Image]]:
        """``(index, image)`` in order, each shard opened once."""
        indices = range(*_bounds(start, stop, len(self)))
        for shard, group in itertools.groupby(indices, key=self._shard_of.__getitem__):
            with self._open(shard) as file:
                for index in group:
                    yield index, self._decode(index, file)

    def identity(self) -> list[tuple[str, int, int]]:
        """(file name, size, modification time in ns) of every shard, in order."""
        return _file_stats(self.shards)

    def names(self) -> list[str]:
        """``shard-file-name:member-name`` of every image."""
        return [f"{self.shards[s].name}:{m}" for s, m in zip(self._shard_of, self._members)]

    def describe(self) -> str:
        return f"tar shards {self._shard_list()}"

    def _shard_list(self) -> str:
        names = [str(p) for p in self.shards]
        return ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]} ({len(names)} shards)"

    def _index(self, number: int, shard: Path) -> int:
        """Record the image members of ``shard``; returns the number of other members skipped."""
        keys, skipped, name = set(), 0, None
        try:
            with open(shard, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:
                size = os.fstat(file.fileno()).st_size
                for member in tar:
                    name = member.name
                    key, extension = _sample_key(name)
                    if not member.isfile() or member.issparse() or extension not in IMAGE_EXTENSIONS or key in keys:
                        skipped += 1
                        continue
                    if member.size > MAX_MEMBER_BYTES:
                        raise InputError(f"Tar shard {shard}, member {name!r}: {member.size} bytes, more than the "
                                         f"{MAX_MEMBER_BYTES} an image may have (corrupt or hostile shard?).")
                    if member.offset_data + member.size > size:
                        raise InputError(f"Tar shard {shard} is truncated: member {name!r} ends at byte "
                                         f"{member.offset_data + member.size}, the file has {size}.")
                    keys.add(key)
                    self._shard_of.append(number)
                    self._spans.append((member.offset_data, member.size))
                    self._members.append(name)
                file.seek(tar.offset)  # where tarfile stopped: the end-of-archive marker (zero blocks)
                problem = _archive_end_problem(file)
        except (tarfile.TarError, OSError) as err:
            where = f" after member {name!r}" if name is not None else ""
            raise InputError(f"Cannot read tar shard {shard}{where}: {err} (not an uncompressed tar file, "
                             "truncated or corrupted?)") from err
        if problem:
            where = f"after member {name!r}" if name is not None else "at its start"
            raise InputError(f"Tar shard {shard} is truncated or corrupted {where}: {problem}.")
        return skipped

    @contextmanager
    def _open(self, shard: int) -> Iterator[IO[bytes]]:
        try:
            file = open(self.shards[shard], "rb")
        except OSError as err:
            raise InputError(f"Cannot open tar shard {self.shards[shard]}: {err}") from err
        with file:
            yield file

    def _decode(self, index: int, file: IO[bytes]) -> Image.Image:
        offset, size = self._spans[index]
        what = f"image {self._members[index]!r} in tar shard {self.shards[self._shard_of[index]]}"
        file.seek(offset)
        data = file.read(size)
        if len(data) != size:
            raise InputError(f"Cannot read {what}: the shard ends after {len(data)} of its {size} bytes "
                             "(truncated since it was indexed?).")
        with decode_image(data, what) as img:
            return as_rgb8(img)


class HFDatasetSource(ImageSource):
    """The images of one column of a Hugging Face ``datasets`` dataset stored on this machine.

    ``path`` is either a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (opened with
    ``datasets.load_from_disk``) or any other folder, read as an ``imagefolder`` (``load_dataset("imagefolder",
    data_dir=path)``). No dataset script is ever executed (``trust_remote_code`` is never set) and nothing is
    downloaded. Images are decoded here from the stored bytes (or the stored file path), with the same checks as
    image files, so a dataset made of a folder's files gives that folder's pixels.

    Args:
        path: the dataset folder.
        split: split to read; a single saved ``Dataset`` (no splits) is read whatever ``split`` says.
        column: name of the image column (a ``datasets.Image`` feature).
        streaming: read the images in order only (``IterableDataset``): no random access, so only views that are
            read once in order (phase 2's feature cache) can use it.
        num_images: use the first ``num_images`` images. Required for a streaming dataset whose length is not
            recorded (a streamed imagefolder); at most the recorded length otherwise.

    Raises:
        MissingExtraError: the ``datasets`` package is not installed (names the ``data`` extra).
        InputError: the folder, split or column does not exist, the column holds no images, or the length is
            unknown (names what to pass).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        split: str = "train",
        column: str = "image",
        streaming: bool = False,
        num_images: int | None = None,
    ):
        datasets = _import_datasets()
        self.path, self.split, self.column, self.streaming = Path(path), split, column, streaming
        if not self.path.is_dir():
            raise InputError(f"Hugging Face dataset folder not found: {self.path} (expected a folder written by "
                             "save_to_disk, or a folder of images read as an imagefolder).")
        self.saved = (self.path / "state.json").is_file() or (self.path / "dataset_dict.json").is_file()
        self._arrow_files: list[dict] = []  # a saved dataset's files (set by _load)
        data, recorded = self._load(datasets)
        self._check_column(data.features, datasets.Image)
        self._length = _dataset_length(recorded, num_images, self.describe())
        self._data = data.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        if not streaming and self._length < recorded:
            self._data = self._data.select(range(self._length))

    @property
    def random_access(self) -> bool:
        return not self.streaming

    def __len__(self) -> int:
        return self._length

    def image(self, index: int) -> Image.Image:
        if self.streaming:
            return super().image(index)
        _check_index(index, len(self))
        return self._decode(index, self._data[index][self.column])

    def iter_images(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Image.Image]]:
        if not self.streaming:
            yield from super().iter_images(start, stop)
            return
        start, stop = _bounds(start, stop, len(self))
        index = start
        for row in self._data.skip(start).take(stop - start):
            yield index, self._decode(index, row[self.column])
            index += 1
        if index < stop:
            raise InputError(f"{self.describe()} ended after {index} images; {len(self)} were expected (is "
                             "num_images too large?).")

    def identity(self) -> dict:
        """The dataset's files (names, sizes, times), split, column and length."""
        if self.saved:
            files = _file_stats([Path(f["filename"]) for f in self._arrow_files])
        else:
            files = _file_stats(sorted(p for p in self.path.rglob("*") if p.is_file()), self.path)
        return {"files": files, "split": self.split, "column": self.column, "num_images": len(self)}

    def names(self) -> list[str]:
        """``split[i]`` for row ``i``."""
        return [f"{self.split}[{i}]" for i in range(len(self))]

    def describe(self) -> str:
        kind = "saved dataset" if self.saved else "imagefolder"
        streamed = ", streaming" if self.streaming else ""
        return f"Hugging Face {kind} {self.path} (split {self.split!r}, column {self.column!r}{streamed})"

    def _load(self, datasets: Any) -> tuple[Any, int | None]:
        """The split as a ``Dataset`` (or ``IterableDataset`` when streaming) and its recorded length."""
        try:
            if not self.saved:
                data = datasets.load_dataset("imagefolder", data_dir=str(self.path), split=self.split,
                                             streaming=self.streaming)
                if not self.streaming:
                    return data, len(data)
                splits = data.info.splits or {}
                return data, splits[self.split].num_examples if self.split in splits else None
            data = datasets.load_from_disk(str(self.path))
        except (OSError, ValueError) as err:  # missing or corrupt files, unknown split
            raise InputError(f"Cannot open {self.describe()}: {err}") from err
        if isinstance(data, datasets.DatasetDict):
            if self.split not in data:
                raise InputError(f"{self.describe()} has no split {self.split!r}; it has {', '.join(data)}.")
            data = data[self.split]
        self._arrow_files = data.cache_files
        return (data.to_iterable_dataset() if self.streaming else data), len(data)

    def _check_column(self, features: Any, image_feature: type) -> None:
        if features is None:  # not known before reading (some streams): checked per row while decoding
            return
        if self.column not in features:
            raise InputError(f"{self.describe()} has no column {self.column!r}; its columns: "
                             f"{', '.join(features)}.")
        if not isinstance(features[self.column], image_feature):
            raise InputError(f"Column {self.column!r} of {self.describe()} holds {features[self.column]}, not "
                             "images (a datasets.Image feature); name the image column with column=...")

    def _decode(self, index: int, value: Any) -> Image.Image:
        what = f"image {index} of {self.describe()}"
        if isinstance(value, dict) and value.get("bytes") is not None:
            reader = decode_image(value["bytes"], what)
        elif isinstance(value, dict) and value.get("path"):
            reader = open_image(value["path"], what)
        else:
            raise InputError(f"Cannot read {what}: the row holds {type(value).__name__}, not an image.")
        with reader as img:
            return as_rgb8(img)


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
        return HFDatasetSource(path, **_hf_options(text, query))
    path = Path(text)
    if path.is_dir():
        return FolderSource(path)
    if text.lower().endswith(".tar") or any(c in text for c in "*?[{"):
        return TarShardSource(text)
    if path.exists():
        raise UsageError(f"--data {text}: not a folder, a .tar shard or hf:PATH; expected {DATA_FORMS}.")
    raise InputError(f"Training data not found: {text} (expected {DATA_FORMS}).")


def _hf_options(spec: str, query: str) -> dict[str, Any]:
    """The keyword arguments of :class:`HFDatasetSource` an ``hf:PATH?...`` query string gives."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError as err:
        raise UsageError(f"--data {spec}: cannot parse the options after '?' ({err}); expected "
                         "OPTION=VALUE pairs joined by '&'.") from err
    options: dict[str, Any] = {}
    for key, value in pairs:
        if key not in _HF_OPTIONS:
            raise UsageError(f"--data {spec}: unknown option {key!r}; expected {', '.join(_HF_OPTIONS)}.")
        if key in options:
            raise UsageError(f"--data {spec}: option {key!r} given twice.")
        options[key] = value
        if key == "streaming":
            if value.lower() not in ("1", "0", "true", "false"):
                raise UsageError(f"--data {spec}: streaming must be 1 or 0 (true or false); got {value!r}.")
            options[key] = value.lower() in ("1", "true")
        elif key == "num_images":
            if not value.isdigit() or int(value) < 1:
                raise UsageError(f"--data {spec}: num_images must be a positive integer; got {value!r}.")
            options[key] = int(value)
        elif not value:
            raise UsageError(f"--data {spec}: option {key!r} needs a value.")
    return options


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise MissingExtraError(f"Hugging Face dataset sources need the datasets package: {_DATA_EXTRA} "
                                f"({err})") from err
    return datasets


def _dataset_length(recorded: int | None, num_images: int | None, what: str) -> int:
    """The number of images to use: ``num_images`` when given (at most ``recorded``), else ``recorded``."""
    if num_images is None:
        if recorded is None:
            raise InputError(f"The length of {what} is not recorded in its info; pass num_images=N "
                             "(hf:PATH?streaming=1&num_images=N).")
        return recorded
    if num_images < 1:
        raise InputError(f"num_images must be >= 1; got {num_images}.")
    if recorded is not None and num_images > recorded:
        raise InputError(f"num_images={num_images}, but {what} has only {recorded} images.")
    return num_images


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset key and lower-case extension of a member name: ``dir/000001.seg.PNG`` -> (dir/000001, .seg.png)."""
    folder, slash, base = name.rpartition("/")
    key, dot, extension = base.partition(".")
    return folder + slash + key, (dot + extension).lower()


def _archive_end_problem(file: IO[bytes]) -> str | None:
    """What is wrong with the rest of a tar file after its last header (None: only the zero blocks that end it)."""
    chunk = file.read(tarfile.RECORDSIZE)
    if not chunk:
        return "it ends without the end-of-archive marker"
    while chunk:
        if chunk.strip(b"\0"):
            return "what follows is neither a tar header nor the end-of-archive marker"
        chunk = file.read(tarfile.RECORDSIZE)
    return None


def _resolve_shards(pattern: str) -> list[Path]:
    """The files a shard path, glob or brace pattern names (glob matches sorted)."""
    shards = []
    for name in _expand_braces(pattern):
        if any(c in name for c in "*?["):
            matches = sorted(Path(p) for p in glob(name) if Path(p).is_file())
            if not matches:
                raise InputError(f"No tar shard matches {name}.")
            shards += matches
        elif Path(name).is_file():
            shards.append(Path(name))
        else:
            raise InputError(f"Tar shard not found: {name}" + (f" (from {pattern})" if name != pattern else ""))
    return shards


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def _expand_braces(pattern: str) -> list[str]:
    """Expand ``{0..9}`` ranges (zero-padded like their first bound) and ``{a,b}`` lists, left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, bounds = match.group(1), _RANGE.match(match.group(1))
    if bounds:
        first, last = (int(b) for b in bounds.groups())
        if last < first:
            raise UsageError(f"Brace range {{{body}}} in {pattern} counts down; expected {{LOW..HIGH}}.")
        count = last - first + 1
    elif "," in body:
        count = body.count(",") + 1
    else:
        raise UsageError(f"Cannot expand {{{body}}} in {pattern}: expected a range {{000000..000009}} or a "
                         "list {a,b}.")
    tail = _expand_braces(pattern[match.end():])
    if count * len(tail) > _MAX_BRACE_EXPANSION:
        raise UsageError(f"{pattern} stands for more than {_MAX_BRACE_EXPANSION} shard names.")
    if bounds:
        width = len(bounds.group(1)) if bounds.group(1).startswith("0") else 0
        items = [str(n).zfill(width) for n in range(first, last + 1)]
    else:
        items = body.split(",")
    head = pattern[:match.start()]
    return [head + item + rest for item in items for rest in tail]


def _file_stats(files: Sequence[Path], root: Path | None = None) -> list[tuple[str, int, int]]:
    """(path relative to ``root``, or file name without ``root``; size; modification time in ns) of each file."""
    stats = []
    for path in files:
        stat = path.stat()
        stats.append((str(path.relative_to(root)) if root is not None else path.name, stat.st_size,
                      stat.st_mtime_ns))
    return stats


def _bounds(start: int, stop: int | None, length: int) -> tuple[int, int]:
    """``(start, stop)`` with ``stop`` defaulting to ``length``; IndexError unless ``0 <= start <= stop <= length``."""
    stop = length if stop is None else stop
    if not 0 <= start <= stop <= length:
        raise IndexError(f"range [{start}, {stop}) is not within the {length} items")
    return start, stop


def _check_index(index: int, length: int) -> None:
    if not 0 <= index < length:
        raise IndexError(f"image index {index} out of range for {length} images")
