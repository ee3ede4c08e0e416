"""argparse ``type=`` functions for counts, rates and fractions: out-of-range values are argument errors (one
line, exit code 2, see :class:`fdm.cli.ArgumentParser`) instead of failures deep inside a run."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["device", "fraction", "held_out_fraction", "int_at_least", "non_negative_float", "non_negative_int", "positive_float", "positive_int",
           "unit_interval"]


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer option that must be ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {value}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def _float(text: str, check: Callable[[float], bool], expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
    if not math.isfinite(value) or not check(value):
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, temperatures)."""
    return _float(text, lambda v: v > 0, "a number > 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (loss weights, gradient-clipping norms where 0 = off)."""
    return _float(text, lambda v: v >= 0, "a number >= 0")


def fraction(text: str) -> float:
    """A number in [0, 1] (hole-area ratios)."""
    return _float(text, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def held_out_fraction(text: str) -> float:
    """A number in [0, 1) (the part of the images held out)."""
    return _float(text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def unit_interval(text: str) -> float:
    """A number in (0, 1] (nucleus-sampling thresholds)."""
    return _float(text, lambda v: 0 < v <= 1, "a number in (0, 1]")


def device(text: str) -> str:
    """A torch device that this machine has: ``cpu``, ``cuda``, ``cuda:1``, ``mps``..."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1; got {text!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU that torch {torch.__version__} can "
                                         "use; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                                         f"numbered from 0")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no Apple GPU (MPS) that torch can use; use "
                                         "--device cpu")
    return text
