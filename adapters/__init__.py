"""Adapters for third-party VQ model families, installed as ``fdm.adapters``.

Importing this package registers every built-in adapter; none of them imports its third-party package
(taming, diffusers) until a model of that family is actually used.
"""

__all__: list[str] = []
