"""taming-transformers (Esser et al., CVPR 2021) with FDM: VQModel, GumbelVQ, Net2NetTransformer.

Importing this package registers the adapters; taming itself is imported only when a model is loaded
or sampled (install it with ``pip install "fdm-vq[taming]"``). See docs/taming.md.
"""

from fdm.adapters.taming.adapter import (
    GumbelVQAdapter,
    Net2NetTransformerAdapter,
    VQModelAdapter,
    first_stage_adapter,
)
from fdm.adapters.taming.loading import build_model, load_model
from fdm.adapters.taming.sampling import (
    decode_indices,
    sample_class,
    sample_semantic,
    sample_unconditional,
)

__all__ = [
    "GumbelVQAdapter",
    "Net2NetTransformerAdapter",
    "VQModelAdapter",
    "build_model",
    "decode_indices",
    "first_stage_adapter",
    "load_model",
    "sample_class",
    "sample_semantic",
    "sample_unconditional",
]
