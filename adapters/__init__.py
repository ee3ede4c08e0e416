"""Adapters for third-party VQ model families, installed as ``fdm.adapters``: one package per family, each
declaring its ``FAMILY`` (see :mod:`fdm.registry`, which lists them and imports each only when needed).

Importing this package imports no family; none of them imports its third-party package (taming, diffusers, transformers)
until a model of that family is actually used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["diffusers", "put", "taming", "transformers", "vector_quantize"]


def __getattr__(name: str) -> ModuleType:
    """``fdm.adapters.taming`` etc. after a bare ``import fdm.adapters``: the family is imported on first access."""
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
