"""The model-family registry: the built-in families listed in :data:`FAMILIES`, the families installed packages
declare under the entry-point group ``fdm.families`` (:data:`ENTRY_POINT_GROUP`), and those added at run time with
:func:`register_family`.

A family package (``fdm.adapters.taming``, ``fdm.adapters.put``, ``fdm.adapters.diffusers``,
``fdm.adapters.transformers``, or your own) defines one module-level ``FAMILY = ModelFamily(...)``: its
adapter classes, its loader, the pip extra that installs its third-party dependency, the ``--model`` choices
and options it gives the command line and its own sub-commands. Adding a family = one package + one line in
:data:`FAMILIES` (in fdm-vq), or one entry point in the ``pyproject.toml`` of a package installed beside it
(``[project.entry-points."fdm.families"]``, ``name = "package:FAMILY"``). Family packages are imported
lazily, the first time :func:`fdm.find_adapter` or the command line needs them, so ``import fdm`` imports none
of them; none imports its third-party package before a model of that family is loaded. Two families with one
name are refused. See docs/adapters.md.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from fdm.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from fdm.adapter import VQAdapter
    from fdm.module import FDM

__all__ = ["ENTRY_POINT_GROUP", "FAMILIES", "CliModel", "ModelFamily", "families", "family_of", "find_adapter",
           "get_family", "register_family"]

#: The built-in families and those added by :func:`register_family`: import paths of the family packages (``pkg``
#: names ``pkg.FAMILY``, ``pkg:NAME`` names ``pkg.NAME``), searched in this order by :func:`fdm.find_adapter`, before
#: the installed ones (:data:`ENTRY_POINT_GROUP`).
FAMILIES: list[str] = [
    "fdm.demo.family",  # --model demo, the default: the embedded VQGAN (a taming model) and its FDM
    "fdm.adapters.taming",  # taming-transformers VQGAN / GumbelVQ / Net2NetTransformer
    "fdm.adapters.put",  # PUT's P-VQVAE and UQ-Transformer
    "fdm.adapters.diffusers",  # diffusers' VQModel
    "fdm.adapters.transformers",  # transformers' JanusVQVAE and Emu3VQVAE (multimodal models' image tokenizers)
    "fdm.adapters.vector_quantize",  # VQAutoencoder: your encoder and decoder around vector-quantize-pytorch
]

#: The entry-point group under which installed packages declare their families (value: ``"package:FAMILY"``).
ENTRY_POINT_GROUP = "fdm.families"

_loaded: dict[str, ModelFamily] = {}


@dataclass(frozen=True)
class CliModel:
    """One ``--model`` choice of the command line (``fdm eval|train|finetune --model NAME``).

    Attributes:
        load: builds the base model from the parsed options (``--config``, ``--checkpoint``, ``--transformer``,
            ``--trust-config``); the caller moves it to ``--device`` and sets eval mode.
        requires: options that must be given (names without ``--``), checked before ``load`` runs.
        default_fdm: the FDM used when ``--fdm`` is not given (the demo model's embedded one); None: ``--fdm``
            is required.
    """

    load: Callable[[argparse.Namespace], nn.Module]
    requires: tuple[str, ...] = ()
    default_fdm: Callable[[], FDM] | None = None


@dataclass(frozen=True)
class ModelFamily:
    """What one model family brings: declared once, as ``FAMILY`` in the family's package.

    Attributes:
        name: the family's name (``taming``); also its ``--model`` choice unless ``cli_models`` says otherwise.
        adapters: its :class:`~fdm.VQAdapter` subclasses; :func:`fdm.find_adapter` tries them in order.
        load_model: the Python loader (``fdm.adapters.<family>.load_model``), or None.
        extra: the pip extra that installs the family's third-party package (``pip install ".[taming]"`` from a clone),
            None when it needs none.
        cli_models: the ``--model`` choices it adds to the command line, by name.
        cli_options: the command-line options its loaders read besides the common ``--checkpoint`` and ``--device``:
            flag (``--config``) -> keyword arguments of ``argparse``'s ``add_argument`` (``help``, ``action``, ...).
            They appear in every command that takes ``--model``, grouped under the family's name; a flag may
            belong to one family only.
        commands: its own ``fdm`` sub-commands: name -> import path of a module with ``add_arguments(parser)``
            and ``run(args) -> int`` (the docstring's first line is the help text).
    """

    name: str
    adapters: tuple[type[VQAdapter], ...]
    load_model: Callable[..., Any] | None = None
    extra: str | None = None
    cli_models: Mapping[str, CliModel] = field(default_factory=dict)
    cli_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    commands: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [flag for flag in self.cli_options if not (isinstance(flag, str) and flag.startswith("--"))]
        if bad:
            raise ConfigError(f"family {self.name!r}: cli_options are flags such as '--config'; got {bad}.")
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "cli_models", MappingProxyType(dict(self.cli_models)))
        object.__setattr__(self, "cli_options",
                           MappingProxyType({flag: MappingProxyType(dict(kw)) for flag, kw in self.cli_options.items()}))
        object.__setattr__(self, "commands", MappingProxyType(dict(self.commands)))

    @property
    def install_hint(self) -> str:
        """The ``pip install`` command that brings the family's dependency ('' when it needs none)."""
        return f'pip install ".[{self.extra}]" (from a clone of fdm-vq)' if self.extra else ""

    def handles(self, model: object) -> VQAdapter | None:
        """An adapter instance for ``model`` from this family, or None."""
        for cls in self.adapters:
            if cls.matches(model):
                return cls(model)
        return None


def register_family(module: str) -> None:
    """Add the family package ``module`` (an import path whose ``FAMILY`` is a :class:`ModelFamily`) to
    :data:`FAMILIES`, for a family that lives outside fdm-vq and is not installed with an entry point. Idempotent;
    searched after the built-in ones.

    Raises:
        ConfigError: ``module`` defines no ``FAMILY``, or a registered family has its name already.
    """
    if module in FAMILIES:
        return
    family = _load(module)
    for other in _targets():
        if _load(other).name == family.name:
            raise ConfigError(f"cannot register {module}: its family is called {family.name!r}, like the family of "
                              f"{_origin(other)}; give it another name.")
    FAMILIES.append(module)


@functools.cache
def _installed() -> dict[str, str]:
    """The families installed packages declare: entry-point value (``package:FAMILY``) -> where it comes from (read
    once per process)."""
    found = {}
    for entry in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        dist = getattr(entry.dist, "name", None) or "an unknown package"
        found.setdefault(entry.value, f"entry point {entry.name!r} of the installed package {dist}")
    return found


def _targets() -> list[str]:
    """Every family's import path, in search order: :data:`FAMILIES`, then the installed ones."""
    return list(FAMILIES) + [target for target in _installed() if target not in FAMILIES]


def _origin(target: str) -> str:
    return _installed().get(target, target) if target not in FAMILIES else target


def _load(target: str) -> ModelFamily:
    if target not in _loaded:
        module, _, name = target.partition(":")
        try:
            package = importlib.import_module(module)  # family packages import no third-party package themselves
        except ImportError as err:
            if target in FAMILIES:
                raise
            raise ConfigError(f"the model family of {_origin(target)} ({target}) cannot be imported: {err}; "
                              "reinstall or uninstall that package.") from err
        declared = getattr(package, name or "FAMILY", None)
        if not isinstance(declared, ModelFamily):
            raise ConfigError(f"{_origin(target)} is registered as a model family but {target} is no "
                              f"ModelFamily(...); got {type(declared).__name__}.")
        _loaded[target] = declared
    return _loaded[target]


def families() -> Iterator[ModelFamily]:
    """The registered families in search order (:data:`FAMILIES`, then the installed ones), each imported when
    reached.

    Raises:
        ConfigError: two of them have the same name (names both), or an installed one cannot be imported.
    """
    seen: dict[str, str] = {}
    for target in _targets():
        family = _load(target)
        if family.name in seen:
            raise ConfigError(f"two model families are called {family.name!r}: the one of {_origin(seen[family.name])} "
                              f"and the one of {_origin(target)}; uninstall one of them.")
        seen[family.name] = target
        yield family


def get_family(name: str) -> ModelFamily:
    """The family called ``name``.

    Raises:
        ConfigError: no registered family has this name.
    """
    for family in families():
        if family.name == name:
            return family
    raise ConfigError(f"No model family {name!r}; registered: {', '.join(f.name for f in families())}.")


def find_adapter(model: nn.Module) -> VQAdapter:
    """The adapter instance for ``model``, chosen from its type among the registered families (:func:`families`:
    the first that handles it wins).

    Raises:
        TypeError: no registered family handles this model type.
    """
    found = family_of(model)
    if found is not None:
        return found[1]
    names = ", ".join(f"{f.name} ({', '.join(c.__name__ for c in f.adapters)})" for f in families())
    raise TypeError(
        f"No fdm adapter handles {type(model).__module__}.{type(model).__name__}. Registered families: {names}. "
        "Pass adapter=YourAdapter(model) to fdm.Dequantizer, or declare a family and register it "
        "(fdm.registry.register_family; see docs/adapters.md)."
    )


def family_of(model: object) -> tuple[ModelFamily, VQAdapter] | None:
    """The first family (in registry order) with an adapter for ``model``, and that adapter; None if none has."""
    for family in families():
        adapter = family.handles(model)
        if adapter is not None:
            return family, adapter
    return None


def cli_models() -> dict[str, tuple[ModelFamily, CliModel]]:
    """Every ``--model`` choice of the command line, with its family."""
    return _declared("cli_models", "--model")


def cli_options() -> dict[str, tuple[ModelFamily, Mapping[str, Any]]]:
    """Every family's own command-line option: flag -> (family, ``add_argument`` keyword arguments)."""
    return _declared("cli_options", "the option")


def cli_commands() -> dict[str, str]:
    """The families' own sub-commands: name -> module path."""
    return {name: module for name, (_, module) in _declared("commands", "the sub-command").items()}


def _declared(field: str, what: str) -> dict[str, tuple[ModelFamily, Any]]:
    """The entries of the mapping ``field`` of every family, by name, with their family.

    Raises:
        ConfigError: two families declare the same name (names both).
    """
    found: dict[str, tuple[ModelFamily, Any]] = {}
    for family in families():
        for name, entry in getattr(family, field).items():
            if name in found:
                raise ConfigError(f"{what} {name} is declared by both {found[name][0].name} and {family.name}.")
            found[name] = (family, entry)
    return found
