"""The bounds every reader of user files applies: one frozen :class:`Limits` (tensor bytes, decompressed bytes and
ratio, nesting depth, config size, model size from a config, image and label-map size), one module default, and two
documented ways to raise it for a legitimately large model (docs/security.md, "Limits").

Readers call :func:`current` when they run, so a change applies to every reader at once::

    import fdm.limits

    with fdm.limits.override(max_tensor_bytes=32 << 30):   # one block
        model = load_model("huge.yaml", "huge.ckpt")
    fdm.limits.set_limits(max_image_pixels=400_000_000)     # the rest of the process

The default is the only mutable state: it is process-wide (not per thread), and :func:`override` restores it on
exit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["Limits", "current", "override", "set_limits"]


@dataclass(frozen=True)
class Limits:
    """Largest sizes fdm-vq reads from a file before refusing it (an :class:`~fdm.errors.FdmError` naming the
    limit). Every default is far above the released models it reads; each field says what it bounds.
    """

    max_tensor_bytes: int = 8 << 30
    """One storage of a pickled checkpoint (declared sizes are checked before anything is allocated). The largest
    tensor of a released taming transformer is 0.1 GB."""
    max_decompressed_bytes: int = 64 << 30
    """All records of one ``torch.save`` zip archive together, once inflated."""
    max_compression_ratio: int = 100
    """Inflation ratio of one compressed record of a zip archive (``torch.save`` stores storages uncompressed)."""
    max_depth: int = 64
    """Nesting of mappings and lists in a JSON / YAML config file, and of containers in a pickled checkpoint."""
    max_config_entries: int = 100_000
    """Values in a JSON / YAML config file, a YAML alias counted each time it is used."""
    max_fdm_parameters: int = 200_000_000
    """Parameters of an FDM built from a ``config.json`` (built before its weights are read; the paper's FDM has
    3.8 M)."""
    max_model_parameters: int = 4_000_000_000
    """Parameters of a base model built from a config (taming: on the meta device, before any weight is read; the
    largest released taming transformer has 1.4 B)."""
    max_image_pixels: int = 89_478_485
    """Pixels of one image file (Pillow's own decompression-bomb limit; Pillow refuses twice that by itself)."""
    max_image_bytes: int = 256 << 20
    """Bytes of one encoded image inside a tar shard."""
    max_label_map_pixels: int = 8192 * 8192
    """Pixels of one label map (``fdm sample semantic --segmentation``)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{field.name} must be a positive integer; got {value!r}.")


_default = Limits()


def current() -> Limits:
    """The limits readers apply now (the module default, as :func:`set_limits` or :func:`override` left it)."""
    return _default


def set_limits(limits: Limits | None = None, **changes: Any) -> Limits:
    """Replace the default limits for the rest of the process; returns the previous ones (to restore them).

    Args:
        limits: a whole :class:`Limits` (None: the current ones).
        **changes: fields to change, e.g. ``max_tensor_bytes=32 << 30``.

    Raises:
        TypeError: an unknown field. ValueError: a value that is not a positive integer.
    """
    global _default
    previous = _default
    _default = dataclasses.replace(limits or previous, **changes)
    return previous


@contextmanager
def override(**changes: Any) -> Iterator[Limits]:
    """Change some limits inside a ``with`` block (yields the limits in force); the previous ones come back on
    exit, also after an exception."""
    previous = set_limits(**changes)
    try:
        yield current()
    finally:
        set_limits(previous)
