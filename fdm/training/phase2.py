"""Phase-2 training of FDM with the paper's sampler-free quantization-error loss (Park & Jung, WACV 2025,
sec. 3.3): the encoder and codebook are frozen; the FDM input is the continuous feature ``z`` on known
cells and its quantized version ``z_q`` on generated cells; the target is ``(z - z_q) * m``; the loss is L1.

The loss is :func:`fdm.losses.qe_loss` of ``FDM(x, m)`` and ``z`` with ``x = keep_known(z, z_q, m)``: on known
cells ``FDM(x, m) = z`` exactly, on generated cells ``FDM(x, m) - z = F([x, m]) - (z - z_q)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from fdm.adapter import VQAdapter, find_adapter
from fdm.errors import CheckpointError, InputError
from fdm.losses.qe import qe_loss
from fdm.masks import DEFAULT_HOLE_RATIO, keep_known, latent_mask, random_irregular_mask
from fdm.module import FDM
from fdm.precision import autocast, check_precision, grad_scaler, load_scaler_state
from fdm.training.checkpointing import load_checkpoint, save_checkpoint
from fdm.training.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    derived_seed,
    init_distributed,
    unwrap,
    wrap_ddp,
)
from fdm.training.feature_cache import CACHE_DTYPES, CACHE_MODES, FeatureCache, ShardedBatches
from fdm.training.holdout import HeldOutCheck, HeldOutResult
from fdm.training.monitoring import check_finite_losses
from fdm.training.recipe import RECIPE_LR, WARMUP_FRACTION, fdm_width
from fdm.training.schedule import PAPER_BETAS, PAPER_MIN_LR, ProgressLR, RunBudget, paper_optimizer
from fdm.validation import check_fdm_fits

__all__ = ["Phase2Config", "Phase2Trainer", "train_phase2"]

logger = logging.getLogger(__name__)

# config fields that must not change when a run is resumed (they shape the data order, masks or schedule)
_RESUME_FIELDS = ("steps", "epochs", "minutes", "batch_size", "lr", "warmup_steps", "min_lr", "betas", "hole_ratio",
                  "seed", "cache_shards", "checks", "patience")


@dataclass
class Phase2Config:
    """Settings of a phase-2 run; every field is JSON-able (:meth:`to_dict` / :meth:`from_dict`).

    Defaults follow the recipe of :mod:`fdm.training.recipe` (measured in docs/training.md), not the paper's
    week-long schedule: a trunk at least 64 wide, peak rate 1e-3, warm-up over the first 5 % of the run.

    Attributes:
        steps: number of optimizer steps; give this or ``epochs``, or ``minutes``, or ``minutes`` and one of them.
        epochs: number of passes over the views (per process).
        minutes: wall-time budget of the whole run (feature cache included): training stops when it is spent
            (or at ``steps`` / ``epochs``, whichever comes first), and the learning rate decays on time.
        batch_size: views per optimizer step and process (the effective batch is ``batch_size * world_size``).
        lr: peak learning rate after the warm-up (recipe: 1e-3; paper: 2e-4).
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
    batch_size: int = 16
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
        if (self.steps or self.epochs or 1) < 1 or self.batch_size < 1:
            raise InputError(f"steps/epochs and batch_size must be >= 1; got {self.steps or self.epochs} and "
                             f"{self.batch_size}.")
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


