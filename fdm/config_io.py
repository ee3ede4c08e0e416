"""Reading JSON and YAML configuration files with errors that name the file and the line.

A file that does not parse, cannot be read, whose top level is not a mapping, or that nests deeper or holds more
values than :mod:`fdm.limits` allows (``max_depth``, ``max_config_entries``; YAML aliases counted each time
they are used) raises :class:`~fdm.errors.ConfigError` (``json.JSONDecodeError`` / ``yaml.YAMLError`` say where, but not which
file). Configuration files are small and shallow; these bounds stop crafted ones from exhausting the recursion
limit or the time of the code that walks them. :func:`check_sizes` bounds the sizes a model config gives (layer
counts, widths, codebook sizes) before a model is built from it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fdm.errors import ConfigError
from fdm.limits import current as current_limits

__all__ = ["check_sizes", "read_json", "read_yaml"]


def read_json(path: str | Path, what: str = "JSON file") -> dict[str, Any]:
    """Parse a JSON file whose top level is an object.

    Args:
        path: the file.
        what: how messages name it (``"config.json of fdm-vqgan"``...).

    Raises:
        ConfigError: unreadable, not JSON (names the line and column), or not an object at the top level.
    """
    return _read_mapping(Path(path), what, "JSON", json.loads, json.JSONDecodeError,
                         lambda err: f"line {err.lineno} column {err.colno}: {err.msg}")


def read_yaml(path: str | Path, what: str = "YAML file") -> dict[str, Any]:
    """Parse a YAML file (``yaml.safe_load``: plain data only) whose top level is a mapping.

    Raises:
        ConfigError: unreadable, not YAML (names the line and column), or not a mapping at the top level.
    """
    import yaml

    return _read_mapping(Path(path), what, "YAML", yaml.safe_load, yaml.YAMLError, _yaml_problem)


def _yaml_problem(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(err, "problem", None) or str(err).splitlines()[0])


def _read_mapping(
    path: Path, what: str, syntax: str, parse: Callable[[str], Any], parse_error: type[Exception],
    describe: Callable[[Any], str],
) -> dict[str, Any]:
    """Read ``path`` as UTF-8 text, ``parse`` it and check that it is a mapping; every failure is a
    :class:`ConfigError` naming ``what`` and ``path`` (``describe`` says where a ``parse_error`` is)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start}): is it the right file?") from err
    except OSError as err:
        raise ConfigError(f"Cannot read {what} {path}: {err.strerror or err}") from err
    try:
        data = parse(text)
    except parse_error as err:
        raise ConfigError(f"{what} {path} is not valid {syntax}: {describe(err)}.") from err
    except RecursionError:
        raise ConfigError(f"{what} {path} nests too deeply to parse (at most {current_limits().max_depth} "
                          "levels, fdm.limits).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} holds {type(data).__name__}, not a mapping of keys to values.")
    _check_bounds(data, f"{what} {path}")
    return data


def _check_bounds(data: Any, name: str) -> None:
    """Walk ``data`` without recursion: at most ``max_depth`` levels and ``max_config_entries`` values."""
    limits = current_limits()
    stack, entries = [(data, 1)], 0
    while stack:
        value, depth = stack.pop()
        entries += 1
        if entries > limits.max_config_entries:
            raise ConfigError(f"{name} holds more than {limits.max_config_entries} values (YAML aliases counted each "
                              "time they are used; fdm.limits); a configuration file is far smaller.")
        if depth > limits.max_depth:
            raise ConfigError(f"{name} nests deeper than {limits.max_depth} levels (fdm.limits); a "
                              "configuration file is far shallower.")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)


def check_sizes(config: Any, limits: dict[str, int | tuple[int, int | None]], *, prefix: str) -> None:
    """Refuse a size in a model config (a plain nested dict) that is not a non-negative integer within ``limits``,
    before a model is built from it. ``limits`` maps a key, wherever it occurs, to its largest value, or for a list
    to (most entries, largest entry; None: entries of any kind, e.g. block type names); None values (a model's
    default) pass.

    Raises:
        ConfigError: naming the key path (under ``prefix``), the value and the limit.
    """
    if isinstance(config, list):
        for i, item in enumerate(config):
            check_sizes(item, limits, prefix=f"{prefix}[{i}]")
        return
    if not isinstance(config, dict):
        return
    for key, value in config.items():
        where, limit = f"{prefix}.{key}", limits.get(key)
        if value is None or limit is None:
            check_sizes(value, limits, prefix=where)
        elif isinstance(limit, tuple):
            most, largest = limit
            if not isinstance(value, list) or len(value) > most:
                raise ConfigError(f"{where} must be a list of at most {most} entries; got {_short(value)}.")
            for i, item in enumerate(value if largest is not None else ()):
                _check_size(f"{where}[{i}]", item, largest)
        else:
            _check_size(where, value, limit)


def _check_size(where: str, value: Any, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ConfigError(f"{where} must be an integer from 0 to {limit}; got {_short(value)}.")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
