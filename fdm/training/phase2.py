"""Phase-2 training of FDM with the paper's sampler-free quantization-error loss (Park & Jung, WACV 2025,
sec. 3.3): the encoder and codebook are frozen; the FDM input is the continuous feature ``z`` on known
cells and its quantized version ``z_q`` on generated cells; the target is ``(z - z_q) * m``; the loss is L1.

The loss is :func:`fdm.losses.qe_loss` of ``FDM(x, m)`` and ``z`` with ``x = keep_known(z, z_q, m)``: on known
cells ``FDM(x, m) = z`` exactly, on generated cells ``FDM(x, m) - z = F([x, m]) - (z - z_q)``.
"""

from __future__ import annotations

import logging
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
from fdm.training.monitoring import check_finite_losses
from fdm.training.schedule import (
    PAPER_BETAS,
    PAPER_LR,
    PAPER_MIN_LR,
    PAPER_WARMUP_STEPS,
    WarmupCosineLR,
    paper_optimizer,
)
from fdm.validation import check_fdm_fits

__all__ = ["Phase2Config", "Phase2Trainer", "train_phase2"]

logger = logging.getLogger(__name__)

# config fields that must not change when a run is resumed (they shape the data order, masks or schedule)
_RESUME_FIELDS = ("steps", "epochs", "batch_size", "lr", "warmup_steps", "min_lr", "betas", "hole_ratio", "seed",
                  "cache_shards")


@dataclass
class Phase2Config:
    """Settings of a phase-2 run; every field is JSON-able (:meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        steps: number of optimizer steps; give this or ``epochs``.
        epochs: number of passes over the views (per process).
        batch_size: views per optimizer step and process (the effective batch is ``batch_size * world_size``).
        lr: peak learning rate after the warm-up (paper: 2e-4).
        warmup_steps: linear warm-up length (official Paris config: 300).
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
        hidden_channels: trunk width of the FDM the trainer creates when none is given (default: the
            model's channel count, as in the paper).
        num_blocks: residual blocks of that FDM (paper: 8).
        base_model: free-text name of the base model, recorded in the saved FDM's config.
    """

    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 16
    lr: float = PAPER_LR
    warmup_steps: int = PAPER_WARMUP_STEPS
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

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise InputError(f"give exactly one of steps and epochs; got steps={self.steps}, epochs={self.epochs}.")
        if (self.steps or self.epochs) < 1 or self.batch_size < 1:
            raise InputError(f"steps/epochs and batch_size must be >= 1; got {self.steps or self.epochs} and "
                             f"{self.batch_size}.")
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
        fdm_module: the FDM to train; by default a new one with the model's channel count, one mask
            channel (none when ``config.hole_ratio`` is None), ``config.hidden_channels`` and
            ``config.num_blocks``, initialised from ``config.seed``.
        adapter: the model's adapter; chosen from the model's type when None.

    After :meth:`train`, ``history`` holds one dict per epoch (``epoch``, ``seconds``, ``loss``) and
    ``cache_fill_seconds`` the time spent computing cached features.

    Example:
        >>> views = ImageFolderViews("photos/train", crop_size=256)                      # doctest: +SKIP
        >>> config = Phase2Config(epochs=10, batch_size=16, output_dir="fdm-vqgan")      # doctest: +SKIP
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
                fdm_module = FDM(self.adapter.channels, mask_channels=0 if config.hole_ratio is None else 1,
                                 hidden_channels=config.hidden_channels, num_blocks=config.num_blocks)
        check_fdm_fits(fdm_module, self.adapter.channels, masked=config.hole_ratio is not None)
        self.fdm = fdm_module
        self.step = 0
        self.history: list[dict[str, float]] = []
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
                :func:`~fdm.training.latest_checkpoint`); the run continues exactly where it stopped.

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
        total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
        scheduler = WarmupCosineLR(optimizer, total, cfg.warmup_steps, cfg.min_lr)
        recent: deque[float] = deque(maxlen=max(1, cfg.log_every))  # losses of the last steps (final_loss)
        if resume_from is not None:
            recent.extend(self._resume(resume_from, ctx, optimizer, scheduler))
        cache.prepare()
        self.cache_fill_seconds = cache.fill_seconds

        bar = tqdm(total=total, initial=self.step, desc="FDM phase 2", unit="step",
                   disable=not (cfg.progress and ctx.is_main))
        epoch, epoch_losses, epoch_start = -1, [], time.perf_counter()
        while self.step < total:
            current, position = divmod(self.step, steps_per_epoch)
            if current != epoch:
                epoch, epoch_losses, epoch_start = current, [], time.perf_counter()
            loss = self._train_step(net, cache, batches.batch(self.step), optimizer, scheduler)
            self.step += 1
            recent.append(loss)
            epoch_losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if self.step % cfg.log_every == 0 and ctx.is_main:
                logger.info("step %d/%d  loss %.5f  lr %.3e", self.step, total, np.mean(recent),
                            scheduler.get_last_lr()[0])
            if position == steps_per_epoch - 1 or self.step == total:
                self._end_epoch(epoch, epoch_losses, time.perf_counter() - epoch_start, ctx)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._save_checkpoint(ctx, optimizer, scheduler, list(recent))
        bar.close()
        self.final_loss = float(all_reduce_mean(torch.tensor(np.mean(recent) if recent else float("nan")), ctx))
        return self._finish(ctx, total, seconds=time.perf_counter() - started)

    # --- one step ---------------------------------------------------------------------------------------

    def _train_step(
        self,
        net: nn.Module,
        cache: FeatureCache,
        indices: list[int],
        optimizer: torch.optim.Optimizer,
        scheduler: WarmupCosineLR,
    ) -> float:
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
        scheduler.step()
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

    # --- checkpoints --------------------------------------------------------------------------------------

    def _save_checkpoint(self, ctx: DistContext, optimizer, scheduler, recent: list[float]) -> None:
        # per-process state: the losses each process saw (the data order and masks follow from the step)
        ranks = all_gather_objects({"recent_losses": recent}, ctx)
        if ctx.is_main:
            state = {
                "phase": 2,
                "config": self.config.to_dict(),
                "world_size": ctx.world_size,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "ranks": ranks,
                "history": self.history,
            }
            save_checkpoint(self.checkpoint_dir, self.step, {"fdm": self.fdm}, state, keep=self.config.keep_checkpoints)
        barrier(ctx)

    def _resume(self, path: str | Path, ctx: DistContext, optimizer, scheduler) -> list[float]:
        """Load a checkpoint into the FDM, optimizer and scheduler; returns the recent losses."""
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
        scheduler.load_state_dict(state["scheduler"])
        load_scaler_state(self.scaler, state.get("scaler"))
        self.history = list(state["history"])
        self.step = state["step"]
        return list(state["ranks"][ctx.rank]["recent_losses"])

    # --- the result ---------------------------------------------------------------------------------------

    def _finish(self, ctx: DistContext, total: int, seconds: float) -> FDM:
        module = unwrap(self.fdm).eval()
        module.base_model_fingerprint = self.adapter.fingerprint()
        if self.config.base_model is not None:
            module.base_model = self.config.base_model
        source = getattr(self.views, "source", None)
        root = getattr(source, "root", None)  # a folder: its name only (no local path in a published config)
        module.training_info = {
            "phase": 2,
            "steps": total,
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
    resume_from: str | Path | None = None,
) -> FDM:
    """Shortcut for ``Phase2Trainer(model, views, config, ...).train(resume_from)``; returns the trained FDM."""
    trainer = Phase2Trainer(model, views, config, fdm_module=fdm_module, adapter=adapter)
    return trainer.train(resume_from)
