"""Command-line options that name a base VQ model and an FDM, shared by the sub-commands.

``--model`` choices and the options beside ``--checkpoint`` come from the registry (:mod:`fdm.registry`): each
family declares its own (:class:`~fdm.registry.CliModel`, ``ModelFamily.cli_options``), whose loader imports the
family's third-party package only when called (so a missing optional dependency names its extra).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from fdm import registry
from fdm.commands.argtypes import device
from fdm.errors import ConfigError, MissingExtraError, UsageError
from fdm.module import FDM

__all__ = ["add_model_arguments", "family_options_given", "load_base_model", "load_fdm", "model_choices"]


def model_choices() -> list[str]:
    """The ``--model`` names the registered families declare."""
    return list(registry.cli_models())


def add_model_arguments(parser: argparse.ArgumentParser, *, fdm: bool = True) -> None:
    """Add ``--model``, ``--checkpoint``, ``--device`` (and ``--fdm``), then each family's own options in a group
    of its own (taming's ``--config`` and ``--trust-config``, PUT's ``--transformer``). What is a local path and
    what a Hub repo is decided by :func:`fdm.io.hub.locate`: a missing local path fails at once (``file not found:
    PATH``, one line, exit code 2)."""
    group = parser.add_argument_group("base model")
    group.add_argument("--model", choices=model_choices(), default="demo",
                       help="model family (default: demo, the small VQGAN embedded in the package)")
    group.add_argument("--checkpoint", help="taming .ckpt, PUT codec .pth, or diffusers / transformers folder or Hub "
                                            "repo id; "
                                            "hf://owner/repo/path for a file or folder inside a Hub repo")
    group.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    if fdm:
        group.add_argument("--fdm", help="FDM folder or Hub repo id (default with --model demo: the embedded FDM)")
    family_groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, (family, kwargs) in registry.cli_options().items():
        if family.name not in family_groups:
            family_groups[family.name] = parser.add_argument_group(f"{family.name} family")
        try:
            family_groups[family.name].add_argument(flag, **kwargs)
        except (argparse.ArgumentError, TypeError, ValueError) as err:
            raise ConfigError(f"model family {family.name!r}: cannot add its option {flag} to {parser.prog}: "
                              f"{err}") from err


def family_options_given(args: argparse.Namespace) -> dict[str, Any]:
    """The families' own options given on the command line: flag -> value (``{"--config": "model.yaml"}``)."""
    given = {flag: getattr(args, flag[2:].replace("-", "_"), None) for flag in registry.cli_options()}
    return {flag: value for flag, value in given.items() if value not in (None, False)}


def _cli_model(args: argparse.Namespace) -> tuple[registry.ModelFamily, registry.CliModel]:
    choices = registry.cli_models()
    if args.model not in choices:
        raise UsageError(f"--model {args.model} is not a registered model; choose from {', '.join(choices)}.")
    return choices[args.model]


def load_base_model(args: argparse.Namespace) -> nn.Module:
    """Load the base model the options name, in eval mode, on ``args.device``.

    Raises:
        UsageError: an option the family needs is missing.
        MissingExtraError: the family's third-party package is not installed (names the extra to install).
    """
    family, entry = _cli_model(args)
    missing = [f"--{n.replace('_', '-')}" for n in entry.requires if not getattr(args, n, None)]
    if missing:
        raise UsageError(f"--model {args.model} needs {' and '.join(missing)}.")
    try:
        model = entry.load(args)
    except ImportError as err:
        if isinstance(err, MissingExtraError) or not family.extra:
            raise
        raise MissingExtraError(f"--model {args.model}: {err}; {family.install_hint}") from err
    return model.to(args.device).eval()


def load_fdm(args: argparse.Namespace) -> FDM:
    """Load the FDM the options name (``--fdm``, or the model's default one, e.g. the demo's embedded FDM)."""
    if args.fdm:
        return FDM.from_pretrained(args.fdm).to(args.device)
    _, entry = _cli_model(args)
    if entry.default_fdm is not None:
        return entry.default_fdm().to(args.device)
    raise UsageError(f"--fdm is required with --model {args.model} (a folder or Hub repo id written by fdm train).")
