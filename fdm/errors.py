"""Exceptions raised by fdm-vq for problems the user can fix: bad input, files, options or downloads.

Hierarchy (every class is an :class:`FdmError`; the built-in bases are kept for callers that caught them
before the base class existed)::

    FdmError                                    base: the ``fdm`` command prints these as one line, exit code 2
    ├── InputError(ValueError)                  a tensor, mask or image of the wrong shape, range or dtype;
    │                                           an image or mask file that cannot be read
    ├── ConfigError(ValueError)                 a YAML / JSON config file that does not parse (names the file
    │                                           and line) or does not hold what is expected
    ├── UsageError(ValueError)                  command-line options that are missing, out of range or do not
    │                                           go together; an --out folder that cannot be created
    ├── CheckpointError(ValueError)             a weight file that is unreadable, truncated, or does not fit
    │                                           the module (names the keys as the file spells them)
    ├── FingerprintMismatchError(ValueError)    an FDM trained for another base model
    ├── TrainingError(ValueError)               training cannot go on (a loss or feature became NaN/Inf)
    ├── MissingExtraError(ImportError)          an optional dependency is not installed (names the extra)
    └── HubError(FileNotFoundError)             a Hugging Face Hub repo, revision or file cannot be had: not
        │                                       found, gated, or offline mode without a cached copy
        └── HubEntryNotFoundError(CheckpointError)   the repo exists but has no such file

Hub errors of ``huggingface_hub`` are converted in one place, :func:`fdm.io.hub.convert_hub_error`.
Anything else that escapes the library (``TypeError``, ``RuntimeError``, a plain ``ValueError``...) is a bug,
and the ``fdm`` command shows its traceback.
"""

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FdmError",
    "FingerprintMismatchError",
    "HubEntryNotFoundError",
    "HubError",
    "InputError",
    "MissingExtraError",
    "TrainingError",
    "UsageError",
]


class FdmError(Exception):
    """Base of every error fdm-vq raises for a problem the user can fix (see the module docstring)."""


class InputError(FdmError, ValueError):
    """A tensor, mask or image does not have the shape, range or dtype a function expects, or an image or mask
    file cannot be read."""


class ConfigError(FdmError, ValueError):
    """A configuration file (YAML, JSON) does not parse, or does not hold what is expected."""


class UsageError(FdmError, ValueError):
    """Command-line options are missing, out of range or do not go together, or an output folder cannot be made."""


class CheckpointError(FdmError, ValueError):
    """A weight file is unreadable, truncated, or does not fit the module it is loaded into."""


class FingerprintMismatchError(FdmError, ValueError):
    """An FDM was trained for another base model (codebook or channel count differ)."""


class TrainingError(FdmError, ValueError):
    """Training cannot go on: a loss or a feature became NaN/Inf (nothing is saved)."""


class MissingExtraError(FdmError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install ".[extra]"`` to run."""


class HubError(FdmError, FileNotFoundError):
    """A Hugging Face Hub repo, revision or file cannot be had: it does not exist, is gated or private, or offline
    mode (``HF_HUB_OFFLINE=1``) is on and the huggingface_hub cache has no copy."""


class HubEntryNotFoundError(HubError, CheckpointError):
    """The Hub repo (at that revision) exists but has no such file."""
