"""The ``fdm`` command line: the core sub-commands (modules in :mod:`fdm.commands`) plus those the model
families declare (``fdm sample`` from the taming family, ``fdm inpaint`` from PUT; see :mod:`fdm.registry`).

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; its docstring's first
line is the command's help text.

Errors the user can fix print one line, ``fdm COMMAND: error: ...``, to stderr and exit with code 2, without a
traceback (``--debug`` shows it): bad or out-of-range options (argparse, also one line), an ``--out`` folder that
cannot be created, and the library's :class:`~fdm.errors.FdmError` family (unreadable images, config files that
do not parse, weights that do not fit, Hub repos or files that cannot be had, missing optional extras) plus the
file-system errors of the paths given. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

from fdm.errors import FdmError, UsageError
from fdm.registry import cli_commands

__all__ = ["USER_ERRORS", "ArgumentParser", "build_parser", "commands", "is_user_error", "main", "prepare_output_dir"]

#: The core sub-commands; model families add their own (:func:`commands`).
COMMANDS = {
    "demo": "fdm.commands.demo",
    "eval": "fdm.commands.evaluate",
    "train": "fdm.commands.train",
    "finetune": "fdm.commands.finetune",
    "push": "fdm.commands.push",
}


def commands() -> dict[str, str]:
    """Every sub-command: the core ones, then the registered families' (name -> module path)."""
    extra = cli_commands()
    clash = sorted(set(extra) & set(COMMANDS))
    if clash:
        raise RuntimeError(f"model families declare sub-commands that the core already has: {clash}")
    return {**COMMANDS, **extra}

#: Exceptions reported as one line with exit code 2 (see also :func:`is_user_error`).
USER_ERRORS = (FdmError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``fdm train: error: argument --steps: expected an integer >= 1; got 0 (see
    fdm train --help)``, exit code 2 (argparse's own prints the whole usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """Accept ``--debug`` after the (sub-)command too, without overriding a global ``fdm --debug``."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fdm", description="Feature Dequantization Module (FDM) for VQ image models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of errors (by default they are one line on stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in commands().items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip().splitlines()
        summary = doc[0] if doc else name
        cmd = sub.add_parser(name, help=summary, description=(module.__doc__ or "").strip(),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(cmd)
        _add_debug(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def prepare_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Create the output folder ``path`` (with its parents) and check that it is writable.

    Raises:
        UsageError: ``path`` is a file, or the folder cannot be created or written (names it).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} exists and is not a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot create the output folder ({err.strerror or err}).") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the output folder is not writable.")
    return path


def is_user_error(err: BaseException) -> bool:
    """True for errors the user can fix (:data:`USER_ERRORS`; a missing optional dependency is a
    :class:`~fdm.errors.MissingExtraError`, which names the ``pip install`` that brings it)."""
    return isinstance(err, USER_ERRORS)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: a failed command leaves no empty --out behind, and
    never removes anything it wrote (a checkpoint to resume from, a feature cache)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone: it and the folders above it stay
            return


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fdm`` console script; returns the process exit code (2: a user error)."""
    try:
        parser = build_parser()
    except FdmError as err:  # an installed model family that cannot be loaded, or two with one name
        print(f"fdm: error: {_one_line(str(err))}", file=sys.stderr)
        return EXIT_USER_ERROR
    args = parser.parse_args(argv)
    # fdm's own progress messages at INFO; other libraries' (httpx requests...) only from WARNING
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    level = logging.DEBUG if args.verbose else logging.INFO
    if os.environ.get("RANK", "0") not in ("", "0"):  # the other processes of a distributed run: warnings only
        level = logging.WARNING
    logging.getLogger("fdm").setLevel(level)
    name = " ".join(filter(None, ["fdm", args.command, getattr(args, "task", None)]))
    created: list[Path] = []  # the --out folders this command makes, removed again if it fails and they stay empty
    try:
        if getattr(args, "out", None) is not None:
            created = [folder for folder in (Path(args.out), *Path(args.out).parents) if not folder.exists()]
            prepare_output_dir(args.out)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        _remove_empty(created)
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        _remove_empty(created)
        if not is_user_error(err):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"{name}: error: {_one_line(str(err)) or type(err).__name__}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
