"""The image tokenizers of transformers' multimodal models with FDM (Park & Jung, WACV 2025): ``JanusVQVAE``
(Janus / Janus-Pro's LlamaGen-style VQ-16) and ``Emu3VQVAE`` (Emu3's MoVQ-style tokenizer, image mode).

Models are matched by class name and module prefix ``transformers.``; transformers itself is imported only when a
model is loaded (``pip install ".[transformers]"`` from a clone). See docs/transformers.md.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fdm.adapters.transformers.emu3 import Emu3VQAdapter
from fdm.adapters.transformers.janus import JanusVQAdapter
from fdm.adapters.transformers.loading import load_model
from fdm.registry import CliModel, ModelFamily

__all__ = ["FAMILY", "Emu3VQAdapter", "JanusVQAdapter", "load_model"]


def _load_from_options(args: Any) -> nn.Module:
    return load_model(args.checkpoint)


#: The family's declaration for :mod:`fdm.registry` (``--model transformers --checkpoint DIR_OR_REPO``).
FAMILY = ModelFamily(
    name="transformers",
    adapters=(JanusVQAdapter, Emu3VQAdapter),
    load_model=load_model,
    extra="transformers",
    cli_models={"transformers": CliModel(_load_from_options, requires=("checkpoint",))},
)
