"""Phase-2 training of FDM with the paper's sampler-free quantization-error loss (Park & Jung, WACV 2025,
sec. 3.3): the encoder and codebook are frozen; the FDM input is the continuous feature ``z`` on known
cells and its quantized version ``z_q`` on generated cells; the target is ``(z - z_q) * m``; the loss is L1.

The loss is :func:`fdm.losses.qe_loss` of ``FDM(x, m)`` and ``z`` with ``x = keep_known(z, z_q, m)``: on known
cells ``FDM(x, m) = z`` exactly, on generated cells ``FDM(x, m) - z = F([x, m]) - (z - z_q)``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from fdm.adapter import VQAdapter
from fdm.errors import InputError
from fdm.losses.qe import qe_loss
from fdm.masks import CellMaskBank, keep_known
from fdm.module import FDM
from fdm.precision import autocast, grad_scaler, load_scaler_state
from fdm.registry import find_adapter
from fdm.training.checkpointing import check_resumable, load_checkpoint, run_identity, save_checkpoint
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
from fdm.training.feature_cache import FeatureCache
from fdm.training.holdout import MIN_IMPROVEMENT, HeldOutCheck, HeldOutRecord, HeldOutResult
from fdm.training.monitoring import check_finite_losses
from fdm.training.phase2_config import RESUME_FIELDS, Phase2Config
from fdm.training.recipe import WARMUP_FRACTION, fdm_width
from fdm.training.schedule import ProgressLR, RunBudget, loop_seconds, paper_optimizer
from fdm.training.shards import ShardedBatches
from fdm.training.sources.base import ImageSubset
from fdm.validation import check_fdm_fits

__all__ = ["Phase2Config", "Phase2Trainer", "train_phase2"]

logger = logging.getLogger(__name__)

class Phase2Trainer:
    """Train an FDM for a frozen VQ model on a dataset of training views.

    Args:
        model: the base VQ model (any model with a registered adapter); moved to the run's device and put in eval
            mode, its weights never updated.
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
    ``heldout.checks`` one dict per held-out check (``step``, ``progress`` and :class:`~fdm.training.HeldOutResult`'s
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
        self.heldout = HeldOutRecord(config.patience)  # checks and best weights (with held-out views)
        self.heldout_result: HeldOutResult | None = None  # the saved FDM's check
        self.heldout_step: int | None = None  # ... and its step
        self.heldout_images: int | None = None  # ... and the number of held-out images it measured
        self.cache_fill_seconds = 0.0
        self.final_loss: float | None = None
        self._mask_bank: CellMaskBank | None = None  # drawn at the first masked step, from config.seed
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
            batch_size=cfg.batch_size)  # in float32 whatever the run's precision: a measurement, and cheap
        cache.prepare()
        self.cache_fill_seconds = cache.fill_seconds
        if cfg.minutes is not None and self.loop_seconds is None:  # a resumed run keeps the budget it started with
            self.loop_seconds = loop_seconds(cfg.minutes, spent=time.perf_counter() - started)
        budget = RunBudget(total, self.loop_seconds)

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
            if check is not None and (progress >= 1.0 or math.floor(progress * cfg.checks) > len(self.heldout.checks)):
                stop = self._check(check, progress, ctx)
            self.train_seconds = time.perf_counter() - loop_start
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._save_checkpoint(ctx, optimizer, list(recent), budget)
                if check is not None and ctx.is_main:
                    logger.info("%s at checkpoint %d: %s", check.describe(), self.step,
                                check.measure(unwrap(self.fdm), decode=True).describe())
        bar.close()
        if check is not None and (not self.heldout.checks or self.heldout.checks[-1]["step"] != self.step):
            self._check(check, progress, ctx)  # stopped early, or resumed at the end: measure the last weights
        self.final_loss = float(all_reduce_mean(torch.tensor(np.mean(recent) if recent else float("nan")), ctx))
        self._keep_best(check, ctx)
        return self._finish(ctx, seconds=time.perf_counter() - started)

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
        """(B, 1, h, w) cell masks of this step's views: view ``i``'s mask at step ``t`` is picked from the run's
        mask bank by ``(seed, t, i)`` alone, so it is the same whichever process trains on the view."""
        if self._mask_bank is None or tuple(self._mask_bank.cells.shape[-2:]) != tuple(size):
            self._mask_bank = CellMaskBank(size, self.adapter.factor, self.config.hole_ratio, seed=self.config.seed)
        return torch.stack([self._mask_bank.pick(derived_seed(self.config.seed, self.step, index))
                            for index in indices])

    def _end_epoch(self, epoch: int, losses: list[float], seconds: float, ctx: DistContext) -> None:
        mean = float(all_reduce_mean(torch.tensor(float(np.mean(losses))), ctx))
        self.history.append({"epoch": epoch + 1, "seconds": seconds, "loss": mean})
        if ctx.is_main:
            logger.info("epoch %d done in %.1f s, mean loss %.5f", epoch + 1, seconds, mean)

    # --- held-out checks ----------------------------------------------------------------------------------

    def _check(self, check: HeldOutCheck, progress: float, ctx: DistContext) -> bool:
        """Measure the current weights on the held-out views (kept if the best so far); returns whether to stop."""
        result = check.measure(unwrap(self.fdm))
        ratio = float(all_reduce_mean(torch.tensor(result.feature_ratio, dtype=torch.float64), ctx))
        result = dataclasses.replace(result, feature_ratio=ratio)  # every process decides on the same number
        stop = self.heldout.add(unwrap(self.fdm), result, self.step, progress)
        if ctx.is_main:
            logger.info("%s at step %d: %s", check.describe(), self.step, result.describe())
            if stop:
                logger.info("stopping early at step %d (%.0f %% of the run): the held-out feature error ratio has not "
                            "improved by %g in the last %d checks", self.step, 100 * progress, MIN_IMPROVEMENT,
                            self.config.patience)
        return stop

    def _keep_best(self, check: HeldOutCheck | None, ctx: DistContext) -> None:
        """Load the best checked weights when they beat the last ones (``keep_best``), and measure what is kept,
        PSNR included (``heldout_result``, ``heldout_step``)."""
        if check is None:
            return
        kept = self.heldout.keep(unwrap(self.fdm), best=self.config.keep_best)
        last = self.heldout.checks[-1]
        if kept is not last and ctx.is_main:
            logger.info("kept the weights of step %d, the best held-out check (feature error ratio %.3f; the last "
                        "step's: %.3f)", kept["step"], kept["feature_ratio"], last["feature_ratio"])
        self.heldout_result = check.measure(unwrap(self.fdm), decode=True)
        self.heldout_step = kept["step"]
        self.heldout_images = check.images

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
                "data": self._data_identity(),
                "train_seconds": self.train_seconds,
                "loop_seconds": budget.seconds,
                "checks": self.heldout.checks,
                "best": self.heldout.best,
            }
            save_checkpoint(self.checkpoint_dir, self.step, {"fdm": self.fdm}, state, keep=self.config.keep_checkpoints)
        barrier(ctx)

    def _resume(self, path: str | Path, ctx: DistContext, optimizer) -> list[float]:
        """Load a checkpoint into the FDM and optimizer; returns the recent losses."""
        state = load_checkpoint(path, {"fdm": self.fdm})
        check_resumable(path, state, phase=2, config=self.config.to_dict(), fields=RESUME_FIELDS,
                        identity=self._data_identity(), world_size=ctx.world_size)
        optimizer.load_state_dict(state["optimizer"])
        load_scaler_state(self.scaler, state.get("scaler"))
        self.history = list(state["history"])
        self.train_seconds = float(state["train_seconds"])
        self.loop_seconds = state["loop_seconds"]
        self.heldout.checks = list(state["checks"])
        self.heldout.best = state["best"]
        self.step = state["step"]
        return list(state["ranks"][ctx.rank]["recent_losses"])

    def _data_identity(self) -> dict[str, str | None]:
        """The run's :func:`~fdm.training.checkpointing.run_identity`: its training and held-out views and the base
        model's codebook."""
        return run_identity(self.fdm.base_model_fingerprint, views=self.views, heldout=self.heldout_views)

    # --- the result ---------------------------------------------------------------------------------------

    def _finish(self, ctx: DistContext, seconds: float) -> FDM:
        module = unwrap(self.fdm).eval()
        if self.config.base_model is not None:
            module.base_model = self.config.base_model
        source = getattr(self.views, "source", None)
        while isinstance(source, ImageSubset):  # the training part of a held-out split: name the whole folder
            source = source.source
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
                "images": self.heldout_images,
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
