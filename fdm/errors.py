"""Exceptions raised by fdm-vq; all subclass ValueError so callers may catch input errors broadly."""

__all__ = ["CheckpointError", "FingerprintMismatchError", "InputError"]


class InputError(ValueError):
    """A tensor, mask or image does not have the shape, range or dtype a function expects."""


class CheckpointError(ValueError):
    """A weight file is unreadable, truncated, or does not fit the module it is loaded into."""


class FingerprintMismatchError(ValueError):
    """An FDM was trained for another base model (codebook or channel count differ)."""
