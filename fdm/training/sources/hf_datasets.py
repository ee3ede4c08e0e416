"""A Hugging Face ``datasets`` folder as an image source (:class:`HFDatasetSource`): saved with ``save_to_disk``
or read as an ``imagefolder``, by index or streamed."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from PIL import Image

from fdm.config_io import read_json
from fdm.errors import InputError, MissingExtraError, UsageError
from fdm.images import as_rgb8, decode_image, open_image
from fdm.training.sources.base import ImageSource, bounds, check_index, file_stats

__all__ = ["HFDatasetSource", "hf_options"]

logger = logging.getLogger(__name__)

_DATA_EXTRA = 'pip install ".[data]" (from a clone of fdm-vq)'


_HF_OPTIONS = ("split", "column", "streaming", "num_images")


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
            unknown (names what to pass); a saved dataset's JSON metadata (``dataset_dict.json``, ``state.json``,
            ``dataset_info.json``) does not parse or exceeds :mod:`fdm.limits`, checked before ``datasets`` reads it.
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
        check_index(index, len(self))
        return self._decode(index, self._data[index][self.column])

    def iter_images(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Image.Image]]:
        if not self.streaming:
            yield from super().iter_images(start, stop)
            return
        start, stop = bounds(start, stop, len(self))
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
            files = file_stats([Path(f["filename"]) for f in self._arrow_files])
        else:
            files = file_stats(sorted(p for p in self.path.rglob("*") if p.is_file()), self.path)
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
            for meta in sorted([*self.path.glob("*.json"), *self.path.glob("*/*.json")]):
                read_json(meta, "Hugging Face dataset metadata")  # bounded first: datasets' json.load is not
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


def hf_options(spec: str, query: str) -> dict[str, Any]:
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
