"""Settings of a phase-2 run (:class:`Phase2Config`): every field JSON-able, recorded in checkpoints and compared
on resume."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from fdm.errors import InputError
from fdm.masks import DEFAULT_HOLE_RATIO
from fdm.precision import check_precision
from fdm.training.feature_cache import CACHE_DTYPES, CACHE_MODES
from fdm.training.recipe import RECIPE_BATCH, RECIPE_LR, WARMUP_FRACTION
from fdm.training.schedule import PAPER_BETAS, PAPER_MIN_LR

__all__ = ["RESUME_FIELDS", "Phase2Config"]

#: Config fields that must not change when a run is resumed (they shape the data order, masks or schedule).
RESUME_FIELDS = ("steps", "epochs", "minutes", "batch_size", "lr", "warmup_steps", "min_lr", "betas", "hole_ratio",
                  "seed", "cache_shards", "checks", "patience")


@dataclass
class Phase2Config:
    """Settings of a phase-2 run; every field is JSON-able (:meth:`to_dict` / :meth:`from_dict`).

    Defaults follow the recipe of :mod:`fdm.training.recipe` (measured in docs/training.md), not the paper's
    week-long schedule: a trunk at least 32 wide, batches of 8, peak rate 2e-3, warm-up over the first 5 % of
    the run.

    Attributes:
        steps: number of optimizer steps; give this or ``epochs``, or ``minutes``, or ``minutes`` and one of them.
        epochs: number of passes over the views (per process).
        minutes: wall-time budget of the whole run (feature cache included): training stops when it is spent
            (or at ``steps`` / ``epochs``, whichever comes first), and the learning rate decays on time.
        batch_size: views per optimizer step and process (the effective batch is ``batch_size * world_size``).
        lr: peak learning rate after the warm-up (recipe: 2e-3; paper: 2e-4).
        warmup_steps: linear warm-up length in steps (needs ``steps`` or ``epochs``); None (default) warms up
            over the first :data:`~fdm.training.recipe.WARMUP_FRACTION` of the run, however it is limited.
        min_lr: learning rate at the end of the cosine decay (paper: 1e-6).
        betas: Adam betas (paper: (0, 0.9)).
        hole_ratio: (low, high) hole-area range of the random irregular masks drawn at every step (the
            official recipe by default); None trains mask-free, every cell generated (unconditional and
            class-conditional models).
        cache: ``"memory"``, ``"disk"`` or ``"none"`` (re-encode every step; see :class:`FeatureCache`).
        cache_dir: folder of the disk cache (``cache="disk"``); default ``<output_dir>/feature-cache``.
        cache_dtype: storage type of the cached ``z``: ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``
            (``z_q`` is never stored: it is looked up from the cached code indices).
        cache_shards: number of cache shards (None: one per process); each process encodes and reads its own
            shards, and the global batches are the same for any number of processes that divides it.
        num_workers: data-loading worker processes while the cache is filled.
        seed: seeds the FDM initialisation, the data order and the masks.
        device: ``"cpu"``, ``"cuda"``...; None keeps the base model's device. Under torchrun, ``"cuda"``
            means ``cuda:LOCAL_RANK``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :mod:`fdm.precision`): the FDM's forward pass under
            autocast, the qe loss in float32, fp16 with gradient scaling; the weights stay float32.
        progress: show tqdm progress bars.
        log_every: log the mean loss every this many steps.
        checkpoint_every: save a resumable checkpoint every this many steps (0: never).
        keep_checkpoints: number of most recent checkpoints kept (None: all).
        output_dir: where checkpoints and the final FDM (``save_pretrained`` layout) are written.
        hidden_channels: trunk width of the FDM the trainer creates when none is given (default:
            :func:`~fdm.training.recipe.fdm_width` of the model's channel count).
        num_blocks: residual blocks of that FDM (paper: 8).
        base_model: free-text name of the base model, recorded in the saved FDM's config.
        checks: held-out checks per run, evenly spaced over its progress (with held-out views only).
        patience: stop early after this many checks in a row without a better held-out feature error ratio
            (None: never).
        keep_best: save the FDM of the best held-out check rather than the last one.
    """

    steps: int | None = None
    epochs: int | None = None
    minutes: float | None = None
    batch_size: int = RECIPE_BATCH
    lr: float = RECIPE_LR
    warmup_steps: int | None = None
    min_lr: float = PAPER_MIN_LR
    betas: tuple[float, float] = PAPER_BETAS
    hole_ratio: tuple[float, float] | None = DEFAULT_HOLE_RATIO
    cache: str = "memory"
    cache_dir: str | None = None
    cache_dtype: str = "float16"
    cache_shards: int | None = None
    num_workers: int = 0
    seed: int = 0
    device: str | None = None
    precision: str = "fp32"
    progress: bool = True
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int | None = 2
    output_dir: str = "fdm-phase2"
    hidden_channels: int | None = None
    num_blocks: int = 8
    base_model: str | None = None
    checks: int = 10
    patience: int | None = 3
    keep_best: bool = True

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise InputError(f"give steps or epochs, not both; got steps={self.steps}, epochs={self.epochs}.")
        if self.steps is None and self.epochs is None and self.minutes is None:
            raise InputError("give the run's length: steps, epochs or minutes (or minutes with one of the others).")
        if any(n is not None and n < 1 for n in (self.steps, self.epochs)) or self.batch_size < 1:
            raise InputError(f"steps/epochs and batch_size must be >= 1; got steps={self.steps}, epochs={self.epochs}, "
                             f"batch_size={self.batch_size}.")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise InputError(f"minutes must be a positive number; got {self.minutes}.")
        if self.warmup_steps is not None and (self.warmup_steps < 0 or (self.steps is None and self.epochs is None)):
            raise InputError(f"warmup_steps needs a step count (steps or epochs) and must be >= 0; got "
                             f"{self.warmup_steps} (leave it None to warm up over the first "
                             f"{WARMUP_FRACTION:.0%} of the run).")
        if self.checks < 1 or (self.patience is not None and self.patience < 1):
            raise InputError(f"checks and patience must be >= 1 (patience None: never stop early); got "
                             f"{self.checks} and {self.patience}.")
        if self.cache not in CACHE_MODES:
            raise InputError(f"cache must be one of {CACHE_MODES}; got {self.cache!r}.")
        check_precision(self.precision)
        if self.cache_dtype not in CACHE_DTYPES:
            raise InputError(f"cache_dtype must be one of {CACHE_DTYPES}; got {self.cache_dtype!r}.")
        if self.cache_shards is not None and self.cache_shards < 1:
            raise InputError(f"cache_shards must be >= 1 or None; got {self.cache_shards}.")
        self.betas = tuple(self.betas)
        if self.hole_ratio is not None:
            self.hole_ratio = tuple(self.hole_ratio)
            lo, hi = self.hole_ratio
            if not 0.0 <= lo <= hi <= 1.0:
                raise InputError(f"hole_ratio must satisfy 0 <= low <= high <= 1; got {self.hole_ratio}.")
        self.output_dir = str(self.output_dir)
        self.cache_dir = None if self.cache_dir is None else str(self.cache_dir)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Phase2Config:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown Phase2Config fields {unknown}; known: {sorted(names)}.")
        return cls(**data)
