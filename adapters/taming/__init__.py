"""taming-transformers (Esser et al., CVPR 2021) with FDM: VQModel, GumbelVQ, Net2NetTransformer.

``FAMILY`` declares the family for :mod:`fdm.registry`: its adapters, :func:`load_model`, the ``--model taming``
and ``--model demo`` choices of the command line (the demo model is a small taming VQGAN) and the ``fdm sample``
sub-command. taming itself is imported only when a model is loaded or sampled (install it with
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
from fdm.module import FDM
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


def _load_demo_model(args: argparse.Namespace) -> nn.Module:
    from fdm.demo.model import load_demo_vqgan

    return load_demo_vqgan()


def _load_demo_fdm() -> FDM:
    from fdm.demo.model import load_demo_fdm

    return load_demo_fdm()


FAMILY = ModelFamily(
    name="taming",
    adapters=(VQModelAdapter, GumbelVQAdapter, Net2NetTransformerAdapter),
    load_model=load_model,
    extra="taming",
    cli_models={
        "demo": CliModel(_load_demo_model, default_fdm=_load_demo_fdm),
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
