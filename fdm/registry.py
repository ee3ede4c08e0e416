"""The model-family registry: one explicit list, :data:`FAMILIES`, of the packages that each declare a family.

A family package (``fdm.adapters.taming``, ``fdm.adapters.put``, ``fdm.adapters.diffusers``, or your own)
defines one module-level ``FAMILY = ModelFamily(...)``: its adapter classes, its loader, the pip extra that
installs its third-party dependency, the ``--model`` choices it gives the command line and its own
sub-commands. Adding a family = one package + one line in :data:`FAMILIES` (or :func:`register_family` for a
package outside fdm-vq). Family packages are imported lazily, the first time :func:`fdm.find_adapter` or the
command line needs them, so ``import fdm`` imports none of them; none imports its third-party package before
a model of that family is loaded. See docs/adapters.md.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from fdm.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from fdm.adapter import VQAdapter
    from fdm.module import FDM

__all__ = ["FAMILIES", "CliModel", "ModelFamily", "families", "family_of", "get_family", "register_family"]

#: The registry: import paths of the family packages, searched in this order by :func:`fdm.find_adapter`.
FAMILIES: list[str] = [
    "fdm.adapters.taming",  # taming-transformers VQGAN / GumbelVQ / Net2NetTransformer, and the demo model
    "fdm.adapters.put",  # PUT's P-VQVAE and UQ-Transformer
    "fdm.adapters.diffusers",  # diffusers' VQModel
]

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
        commands: its own ``fdm`` sub-commands: name -> import path of a module with ``add_arguments(parser)``
            and ``run(args) -> int`` (the docstring's first line is the help text).
    """

    name: str
    adapters: tuple[type[VQAdapter], ...]
    load_model: Callable[..., Any] | None = None
    extra: str | None = None
    cli_models: Mapping[str, CliModel] = field(default_factory=dict)
    commands: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "cli_models", MappingProxyType(dict(self.cli_models)))
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
    :data:`FAMILIES`, for families that live outside fdm-vq. Idempotent; searched after the built-in ones.

    Raises:
        ConfigError: ``module`` defines no ``FAMILY``, or a registered family has its name already.
    """
    if module in FAMILIES:
        return
    family = _load(module)
    for other in list(FAMILIES):
        if _load(other).name == family.name:
            raise ConfigError(f"cannot register {module}: its family is called {family.name!r}, like the family of "
                              f"{other}; give it another name.")
    FAMILIES.append(module)


def _load(module: str) -> ModelFamily:
    if module not in _loaded:
        package = importlib.import_module(module)  # family packages import no third-party package themselves
        declared = getattr(package, "FAMILY", None)
        if not isinstance(declared, ModelFamily):
            raise ConfigError(f"{module} is registered as a model family but defines no FAMILY = ModelFamily(...); "
                              f"got {type(declared).__name__}.")
        _loaded[module] = declared
    return _loaded[module]


def families() -> Iterator[ModelFamily]:
    """The registered families in registry order, each imported when reached."""
    for module in list(FAMILIES):
        yield _load(module)


def get_family(name: str) -> ModelFamily:
    """The family called ``name``.

    Raises:
        ConfigError: no registered family has this name.
    """
    for family in families():
        if family.name == name:
            return family
    raise ConfigError(f"No model family {name!r}; registered: {', '.join(f.name for f in families())}.")


def family_of(model: object) -> tuple[ModelFamily, VQAdapter] | None:
    """The first family (in registry order) with an adapter for ``model``, and that adapter; None if none has."""
    for family in families():
        adapter = family.handles(model)
        if adapter is not None:
            return family, adapter
    return None


def cli_models() -> dict[str, tuple[ModelFamily, CliModel]]:
    """Every ``--model`` choice of the command line, with its family."""
    choices: dict[str, tuple[ModelFamily, CliModel]] = {}
    for family in families():
        for name, entry in family.cli_models.items():
            if name in choices:
                raise ConfigError(f"--model {name} is declared by both {choices[name][0].name} and {family.name}.")
            choices[name] = (family, entry)
    return choices


def cli_commands() -> dict[str, str]:
    """The families' own sub-commands: name -> module path."""
    commands: dict[str, str] = {}
    for family in families():
        commands.update(family.commands)
    return commands
