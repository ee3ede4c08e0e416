"""The paper's optimiser and learning-rate schedule (FDM, WACV 2025, sec. 4.1; hyudsl/FDM configs):
Adam with betas (0, 0.9), linear warm-up to 2e-4, then cosine decay to 1e-6.

Shared by the phase-2 and phase-3 trainers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["PAPER_BETAS", "PAPER_LR", "PAPER_MIN_LR", "PAPER_WARMUP_STEPS", "WarmupCosineLR", "paper_optimizer"]

logger = logging.getLogger(__name__)

PAPER_LR = 2e-4
"""Peak learning rate reached at the end of the warm-up."""
PAPER_MIN_LR = 1e-6
"""Learning rate at the end of the cosine decay."""
PAPER_BETAS = (0.0, 0.9)
"""Adam betas of the official configs."""
PAPER_WARMUP_STEPS = 300
"""Warm-up length of the official Paris StreetView config (its Places config uses 5000)."""


def paper_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    lr: float = PAPER_LR,
    betas: tuple[float, float] = PAPER_BETAS,
) -> torch.optim.Adam:
    """Adam with the paper's betas; ``lr`` is the peak rate that :class:`WarmupCosineLR` warms up to."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas))


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
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch, peak) for peak in self.base_lrs]
