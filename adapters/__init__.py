"""Adapters for third-party VQ model families, installed as ``fdm.adapters``: one package per family, each
declaring its ``FAMILY`` (see :mod:`fdm.registry`, which lists them and imports each only when needed).

Importing this package imports no family; none of them imports its third-party package (taming, diffusers)
until a model of that family is actually used.
"""
