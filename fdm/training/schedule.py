"""The paper's optimiser and learning-rate schedule (FDM, WACV 2025, sec. 4.1; hyudsl/FDM configs):
Adam with betas (0, 0.9), linear warm-up to 2e-4, then cosine decay to 1e-6.

:class:`WarmupCosineLR` counts steps (phase 3); :class:`RunBudget` and :class:`ProgressLR` follow a run's progress
through its step count or its wall-time budget, whichever ends it first (phase 2, ``fdm train --minutes``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "PAPER_BETAS",
    "PAPER_LR",
    "PAPER_MIN_LR",
    "PAPER_WARMUP_STEPS",
    "ProgressLR",
    "RunBudget",
    "WarmupCosineLR",
    "loop_seconds",
    "paper_optimizer",
]

logger = logging.getLogger(__name__)

PAPER_LR = 2e-4
"""Peak learning rate reached at the end of the warm-up."""
PAPER_MIN_LR = 1e-6
"""Learning rate at the end of the cosine decay."""
PAPER_BETAS = (0.0, 0.9)
"""Adam betas of the official configs."""
FUSED_DEVICES = ("cpu", "cuda")
"""Devices whose parameters :func:`paper_optimizer` updates with fused Adam."""
PAPER_WARMUP_STEPS = 300
"""Warm-up length of the official Paris StreetView config (its Places config uses 5000)."""


def paper_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    lr: float = PAPER_LR,
    betas: tuple[float, float] = PAPER_BETAS,
) -> torch.optim.Adam:
    """Adam with the paper's betas; ``lr`` is the peak rate that :class:`WarmupCosineLR` warms up to.

    The update runs as one fused kernel when every parameter is a CPU or CUDA float tensor: the same update up
    to rounding, in a fraction of the time of Adam's per-tensor loop, which costs a small FDM's step on a CPU
    a noticeable share of its time.
    """
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in tensors)
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=fused or None)


class WarmupCosineLR(LRScheduler):
    """Linear warm-up from 0 to each group's initial lr, then cosine decay to ``min_lr``.

    Call :meth:`step` after every optimizer step. The rate used for optimizer step ``s`` (0-based) is
    ``peak * (s + 1) / warmup_steps`` during the warm-up and
    ``min_lr + (peak - min_lr) * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps))) / 2``
    after it. Its ``state_dict`` holds only numbers, so it round-trips through the restricted reader of training checkpoints.

    Args:
        optimizer: the optimizer; its groups' ``lr`` are the peak rates.
        total_steps: number of optimizer steps of the whole run.
        warmup_steps: length of the linear warm-up (0 for none).
        min_lr: final learning rate.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = PAPER_WARMUP_STEPS,
        min_lr: float = PAPER_MIN_LR,
        last_epoch: int = -1,
    ):
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0; got {total_steps} and {warmup_steps}.")
        if warmup_steps >= total_steps:
            logger.warning("warm-up (%d steps) is not shorter than the run (%d steps): the peak rate is reached "
                           "only at the end and there is no cosine decay", warmup_steps, total_steps)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int, peak: float) -> float:
        """Learning rate for optimizer step ``step`` (0-based) of a group whose peak rate is ``peak``."""
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        return _cosine(peak, self.min_lr, (step - self.warmup_steps) / span)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch, peak) for peak in self.base_lrs]


def _cosine(peak: float, min_lr: float, progress: float) -> float:
    """Cosine decay from ``peak`` (progress 0) to ``min_lr`` (progress 1 and beyond)."""
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


@dataclass(frozen=True)
class RunBudget:
    """How long a run lasts: a number of optimizer steps, a wall-clock time, or both (whichever ends first).

    Attributes:
        steps: optimizer steps (None: no step limit).
        seconds: seconds of training (None: no time limit).
    """

    steps: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.steps is None and self.seconds is None:
            raise ValueError("a run budget needs steps, seconds or both; got neither.")
        if (self.steps is not None and self.steps < 1) or (self.seconds is not None and not self.seconds > 0):
            raise ValueError(f"budget steps must be >= 1 and seconds > 0; got {self.steps} and {self.seconds}.")

    def progress(self, steps_done: int, elapsed: float) -> float:
        """Fraction of the budget used after ``steps_done`` steps and ``elapsed`` seconds, in [0, 1]."""
        used = max(steps_done / self.steps if self.steps is not None else 0.0,
                   elapsed / self.seconds if self.seconds is not None else 0.0)
        return min(1.0, used)


def loop_seconds(minutes: float, spent: float) -> float:
    """The training loop's share of a ``minutes`` budget: what is left after the ``spent`` seconds of preparation
    (the feature cache), at least a tenth of the budget (a warning says so)."""
    budget = minutes * 60.0
    if spent > 0.9 * budget:
        logger.warning("preparing the run took %.1f min of the %g-minute budget: training for %.1f min (a tenth of "
                       "it) anyway", spent / 60, minutes, budget / 600)
    return max(budget - spent, budget / 10)


class ProgressLR:
    """Linear warm-up from 0 over the first ``warmup`` fraction of a run, then cosine decay to ``min_lr`` at its
    end, as a function of the run's progress (:meth:`RunBudget.progress`): a run limited by time decays on time.

    Call :meth:`step` before every optimizer step with the progress the run will have reached after it. Nothing
    needs saving for a resume: the rates follow from the progress alone.

    Args:
        optimizer: the optimizer; each group's ``lr`` when this is created is its peak rate.
        warmup: fraction of the run spent warming up, in [0, 1).
        min_lr: final learning rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: float, min_lr: float = PAPER_MIN_LR):
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1); got {warmup}.")
        self.optimizer = optimizer
        self.warmup = warmup
        self.min_lr = min_lr
        self.peaks = [group["lr"] for group in optimizer.param_groups]

    def lr_at(self, progress: float, peak: float) -> float:
        """Learning rate at ``progress`` (in [0, 1]) for a group whose peak rate is ``peak``."""
        if progress < self.warmup:
            return peak * progress / self.warmup
        return _cosine(peak, self.min_lr, (progress - self.warmup) / (1.0 - self.warmup))

    def step(self, progress: float) -> None:
        """Set every group's rate for the step that brings the run to ``progress``."""
        for group, peak in zip(self.optimizer.param_groups, self.peaks):
            group["lr"] = self.lr_at(progress, peak)

    @property
    def last_lr(self) -> float:
        """The first group's current rate."""
        return self.optimizer.param_groups[0]["lr"]
