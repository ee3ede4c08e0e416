"""Reading JSON and YAML configuration files with errors that name the file and the line.

A file that does not parse, cannot be read, or whose top level is not a mapping raises
:class:`~fdm.errors.ConfigError` (``json.JSONDecodeError`` / ``yaml.YAMLError`` say where, but not which file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fdm.errors import ConfigError

__all__ = ["read_json", "read_yaml"]


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start}): is it the right file?") from err
    except OSError as err:
        raise ConfigError(f"Cannot read {what} {path}: {err.strerror or err}") from err


def _mapping(data: Any, path: Path, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} holds {type(data).__name__}, not a mapping of keys to values.")
    return data


def read_json(path: str | Path, what: str = "JSON file") -> dict[str, Any]:
    """Parse a JSON file whose top level is an object.

    Args:
        path: the file.
        what: how messages name it (``"config.json of fdm-vqgan"``...).

    Raises:
        ConfigError: unreadable, not JSON (names the line and column), or not an object at the top level.
    """
    path = Path(path)
    text = _read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what} {path} is not valid JSON: line {err.lineno} column {err.colno}: {err.msg}.") from err
    return _mapping(data, path, what)


def read_yaml(path: str | Path, what: str = "YAML file") -> dict[str, Any]:
    """Parse a YAML file (``yaml.safe_load``: plain data only) whose top level is a mapping.

    Raises:
        ConfigError: unreadable, not YAML (names the line and column), or not a mapping at the top level.
    """
    import yaml

    path = Path(path)
    text = _read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{what} {path} is not valid YAML: {where}{problem}.") from err
    return _mapping(data, path, what)
