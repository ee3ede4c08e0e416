"""Command-line options made from the fields of a run's config dataclass (:class:`~fdm.training.Phase2Config`,
:class:`~fdm.training.Phase3Config`): an option's default is its field's, written once in the dataclass and shown
in ``--help``, and its value reaches the config under the field's name (:func:`config_from_args`)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["ConfigOption", "add_config_options", "config_from_args", "field_defaults"]


@dataclasses.dataclass(frozen=True)
class ConfigOption:
    """One config field as a command-line option.

    Attributes:
        field: the config field the option sets.
        help: what the option does; ``(default ...)`` is added from the field unless the text speaks of its default
            itself.
        type: the argparse ``type=`` function of its value (none for a flag).
        flag: the option's name; default ``--`` and the field's name with dashes. A boolean field becomes a flag
            that sets the opposite of its default (``--no-progress`` for ``progress``).
        choices, metavar, nargs: as in :meth:`argparse.ArgumentParser.add_argument`.
    """

    field: str
    help: str
    type: Callable[[str], Any] | None = None
    flag: str | None = None
    choices: Sequence[Any] | None = None
    metavar: str | tuple[str, ...] | None = None
    nargs: int | None = None


def field_defaults(config_class: type) -> dict[str, Any]:
    """The default of every field of ``config_class`` (a dataclass) by name (``default_factory`` called)."""
    defaults = {}
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def add_config_options(group: argparse._ActionsContainer, config_class: type, options: Iterable[ConfigOption]) -> None:
    """Add each option to ``group`` (a parser, argument group or mutually exclusive group) with its field's default
    from ``config_class``."""
    defaults = field_defaults(config_class)
    for option in options:
        default = defaults[option.field]
        flag = option.flag or "--" + option.field.replace("_", "-")
        text = option.help
        if "default" not in text and default is not None and not isinstance(default, bool):
            shown = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else default
            text = f"{text} (default {shown})"
        text = text.replace("%", "%%")  # argparse formats help texts with %
        if isinstance(default, bool):
            group.add_argument(flag, dest=option.field, action="store_false" if default else "store_true", help=text)
            continue
        group.add_argument(flag, dest=option.field, type=option.type, default=default, help=text,
                           **{k: v for k, v in (("choices", option.choices), ("metavar", option.metavar),
                                                 ("nargs", option.nargs)) if v is not None})


def config_from_args(config_class: type, args: argparse.Namespace, **values: Any) -> Any:
    """``config_class`` from the parsed options named like its fields, and ``values`` (fields whose value the
    command derives from other options); fields with neither keep their defaults."""
    names = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"{config_class.__name__} has no fields {unknown}")
    parsed = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return config_class(**(parsed | values))