class Phase2Trainer:
    """Train an FDM for a frozen VQ model on a dataset of training views.

    Args:
        model: the base VQ model (any model with a registered adapter); put in eval mode, never updated.
        views: dataset of (3, S, S) views in [-1, 1], e.g. :class:`~fdm.training.ImageFolderViews`.
        config: the run's :class:`Phase2Config`.
        fdm_module: the FDM to train, in place; by default a new one with the model's channel count, one mask
            channel (none when ``config.hole_ratio`` is None), ``config.hidden_channels`` (default
            :func:`~fdm.training.recipe.fdm_width`) and ``config.num_blocks``, initialised from ``config.seed``.
            Its ``base_model_fingerprint`` is set to the model's.
        adapter: the model's adapter; chosen from the model's type when None.
        heldout_views: views of images kept out of training (:func:`~fdm.training.split_heldout`): checked
            ``config.checks`` times per run (:class:`~fdm.training.HeldOutCheck`), which reports whether the FDM
            beats plain VQ, keeps the best weights (``config.keep_best``) and stops early (``config.patience``).

    After :meth:`train`, ``history`` holds one dict per epoch (``epoch``, ``seconds``, ``loss``),
    ``checks`` one dict per held-out check (``step``, ``progress`` and :class:`~fdm.training.HeldOutResult`'s
    numbers), ``heldout_result`` the numbers of the saved FDM, and ``cache_fill_seconds`` the time spent computing
    cached features.

    Example:
        >>> views = ImageFolderViews("photos/train", crop_size=256)                      # doctest: +SKIP
        >>> config = Phase2Config(minutes=10, output_dir="fdm-vqgan")                    # doctest: +SKIP
        >>> fdm_module = Phase2Trainer(vqgan, views, config).train()                     # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        views: Dataset,
        config: Phase2Config,
        *,
        fdm_module: FDM | None = None,
        adapter: VQAdapter | None = None,
        heldout_views: Dataset | None = None,
    ):
        self.adapter = adapter if adapter is not None else find_adapter(model)
        self.model = model
        self.views = views
        self.config = config
        if len(views) == 0:
            raise InputError("the training set is empty.")
        if fdm_module is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                width = config.hidden_channels or fdm_width(self.adapter.channels)
                fdm_module = FDM(self.adapter.channels, mask_channels=0 if config.hole_ratio is None else 1,
                                 hidden_channels=width, num_blocks=config.num_blocks)
        check_fdm_fits(fdm_module, self.adapter.channels, masked=config.hole_ratio is not None)
        fdm_module.base_model_fingerprint = self.adapter.fingerprint()
        self.fdm = fdm_module
        self.heldout_views = heldout_views
        self.step = 0
        self.train_seconds = 0.0  # time spent in the training loop (held-out checks included), over resumes
        self.loop_seconds: float | None = None  # the loop's time budget (runs with minutes), kept over resumes
        self.history: list[dict[str, float]] = []
        self.checks: list[dict[str, float]] = []
        self.heldout_result: HeldOutResult | None = None  # the saved FDM's check
        self.heldout_step: int | None = None  # ... and its step
        self._best: dict[str, Any] | None = None  # {"step", "check": index in self.checks, "weights"}
        self.cache_fill_seconds = 0.0
        self.final_loss: float | None = None
        self.scaler = grad_scaler(config.device or self.adapter.device, config.precision)  # enabled for fp16 only

    @property
    def checkpoint_dir(self) -> Path:
        """Folder of the resumable checkpoints (``<output_dir>/checkpoints``)."""
        return Path(self.config.output_dir) / "checkpoints"

    def train(self, resume_from: str | Path | None = None) -> FDM:
        """Run (or resume) the training and save the FDM to ``config.output_dir``.

        Args:
            resume_from: a checkpoint folder written by an earlier run with the same config (see
                :func:`~fdm.training.latest_checkpoint`); the run continues exactly where it stopped (a run with a
                time budget continues with the time it had left).

        Returns:
            The trained FDM (eval mode), with ``base_model_fingerprint`` and ``training`` filled in.
        """
        cfg = self.config
        started = time.perf_counter()
        ctx = init_distributed(cfg.device if cfg.device is not None else self.adapter.device)
        device = ctx.device
        self.model.to(device).eval()
        self.fdm.to(device).train()
        net = wrap_ddp(self.fdm, ctx)
        optimizer = paper_optimizer(self.fdm.parameters(), cfg.lr, cfg.betas)
        cache = FeatureCache(self.adapter, self.views, mode=cfg.cache,
                             cache_dir=cfg.cache_dir or Path(cfg.output_dir) / "feature-cache",
                             dtype=cfg.cache_dtype, num_shards=cfg.cache_shards, batch_size=cfg.batch_size,
                             num_workers=cfg.num_workers, device=device, ctx=ctx, progress=cfg.progress)
        batches = ShardedBatches(cache.shards, cfg.batch_size, ctx, seed=cfg.seed)
        steps_per_epoch = batches.steps_per_epoch
        total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch if cfg.epochs else None
        warmup = cfg.warmup_steps / total if cfg.warmup_steps is not None else WARMUP_FRACTION
        schedule = ProgressLR(optimizer, min(warmup, 0.99), cfg.min_lr)  # before a resume overwrites the group rates
        recent: deque[float] = deque(maxlen=max(1, cfg.log_every))  # losses of the last steps (final_loss)
        if resume_from is not None:
            recent.extend(self._resume(resume_from, ctx, optimizer))
        check = None if self.heldout_views is None else HeldOutCheck(
            self.model, self.adapter, self.heldout_views, hole_ratio=cfg.hole_ratio, seed=cfg.seed,
            batch_size=cfg.batch_size, precision=cfg.precision)
        cache.prepare()
        self.cache_fill_seconds = cache.fill_seconds
        budget = RunBudget(total, self._loop_seconds(time.perf_counter() - started))

        loop_start = time.perf_counter() - self.train_seconds
        progress = self._progress(budget, self.step, loop_start, ctx)
        bar = tqdm(total=100, initial=round(100 * progress), desc="FDM phase 2", unit="%",
                   disable=not (cfg.progress and ctx.is_main))
        epoch, epoch_losses, epoch_start = -1, [], time.perf_counter()
        stop = False
        while progress < 1.0 and not stop:
            current, position = divmod(self.step, steps_per_epoch)
            if current != epoch:
                epoch, epoch_losses, epoch_start = current, [], time.perf_counter()
            schedule.step(self._progress(budget, self.step + 1, loop_start, ctx))
            loss = self._train_step(net, cache, batches.batch(self.step), optimizer)
            self.step += 1
            recent.append(loss)
            epoch_losses.append(loss)
            before, progress = progress, self._progress(budget, self.step, loop_start, ctx)
            bar.update(round(100 * progress) - round(100 * before))
            bar.set_postfix(step=self.step, loss=f"{loss:.4f}", lr=f"{schedule.last_lr:.2e}")
            if self.step % cfg.log_every == 0 and ctx.is_main:
                logger.info("step %d (%.0f %%)  loss %.5f  lr %.3e", self.step, 100 * progress, np.mean(recent),
                            schedule.last_lr)
            if position == steps_per_epoch - 1 or progress >= 1.0:
                self._end_epoch(epoch, epoch_losses, time.perf_counter() - epoch_start, ctx)
            if check is not None and (progress >= 1.0 or math.floor(progress * cfg.checks) > len(self.checks)):
                stop = self._check(check, progress, ctx)
            self.train_seconds = time.perf_counter() - loop_start
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._save_checkpoint(ctx, optimizer, list(recent), budget)
                if check is not None and ctx.is_main:
                    logger.info("%s at checkpoint %d: %s", check.describe(), self.step,
                                check.measure(unwrap(self.fdm), decode=True).describe())
        bar.close()
        if check is not None and (not self.checks or self.checks[-1]["step"] != self.step):
            self._check(check, progress, ctx)  # stopped early, or resumed at the end: measure the last weights
        self.final_loss = float(all_reduce_mean(torch.tensor(np.mean(recent) if recent else float("nan")), ctx))
        self._keep_best(check, ctx)
        return self._finish(ctx, seconds=time.perf_counter() - started)

    def _loop_seconds(self, spent: float) -> float | None:
        """The training loop's time budget: ``minutes`` less what the run spent before the loop (feature cache),
        at least a tenth of ``minutes``; a resumed run keeps the budget it started with."""
        if self.config.minutes is None:
            return None
        if self.loop_seconds is not None:  # resumed
            return self.loop_seconds
        budget = self.config.minutes * 60.0
        if spent > 0.9 * budget:
            logger.warning("preparing the run took %.1f min of the %.1f-minute budget: training for %.1f min (a tenth "
                           "of it) anyway", spent / 60, self.config.minutes, budget / 600)
        self.loop_seconds = max(budget - spent, budget / 10)
        return self.loop_seconds

    @staticmethod
    def _progress(budget: RunBudget, steps_done: int, loop_start: float, ctx: DistContext) -> float:
        """The run's progress, the same on every process (a time budget runs on each process's clock)."""
        progress = budget.progress(steps_done, time.perf_counter() - loop_start)
        if budget.seconds is None:
            return progress
        return float(all_reduce_mean(torch.tensor(progress, dtype=torch.float64), ctx))

    # --- one step ---------------------------------------------------------------------------------------

    def _train_step(self, net: nn.Module, cache: FeatureCache, indices: list[int], optimizer) -> float:
        z, z_q = cache.get(indices)  # (B, C, h, w) each
        if self.config.hole_ratio is None:
            cells, x = None, z_q  # every cell generated
        else:
            cells = self._cell_masks(indices, z.shape[-2:]).to(z.device)  # (B, 1, h, w), 1 = generated
            x = keep_known(z, z_q, cells)
        with autocast(z.device, self.config.precision):
            z_dq = net(x, cells, check_binary=False)  # float32: z_q + a residual computed at the run's precision;
            # cells come from _cell_masks, binary by construction: no check, no device sync
        loss = qe_loss(z_dq, z, cells)  # = L1(F([x, m]) * m, (z - z_q) * m), in float32
        value = loss.item()
        check_finite_losses({"qe loss": value}, step=self.step + 1)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
        self.scaler.update()
        return value

    def _cell_masks(self, indices: list[int], size: tuple[int, int]) -> torch.Tensor:
        """(B, 1, h, w) cell masks of this step's views: view ``i``'s hole mask at step ``t`` is drawn from
        ``(seed, t, i)`` alone, so it is the same whichever process trains on the view."""
        f = self.adapter.factor
        holes = []
        for index in indices:
            seed = derived_seed(self.config.seed, self.step, index)
            holes.append(random_irregular_mask(size[0] * f, size[1] * f, self.config.hole_ratio,
                                               generator=torch.Generator().manual_seed(seed)))
        return latent_mask(torch.stack(holes), f, check_binary=False)  # binary by construction: no device sync

    def _end_epoch(self, epoch: int, losses: list[float], seconds: float, ctx: DistContext) -> None:
        mean = float(all_reduce_mean(torch.tensor(float(np.mean(losses))), ctx))
        self.history.append({"epoch": epoch + 1, "seconds": seconds, "loss": mean})
        if ctx.is_main:
            logger.info("epoch %d done in %.1f s, mean loss %.5f", epoch + 1, seconds, mean)

    # --- held-out checks ----------------------------------------------------------------------------------

    def _check(self, check: HeldOutCheck, progress: float, ctx: DistContext) -> bool:
        """Measure the current weights on the held-out views, keep them if they are the best so far; returns
        whether to stop early (``patience`` checks in a row without a better feature error ratio)."""
        result = check.measure(unwrap(self.fdm))
        self.checks.append({"step": self.step, "progress": round(progress, 4), **result.to_dict()})
        best = None if self._best is None else self.checks[self._best["check"]]
        if best is None or result.feature_ratio < best["feature_ratio"]:
            weights = {k: v.detach().clone() for k, v in unwrap(self.fdm).state_dict().items()}
            self._best = {"check": len(self.checks) - 1, "weights": weights}
        if ctx.is_main:
            logger.info("%s at step %d: %s", check.describe(), self.step, result.describe())
        patience = self.config.patience
        stale = len(self.checks) - 1 - self._best["check"]
        if patience is not None and stale >= patience and progress < 1.0:
            if ctx.is_main:
                logger.info("stopping early at step %d (%.0f %% of the run): no better held-out feature error ratio "
                            "in the last %d checks", self.step, 100 * progress, patience)
            return True
        return False

    def _keep_best(self, check: HeldOutCheck | None, ctx: DistContext) -> None:
        """Load the best checked weights when they beat the last ones (``keep_best``), and measure what is kept,
        PSNR included (``heldout_result``, ``heldout_step``)."""
        if check is None:
            return
        kept = self.checks[self._best["check"]] if self.config.keep_best else self.checks[-1]
        if kept is not self.checks[-1]:
            unwrap(self.fdm).load_state_dict(self._best["weights"])
            if ctx.is_main:
                logger.info("kept the weights of step %d, the best held-out check (feature error ratio %.3f; the last "
                            "step's: %.3f)", kept["step"], kept["feature_ratio"], self.checks[-1]["feature_ratio"])
        self.heldout_result = check.measure(unwrap(self.fdm), decode=True)
        self.heldout_step = kept["step"]

    # --- checkpoints --------------------------------------------------------------------------------------

    def _save_checkpoint(self, ctx: DistContext, optimizer, recent: list[float], budget: RunBudget) -> None:
        # per-process state: the losses each process saw (the data order and masks follow from the step)
        ranks = all_gather_objects({"recent_losses": recent}, ctx)
        if ctx.is_main:
            state = {
                "phase": 2,
                "config": self.config.to_dict(),
                "world_size": ctx.world_size,
                "optimizer": optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ranks": ranks,
                "history": self.history,
                "train_seconds": self.train_seconds,
                "loop_seconds": budget.seconds,
                "checks": self.checks,
                "best": self._best,
            }
            save_checkpoint(self.checkpoint_dir, self.step, {"fdm": self.fdm}, state, keep=self.config.keep_checkpoints)
        barrier(ctx)

    def _resume(self, path: str | Path, ctx: DistContext, optimizer) -> list[float]:
        """Load a checkpoint into the FDM and optimizer; returns the recent losses."""
        state = load_checkpoint(path, {"fdm": self.fdm})
        if state.get("phase") != 2:
            raise CheckpointError(f"{path} is not a phase-2 checkpoint (phase {state.get('phase')}).")
        saved, now = state["config"], self.config.to_dict()
        changed = {k: (saved.get(k), now[k]) for k in _RESUME_FIELDS if saved.get(k) != now[k]}
        if changed:
            raise CheckpointError(f"cannot resume {path} with a different config: {changed} (saved, now).")
        if state["world_size"] != ctx.world_size:
            raise CheckpointError(f"{path} was written by {state['world_size']} processes; resume it with as many "
                                  f"(got {ctx.world_size}).")
        optimizer.load_state_dict(state["optimizer"])
        load_scaler_state(self.scaler, state.get("scaler"))
        self.history = list(state["history"])
        self.train_seconds = float(state["train_seconds"])
        self.loop_seconds = state["loop_seconds"]
        self.checks = list(state["checks"])
        self._best = state["best"]
        self.step = state["step"]
        return list(state["ranks"][ctx.rank]["recent_losses"])

    # --- the result ---------------------------------------------------------------------------------------

    def _finish(self, ctx: DistContext, seconds: float) -> FDM:
        module = unwrap(self.fdm).eval()
        if self.config.base_model is not None:
            module.base_model = self.config.base_model
        source = getattr(self.views, "source", None)
        root = getattr(source, "root", None)  # a folder: its name only (no local path in a published config)
        module.training_info = {
            "phase": 2,
            "steps": self.step,
            "minutes": self.config.minutes,
            "batch_size": self.config.batch_size,
            "world_size": ctx.world_size,
            "hole_ratio": list(self.config.hole_ratio) if self.config.hole_ratio is not None else None,
            "data": (Path(root).name if root is not None else source.describe() if source is not None
                     else type(self.views).__name__),
            "views": len(self.views),
            "crop_size": getattr(self.views, "crop_size", None),
            "lr": self.config.lr,
            "warmup_steps": self.config.warmup_steps,
            "seed": self.config.seed,
            "precision": self.config.precision,
            "cache_dtype": self.config.cache_dtype if self.config.cache != "none" else None,
            "final_loss": self.final_loss,
            "seconds": round(seconds, 1),
        }
        if self.heldout_result is not None:
            module.training_info["heldout"] = {
                "images": len(self.heldout_views) // self.heldout_views.views_per_image,
                "setting": "reconstruction" if self.config.hole_ratio is None else "oracle inpainting",
                "step": self.heldout_step,
                **{k: round(v, 4) for k, v in self.heldout_result.to_dict().items()},
            }
        if ctx.is_main:
            module.save_pretrained(self.config.output_dir, config=module.config)
            logger.info("saved the FDM to %s (final loss %.5f)", self.config.output_dir, self.final_loss)
        barrier(ctx)
        return module


def train_phase2(
    model: nn.Module,
    views: Dataset,
    config: Phase2Config,
    *,
    fdm_module: FDM | None = None,
    adapter: VQAdapter | None = None,
    heldout_views: Dataset | None = None,
    resume_from: str | Path | None = None,
) -> FDM:
    """Shortcut for ``Phase2Trainer(model, views, config, ...).train(resume_from)``; returns the trained FDM."""
    trainer = Phase2Trainer(model, views, config, fdm_module=fdm_module, adapter=adapter, heldout_views=heldout_views)
    return trainer.train(resume_from)
