"""WebDataset-style tar shards as an image source (:class:`TarShardSource`): one path, a glob or a brace pattern."""

from __future__ import annotations

import itertools
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from glob import glob
from pathlib import Path
from typing import IO

from PIL import Image

from fdm.errors import InputError, UsageError
from fdm.images import as_rgb8, decode_image
from fdm.limits import current as current_limits
from fdm.training.sources.base import IMAGE_EXTENSIONS, ImageSource, bounds, check_index, file_stats

__all__ = ["TarShardSource"]

logger = logging.getLogger(__name__)

_MAX_BRACE_EXPANSION = 100_000  # shard names one brace pattern may stand for


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
            larger than ``fdm.limits`` ``max_image_bytes``, or the shards hold no image (names the shard and member).
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
        check_index(index, len(self))
        with self._open(self._shard_of[index]) as file:
            return self._decode(index, file)

    def iter_images(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Image.Image]]:
        """``(index, image)`` in order, each shard opened once."""
        indices = range(*bounds(start, stop, len(self)))
        for shard, group in itertools.groupby(indices, key=self._shard_of.__getitem__):
            with self._open(shard) as file:
                for index in group:
                    yield index, self._decode(index, file)

    def identity(self) -> list[tuple[str, int, int]]:
        """(file name, size, modification time in ns) of every shard, in order."""
        return file_stats(self.shards)

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
                    if member.size > (most := current_limits().max_image_bytes):
                        raise InputError(f"Tar shard {shard}, member {name!r}: {member.size} bytes, more than the "
                                         f"{most} an image may have (fdm.limits; corrupt or hostile shard?).")
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
