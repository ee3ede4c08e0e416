"""Training views for FDM phase 2: a fixed, seeded set of random crops per image, so that the frozen model's
features of every view can be computed once and cached (FDM, WACV 2025, sec. 3.3; crops as in the official
hyudsl/FDM data pipeline: resize the shorter side, random crop, horizontal flip).

The images come from any :class:`~fdm.training.sources.ImageSource` (a folder, a Hugging Face dataset, tar
shards); the same images and seed give the same views whatever the source.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from fdm.errors import FdmError, InputError
from fdm.io.fingerprint import json_digest
from fdm.training.sources.base import IMAGE_EXTENSIONS, FolderSource, ImageSource, bounds, list_images
from fdm.validation import check_finite, check_image

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderViews", "SeededViews", "TensorViews", "list_images", "load_batches"]

logger = logging.getLogger(__name__)


class SeededViews(Dataset):
    """``views_per_image`` fixed random crops of every image of ``source``, as (3, S, S) tensors in [-1, 1].

    View ``i`` shows image ``i // views_per_image``. Its parameters are drawn once from ``seed``: the shorter
    image side is resized to ``crop_size * s`` with ``s`` uniform in ``scale_range`` (a down-scale for large
    photos; images smaller than the crop are up-scaled), a ``crop_size`` square is cropped at a random
    position, and it is flipped horizontally with probability 1/2 when ``flip`` is set. The same seed gives
    the same views in every run and from every source holding the same images (a folder, a dataset saved from
    it, tar shards of it), which is what lets :class:`~fdm.training.FeatureCache` cache their features.

    Views are read by index (``views[i]``, a torch ``Dataset``) when the source has random access, and in
    order with :meth:`iter_views` from any source, streaming ones included.

    Args:
        source: the images (see :func:`~fdm.training.sources.open_source`).
        crop_size: side ``S`` of the square views; a multiple of the model's downsampling factor.
        views_per_image: number of different views of each image.
        seed: seed of the view parameters.
        scale_range: range of the shorter side after resizing, in units of ``crop_size`` (>= 1).
        flip: allow horizontal flips.

    Raises:
        InputError: ``crop_size`` or ``views_per_image`` below 1, or a ``scale_range`` not within ``1 <= low <= high``.

    Example:
        >>> views = SeededViews(open_source("shards/train-{000000..000009}.tar"), crop_size=256)  # doctest: +SKIP
        >>> index, view = next(views.iter_views(0, 1))                                              # doctest: +SKIP
        >>> view.shape                                                                              # doctest: +SKIP
        torch.Size([3, 256, 256])
    """

    def __init__(
        self,
        source: ImageSource,
        crop_size: int = 256,
        views_per_image: int = 1,
        *,
        seed: int = 0,
        scale_range: tuple[float, float] = (1.0, 1.125),
        flip: bool = True,
    ):
        if crop_size < 1 or views_per_image < 1:
            raise InputError(f"crop_size and views_per_image must be >= 1; got {crop_size} and {views_per_image}.")
        lo, hi = scale_range
        if not 1.0 <= lo <= hi:
            raise InputError(f"scale_range must satisfy 1 <= low <= high; got {scale_range}.")
        self.source = source
        self.crop_size = crop_size
        self.views_per_image = views_per_image
        self.seed = seed
        self.scale_range = (float(lo), float(hi))
        self.flip = flip
        generator = torch.Generator().manual_seed(seed)
        # one row per view: (scale, top, left, flip), each uniform in [0, 1)
        self._params = torch.rand(len(self), 4, generator=generator, dtype=torch.float64).numpy()
        logger.info("%d views (crop %d) of %s", len(self), crop_size, source.describe())

    @property
    def random_access(self) -> bool:
        """Whether views can be read by index (False for a streaming source: use :meth:`iter_views`)."""
        return self.source.random_access

    def __len__(self) -> int:
        return len(self.source) * self.views_per_image

    def __getitem__(self, index: int) -> torch.Tensor:
        """View ``index`` as a (3, crop_size, crop_size) float tensor in [-1, 1].

        Raises:
            UsageError: the source streams (see :meth:`iter_views`).
            InputError: the image cannot be read or decoded (names it).
        """
        if not 0 <= index < len(self):
            raise IndexError(f"view index {index} out of range for {len(self)} views")
        return self._view(self.source.image(index // self.views_per_image), index)

    def iter_views(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(index, view)`` for the views ``start <= index < stop`` (default: to the end), in order, each
        image read once; works for every source, streaming ones included.

        Raises:
            IndexError: the range is not within ``[0, len(self)]``.
            InputError: an image cannot be read or decoded (names it).
        """
        start, stop = bounds(start, stop, len(self))
        if start == stop:
            return
        per_image = self.views_per_image
        for image_index, image in self.source.iter_images(start // per_image, (stop - 1) // per_image + 1):
            first = max(start, image_index * per_image)
            for index in range(first, min(stop, (image_index + 1) * per_image)):
                yield index, self._view(image, index)

    def _view(self, img: Image.Image, index: int) -> torch.Tensor:
        """View ``index`` cut from its image (8-bit RGB)."""
        u_scale, u_top, u_left, u_flip = self._params[index]
        lo, hi = self.scale_range
        short = max(self.crop_size, round(self.crop_size * (lo + (hi - lo) * u_scale)))
        w, h = img.size
        new_w, new_h = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top = int(u_top * (new_h - self.crop_size + 1))
        left = int(u_left * (new_w - self.crop_size + 1))
        img = img.crop((left, top, left + self.crop_size, top + self.crop_size))
        if self.flip and u_flip < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(img, dtype=np.float32)  # (S, S, 3) in 0..255
        return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)  # (3, S, S) in [-1, 1]

    def settings(self) -> dict[str, Any]:
        """What makes this set of views, field by field: the source's images (:meth:`ImageSource.fingerprint`), the
        crop parameters and the seed (JSON values)."""
        return {"images": self.source.fingerprint(), "crop_size": self.crop_size,
                "views_per_image": self.views_per_image, "seed": self.seed, "scale_range": list(self.scale_range),
                "flip": self.flip}

    def fingerprint(self) -> str:
        """Id of this exact set of views (the source's images, crop parameters, seed)."""
        spec = {
            "files": self.source.identity(),  # key named before sources existed: folder fingerprints unchanged
            "crop_size": self.crop_size,
            "views_per_image": self.views_per_image,
            "seed": self.seed,
            "scale_range": self.scale_range,
            "flip": self.flip,
        }
        return json_digest(spec)

    def names(self) -> list[str]:
        """An identifier per image (not per view), in order: see :meth:`ImageSource.names`."""
        return self.source.names()


