"""PUT (Liu et al., CVPR 2022) with FDM (Park & Jung, WACV 2025): P-VQVAE, UQ-Transformer, checkpoint
loading (PUT and FDM-authors layouts), and pluralistic inpainting with the FDM correction.

PUT has no installable package; this is a self-contained implementation with PUT's parameter names.
``FAMILY`` declares the family for :mod:`fdm.registry`: :class:`PUTAdapter`, :func:`load_model`, the
``--model put`` choice of the command line and the ``fdm inpaint`` sub-command.
"""

from __future__ import annotations

import argparse

from torch import nn

from fdm.adapters.put.adapter import PUTAdapter
from fdm.adapters.put.checkpoints import (
    fdm_authors_state_dict,
    fdm_to_put_layout,
    load_model,
    put_state_dicts,
    put_to_fdm_layout,
    split_checkpoint,
)
from fdm.adapters.put.inpaint import InpaintOutput, inpaint
from fdm.adapters.put.model import PUT
from fdm.adapters.put.pvqvae import PVQVAE, DualCodebookQuantizer, GuidedDecoder, PatchEncoder
from fdm.adapters.put.sampler import sample_codes
from fdm.adapters.put.transformer import UQTransformer
from fdm.registry import CliModel, ModelFamily

__all__ = [
    "FAMILY",
    "PUT",
    "PVQVAE",
    "DualCodebookQuantizer",
    "GuidedDecoder",
    "InpaintOutput",
    "PUTAdapter",
    "PatchEncoder",
    "UQTransformer",
    "fdm_authors_state_dict",
    "fdm_to_put_layout",
    "inpaint",
    "load_model",
    "put_state_dicts",
    "put_to_fdm_layout",
    "sample_codes",
    "split_checkpoint",
]


def _load_from_options(args: argparse.Namespace) -> nn.Module:
    return load_model(args.checkpoint, transformer=args.transformer)


FAMILY = ModelFamily(
    name="put",
    adapters=(PUTAdapter,),
    load_model=load_model,
    cli_models={"put": CliModel(_load_from_options, requires=("checkpoint",))},
    cli_options={"--transformer": {"help": "UQ-Transformer checkpoint (sampling only), path or hf://..."}},
    commands={"inpaint": "fdm.adapters.put.command"},
)
