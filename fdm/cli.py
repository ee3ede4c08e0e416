"""The ``fdm`` command line: one sub-command per module in :mod:`fdm.commands`.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; its docstring's first
line is the command's help text.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main"]

COMMANDS = {
    "demo": "fdm.commands.demo",
    "eval": "fdm.commands.evaluate",
    "train": "fdm.commands.train",
    "finetune": "fdm.commands.finetune",
    "sample": "fdm.commands.sample",
    "inpaint": "fdm.commands.inpaint",
    "push": "fdm.commands.push",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdm", description="Feature Dequantization Module (FDM) for VQ image models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip().splitlines()
        summary = doc[0] if doc else name
        cmd = sub.add_parser(name, help=summary, description=(module.__doc__ or "").strip(),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fdm`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, ImportError, TypeError) as err:
        print(f"fdm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
