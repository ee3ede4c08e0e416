"""Adapters for third-party VQ model families, installed as ``fdm.adapters``.

Importing this package registers every built-in adapter; none of them imports its third-party package
(taming, diffusers) until a model of that family is actually used.
"""

from fdm.adapters import diffusers, put, taming  # noqa: F401  (registers the adapters)

__all__ = ["diffusers", "put", "taming"]