class ImageFolderViews(SeededViews):
    """:class:`SeededViews` of the images in a folder (searched recursively; see :data:`IMAGE_EXTENSIONS`).

    ``root`` and ``files`` (the image paths, sorted by relative path) are kept as attributes; the other
    arguments are those of :class:`SeededViews`.

    Raises:
        InputError: ``root`` is not a folder or holds no image file; bad crop parameters.

    Example:
        >>> views = ImageFolderViews("photos/train", crop_size=256, views_per_image=4)  # doctest: +SKIP
        >>> views[0].shape                                                                # doctest: +SKIP
        torch.Size([3, 256, 256])
    """

    def __init__(
        self,
        root: str | Path,
        crop_size: int = 256,
        views_per_image: int = 1,
        *,
        seed: int = 0,
        scale_range: tuple[float, float] = (1.0, 1.125),
        flip: bool = True,
    ):
        super().__init__(FolderSource(root), crop_size, views_per_image, seed=seed, scale_range=scale_range, flip=flip)

    @property
    def root(self) -> Path:
        """The image folder."""
        return self.source.root

    @property
    def files(self) -> list[Path]:
        """Its image files, sorted by relative path."""
        return self.source.files


class TensorViews(Dataset):
    """Training views given as a tensor: ``images`` (N, 3, S, S) in [-1, 1], one view per image.

    Raises:
        InputError: ``images`` has the wrong shape or dtype, or holds NaN / Inf.
    """

    def __init__(self, images: torch.Tensor):
        check_image(images, name="training images")
        check_finite(images, name="training images")
        self.images = images.detach().cpu()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def iter_views(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(index, view)`` for the views ``start <= index < stop`` (default: to the end), in order."""
        for index in range(*bounds(start, stop, len(self))):
            yield index, self.images[index]

    def fingerprint(self) -> str:
        """Id of the tensor's values and shape."""
        data = self.images.to(torch.float32).contiguous().numpy().tobytes()
        digest = hashlib.sha256(data + str(tuple(self.images.shape)).encode()).hexdigest()
        return digest[:16]


class _ErrorsAsValues(Dataset):
    """``views`` whose library errors are returned instead of raised, so that a worker process hands over the error
    itself (DataLoader would raise a new one whose message is the worker's whole traceback)."""

    def __init__(self, views: Dataset):
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.views[index]
        except FdmError as err:
            return err


def _collate_or_error(items: list[Any]) -> Any:
    return next((item for item in items if isinstance(item, FdmError)), None) or default_collate(items)


def load_batches(views: Dataset, batch_sampler: Iterable[list[int]], num_workers: int = 0) -> Iterator[torch.Tensor]:
    """The batches of ``views`` that ``batch_sampler`` names, read by ``num_workers`` worker processes.

    Raises:
        FdmError: a view's own error (an image that cannot be decoded: :class:`InputError` naming the file), raised
            here with its one-line message, also when a worker process met it.
    """
    loader = DataLoader(_ErrorsAsValues(views), batch_sampler=batch_sampler, num_workers=num_workers,
                        collate_fn=_collate_or_error)
    for batch in loader:
        if isinstance(batch, FdmError):
            raise batch
        yield batch
