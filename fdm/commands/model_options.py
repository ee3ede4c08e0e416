"""Command-line options that name a base VQ model and an FDM, shared by the sub-commands.

``--model`` picks the family; the adapters' own ``load_model`` functions do the loading, imported only
for the family asked for (so a missing optional dependency names its extra).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from fdm.errors import UsageError
from fdm.module import FDM

__all__ = ["add_model_arguments", "load_base_model", "load_fdm"]

FAMILIES = ("demo", "taming", "put", "diffusers")


def add_model_arguments(parser: argparse.ArgumentParser, *, fdm: bool = True) -> None:
    """Add ``--model``, ``--config``, ``--trust-config``, ``--checkpoint``, ``--transformer``, ``--device`` (and
    ``--fdm``)."""
    group = parser.add_argument_group("base model")
    group.add_argument("--model", choices=FAMILIES, default="demo",
                       help="model family (default: the small VQGAN embedded in the package)")
    group.add_argument("--config", help="taming: *-project.yaml / model.yaml path or Hub repo id")
    group.add_argument("--trust-config", action="store_true",
                       help="taming: build any class the config names as a target (default: taming's own classes "
                            "only; a config names code that loading it runs)")
    group.add_argument("--checkpoint", help="taming .ckpt, PUT codec .pth, or diffusers folder / Hub repo id")
    group.add_argument("--transformer", help="PUT: UQ-Transformer checkpoint (sampling only)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if fdm:
        group.add_argument("--fdm", help="FDM folder or Hub repo id (default with --model demo: the embedded FDM)")


def load_base_model(args: argparse.Namespace) -> nn.Module:
    """Load the base model the options name, in eval mode, on ``args.device``."""
    if args.model == "demo":
        from fdm.demo.model import load_demo_vqgan

        model = load_demo_vqgan()
    elif args.model == "taming":
        from fdm.adapters.taming import load_model

        _require(args, "config", "checkpoint")
        model = load_model(args.config, args.checkpoint, trust_config=getattr(args, "trust_config", False))
    elif args.model == "put":
        from fdm.adapters.put import load_model

        _require(args, "checkpoint")
        model = load_model(args.checkpoint, transformer=args.transformer)
    else:
        from fdm.adapters.diffusers import load_model

        _require(args, "checkpoint")
        model = load_model(args.checkpoint)
    return model.to(args.device).eval()


def load_fdm(args: argparse.Namespace) -> FDM:
    """Load the FDM the options name (``--fdm``, or the embedded one for ``--model demo``)."""
    if args.fdm:
        return FDM.from_pretrained(args.fdm).to(args.device)
    if args.model == "demo":
        from fdm.demo.model import load_demo_fdm

        return load_demo_fdm().to(args.device)
    raise UsageError(f"--fdm is required with --model {args.model} (a folder or Hub repo id written by fdm train).")


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n}" for n in names if not getattr(args, n)]
    if missing:
        raise UsageError(f"--model {args.model} needs {' and '.join(missing)}.")
