"""Models built with lucidrains' vector-quantize-pytorch (``VectorQuantize``, ``ResidualVQ``), wrapped in a
:class:`VQAutoencoder`, with FDM (Park & Jung, WACV 2025). See docs/vector-quantize.md.

Importing this package does not import vector-quantize-pytorch (``pip install ".[vector-quantize]"`` from a clone):
your code builds the quantizer; the family recognises it by its class. A user-built model cannot be rebuilt from a
weight file alone without running code, so the family adds no ``--model`` choice to the command line: build the
model in Python, then :func:`load_weights` (safetensors, never pickle).
"""

from __future__ import annotations

from fdm.adapters.vector_quantize.adapter import VectorQuantizeAdapter
from fdm.adapters.vector_quantize.model import QUANTIZERS, VQAutoencoder, load_weights, save_weights
from fdm.registry import ModelFamily

__all__ = ["FAMILY", "QUANTIZERS", "VQAutoencoder", "VectorQuantizeAdapter", "load_weights", "save_weights"]

#: The family's declaration for :mod:`fdm.registry` (no command-line model: see the module docstring).
FAMILY = ModelFamily(name="vector-quantize", adapters=(VectorQuantizeAdapter,), extra="vector-quantize")
