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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fdm.adapter import VQAdapter
from fdm.errors import InputError
from fdm.io.hub import WEIGHTS_NAME
from fdm.losses.qe import qe_loss
from fdm.masks import CellMaskBank, keep_known
from fdm.module import FDM
from fdm.precision import autocast, grad_scaler
from fdm.registry import find_adapter
from fdm.training.checkpointing import run_identity
from fdm.training.distributed import all_reduce_mean, barrier, unwrap, wrap_ddp
from fdm.training.feature_cache import FeatureCache
from fdm.training.holdout import MIN_IMPROVEMENT, HeldOutCheck, HeldOutRecord, HeldOutResult
from fdm.training.loop import TrainingLoop, optimizer_step
from fdm.training.monitoring import check_finite_losses
from fdm.training.phase2_config import RESUME_FIELDS, Phase2Config
from fdm.training.recipe import WARMUP_FRACTION, fdm_width
from fdm.training.schedule import ProgressLR, RunBudget, loop_seconds, paper_optimizer
from fdm.training.shards import ShardedBatches
from fdm.training.sources.base import ImageSubset
from fdm.validation import check_fdm_fits

__all__ = ["Phase2Config", "Phase2Trainer", "train_phase2"]

logger = logging.getLogger(__name__)

class Phase2Trainer(TrainingLoop):
    """Train an FDM for a frozen VQ model on a dataset of training views.

    The step loop, its records (``<output_dir>/metrics.jsonl``), checkpoints and resume are
    :class:`~fdm.training.loop.TrainingLoop`'s.

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
    numbers), ``heldout_result`` the numbers of the saved FDM, ``final_loss`` the mean loss of the last record and
    ``cache_fill_seconds`` the time spent computing cached features.

    Example:
        >>> views = ImageFolderViews("photos/train", crop_size=256)                      # doctest: +SKIP
        >>> config = Phase2Config(minutes=10, output_dir="fdm-vqgan")                    # doctest: +SKIP
        >>> fdm_module = Phase2Trainer(vqgan, views, config).train()                     # doctest: +SKIP
    """

    phase = 2
    resume_fields = RESUME_FIELDS
    results = (WEIGHTS_NAME, "config.json")

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
        if len(views) == 0:
            raise InputError("the training set is empty.")
        if fdm_module is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                width = config.hidden_channels or fdm_width(self.adapter.channels)
                fdm_module = FDM(self.adapter.channels, mask_channels=0 if config.hole_ratio is None else 1,
                                 hidden_channels=width, num_blocks=config.num_blocks)
        check_fdm_fits(fdm_module, self.adapter.channels, masked=config.hole_ratio is not None)
        super().__init__(config, self.adapter.device)
        cfg = config
        fdm_module.base_model_fingerprint = self.adapter.fingerprint()
        self.model = model.to(self.device).eval()
        self.fdm = fdm_module.to(self.device).train()
        self.views = views
        self.heldout_views = heldout_views
        self.net = wrap_ddp(self.fdm, self.ctx)
        self.optimizer = paper_optimizer(self.fdm.parameters(), cfg.lr, cfg.betas)
        self.scaler = grad_scaler(self.device, cfg.precision)  # enabled for fp16 only
        self.cache = FeatureCache(self.adapter, views, mode=cfg.cache,
                                  cache_dir=cfg.cache_dir or self.output_dir / "feature-cache",
                                  dtype=cfg.cache_dtype, num_shards=cfg.cache_shards, batch_size=cfg.batch_size,
                                  num_workers=cfg.num_workers, device=self.device, ctx=self.ctx, progress=cfg.progress)
        self.batches = ShardedBatches(self.cache.shards, cfg.batch_size, self.ctx, seed=cfg.seed)
        spe = self.batches.steps_per_epoch
        self.total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * spe if cfg.epochs else None
        warmup = cfg.warmup_steps / self.total_steps if cfg.warmup_steps is not None else WARMUP_FRACTION
        self.lr_schedule = ProgressLR(self.optimizer, min(warmup, 0.99), cfg.min_lr)  # peaks read before any resume
        self.loop_seconds: float | None = None  # the loop's time budget (runs with minutes), kept over resumes
        self.history: list[dict[str, float]] = []
        self.heldout = HeldOutRecord(config.patience)  # checks and best weights (with held-out views)
        self.heldout_result: HeldOutResult | None = None  # the saved FDM's check
        self.heldout_step: int | None = None  # ... and its step
        self.heldout_images: int | None = None  # ... and the number of held-out images it measured
        self.check: HeldOutCheck | None = None
        self.cache_fill_seconds = 0.0
        self.final_loss: float | None = None
        self._mask_bank: CellMaskBank | None = None  # drawn at the first masked step, from config.seed
        self._epoch_losses: list[float] = []  # losses of the current epoch's steps run by this call
        self._epoch_start = 0.0

    def prepare(self) -> RunBudget:
        """Set up the held-out check, fill the feature cache, and fix the loop's time budget (a resumed run keeps
        the one it started with)."""
        cfg = self.config
        started = time.perf_counter()
        self.check = None if self.heldout_views is None else HeldOutCheck(
            self.model, self.adapter, self.heldout_views, hole_ratio=cfg.hole_ratio, seed=cfg.seed,
            batch_size=cfg.batch_size)  # in float32 whatever the run's precision: a measurement, and cheap
        self.cache.prepare()
        self.cache_fill_seconds = self.cache.fill_seconds
        if cfg.minutes is not None and self.loop_seconds is None:
            self.loop_seconds = loop_seconds(cfg.minutes, spent=time.perf_counter() - started)
        self._epoch_losses, self._epoch_start = [], time.perf_counter()
        return RunBudget(self.total_steps, self.loop_seconds)

    # --- one step ---------------------------------------------------------------------------------------

    def train_step(self, progress: float) -> dict[str, float]:
        self.lr_schedule.step(progress)
        indices = self.batches.batch(self.step)
        z, z_q = self.cache.get(indices)  # (B, C, h, w) each
        if self.config.hole_ratio is None:
            cells, x = None, z_q  # every cell generated
        else:
            cells = self._cell_masks(indices, z.shape[-2:]).to(z.device)  # (B, 1, h, w), 1 = generated
            x = keep_known(z, z_q, cells)
        with autocast(z.device, self.config.precision):
            z_dq = self.net(x, cells, check_binary=False)  # float32: z_q + a residual computed at the run's
            # precision; cells come from _cell_masks, binary by construction: no check, no device sync
        loss = qe_loss(z_dq, z, cells)  # = L1(F([x, m]) * m, (z - z_q) * m), in float32
        value = loss.item()
        check_finite_losses({"qe loss": value}, step=self.step + 1)
        optimizer_step(loss, self.optimizer, self.scaler)
        self._epoch_losses.append(value)
        return {"loss": value}

    def learning_rate(self) -> float:
        return self.lr_schedule.last_lr

    def _cell_masks(self, indices: list[int], size: tuple[int, int]) -> torch.Tensor:
        """(B, 1, h, w) cell masks of this step's views: view ``i``'s mask is picked from the run's mask bank by
        :meth:`step_seed` of ``i``, so it is the same whichever process trains on the view."""
        if self._mask_bank is None or tuple(self._mask_bank.cells.shape[-2:]) != tuple(size):
            self._mask_bank = CellMaskBank(size, self.adapter.factor, self.config.hole_ratio, seed=self.config.seed)
        return torch.stack([self._mask_bank.pick(self.step_seed(index)) for index in indices])

    def after_step(self, progress: float) -> bool:
        """Close an epoch at its last step; run a held-out check when one is due (returns whether to stop)."""
        epoch, position = divmod(self.step - 1, self.batches.steps_per_epoch)
        if position == self.batches.steps_per_epoch - 1 or progress >= 1.0:
            self._end_epoch(epoch)
        due = progress >= 1.0 or math.floor(progress * self.config.checks) > len(self.heldout.checks)
        return self.check is not None and due and self._check(progress)

    def _end_epoch(self, epoch: int) -> None:
        seconds = time.perf_counter() - self._epoch_start
        mean = float(all_reduce_mean(torch.tensor(float(np.mean(self._epoch_losses))), self.ctx))
        self.history.append({"epoch": epoch + 1, "seconds": seconds, "loss": mean})
        if self.ctx.is_main:
            logger.info("epoch %d done in %.1f s, mean loss %.5f", epoch + 1, seconds, mean)
        self._epoch_losses, self._epoch_start = [], time.perf_counter()

    # --- held-out checks ----------------------------------------------------------------------------------

    def _check(self, progress: float) -> bool:
        """Measure the current weights on the held-out views (kept if the best so far) and record the result
        (``"split": "heldout"``); returns whether to stop."""
        result = self.check.measure(unwrap(self.fdm))
        ratio = float(all_reduce_mean(torch.tensor(result.feature_ratio, dtype=torch.float64), self.ctx))
        result = dataclasses.replace(result, feature_ratio=ratio)  # every process decides on the same number
        stop = self.heldout.add(unwrap(self.fdm), result, self.step, progress)
        self.log_record({"step": self.step, "split": "heldout", **result.to_dict()},
                        f"{self.check.describe()} at step {self.step}: {result.describe()}")
        if stop and self.ctx.is_main:
            logger.info("stopping early at step %d (%.0f %% of the run): the held-out feature error ratio has not "
                        "improved by %g in the last %d checks", self.step, 100 * progress, MIN_IMPROVEMENT,
                        self.config.patience)
        return stop

    def _keep_best(self) -> None:
        """Load the best checked weights when they beat the last ones (``keep_best``), and measure what is kept,
        PSNR included (``heldout_result``, ``heldout_step``)."""
        kept = self.heldout.keep(unwrap(self.fdm), best=self.config.keep_best)
        last = self.heldout.checks[-1]
        if kept is not last and self.ctx.is_main:
            logger.info("kept the weights of step %d, the best held-out check (feature error ratio %.3f; the last "
                        "step's: %.3f)", kept["step"], kept["feature_ratio"], last["feature_ratio"])
        self.heldout_result = self.check.measure(unwrap(self.fdm), decode=True)
        self.heldout_step = kept["step"]
        self.heldout_images = self.check.images

    # --- checkpoints --------------------------------------------------------------------------------------

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"fdm": unwrap(self.fdm)}

    def checkpoint_objects(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer}

    def gradient_scalers(self) -> dict[str, torch.amp.GradScaler]:
        return {"scaler": self.scaler}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"history": self.history, "loop_seconds": self.loop_seconds, "checks": self.heldout.checks,
                "best": self.heldout.best}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.loop_seconds = state["loop_seconds"]
        self.heldout.checks = list(state["checks"])
        self.heldout.best = state["best"]

    def save_checkpoint(self) -> Path | None:
        """:meth:`TrainingLoop.save_checkpoint`, then (with held-out views) the held-out PSNR of its weights in the
        log."""
        path = super().save_checkpoint()
        if self.check is not None and self.ctx.is_main:
            logger.info("%s at checkpoint %d: %s", self.check.describe(), self.step,
                        self.check.measure(unwrap(self.fdm), decode=True).describe())
        return path

    def run_identity(self) -> dict[str, Any]:
        """The training and held-out views and the base model's codebook
        (:func:`~fdm.training.checkpointing.run_identity`)."""
        return run_identity(self.fdm.base_model_fingerprint, views=self.views, heldout=self.heldout_views)

    # --- the result ---------------------------------------------------------------------------------------

    def finish(self, complete: bool) -> FDM:
        """The trained FDM (eval mode), with the best held-out check's weights (``keep_best``) and its training
        record, saved to ``output_dir``; the FDM as it is, unsaved, when the run stopped at ``until``."""
        module = unwrap(self.fdm)
        if not complete:
            return module
        if self.check is not None:
            if not self.heldout.checks or self.heldout.checks[-1]["step"] != self.step:
                self._check(1.0)  # resumed at the end: measure the last weights
            self._keep_best()
        self.final_loss = self.last_record["loss"] if self.last_record is not None else None
        module.eval()
        if self.config.base_model is not None:
            module.base_model = self.config.base_model
        module.training_info = {"phase": 2, **self.training_record(), **self._data_record(),
                                "minutes": self.config.minutes,
                                "cache_dtype": self.config.cache_dtype if self.config.cache != "none" else None,
                                "final_loss": self.final_loss}
        if self.heldout_result is not None:
            module.training_info["heldout"] = {
                "images": self.heldout_images,
                "setting": "reconstruction" if self.config.hole_ratio is None else "oracle inpainting",
                "step": self.heldout_step,
                **{k: round(v, 4) for k, v in self.heldout_result.to_dict().items()},
            }
        if self.ctx.is_main:
            module.save_pretrained(self.config.output_dir, config=module.config)
            logger.info("saved the FDM to %s (final loss %.5f)", self.config.output_dir, self.final_loss)
        barrier(self.ctx)
        return module

    def _data_record(self) -> dict[str, Any]:
        """The training data as the saved record names it: a folder by its name only (no local path in a
        published config), another source by its description; the number of views and their crop size."""
        source = getattr(self.views, "source", None)
        while isinstance(source, ImageSubset):  # the training part of a held-out split: name the whole source
            source = source.source
        root = getattr(source, "root", None)
        data = (Path(root).name if root is not None else source.describe() if source is not None
                else type(self.views).__name__)
        return {"data": data, "views": len(self.views), "crop_size": getattr(self.views, "crop_size", None)}


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
