"""taming-transformers (Esser et al., CVPR 2021) with FDM: VQModel, GumbelVQ, Net2NetTransformer.

``FAMILY`` declares the family for :mod:`fdm.registry`: its adapters, :func:`load_model`, the ``--model taming``
choice of the command line with its ``--config`` and ``--trust-config`` options, and the ``fdm sample`` sub-command
(the demo model, a small taming VQGAN, is ``--model demo``, declared by :mod:`fdm.demo.family`). taming itself is imported only when a model is loaded or sampled (install it with
``pip install ".[taming]"`` from a clone). See docs/taming.md.
"""

from __future__ import annotations

import argparse

from torch import nn

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
from fdm.registry import CliModel, ModelFamily

__all__ = [
    "FAMILY",
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


def _load_from_options(args: argparse.Namespace) -> nn.Module:
    return load_model(args.config, args.checkpoint, trust_config=args.trust_config)


FAMILY = ModelFamily(
    name="taming",
    adapters=(VQModelAdapter, GumbelVQAdapter, Net2NetTransformerAdapter),
    load_model=load_model,
    extra="taming",
    cli_models={
        "taming": CliModel(_load_from_options, requires=("config", "checkpoint")),
    },
    cli_options={
        "--config": {"help": "*-project.yaml / model.yaml path, or hf://owner/repo/path.yaml"},
        "--trust-config": {"action": "store_true",
                           "help": "build any class the config names as a target (default: taming's own classes "
                                   "only; a config names code that loading it runs)"},
    },
    commands={"sample": "fdm.adapters.taming.command"},
)
