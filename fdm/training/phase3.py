"""Phase 3 of FDM training (Park & Jung, WACV 2025, sec. 3.3): FDM and the decoder (with its post-quant conv)
fine-tuned together, ``L = L_qe + L_rec``, against a patch discriminator on its own optimiser; the encoder
and the codebook stay frozen. Runs as one process or under ``torchrun`` / ``accelerate launch`` (DDP).

With masks (inpainting), the FDM input is the continuous feature ``z`` on known cells and its quantized
version ``z_q`` on hole cells, as in phase 2; mask-free, every cell is quantized (unconditional models).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from fdm.adapter import VQAdapter
from fdm.errors import CheckpointError, InputError
from fdm.images import image_grid
from fdm.io.decoder_weights import apply_decoder_state, decoder_state_dict
from fdm.losses import Phase3Loss
from fdm.masks import random_irregular_mask
from fdm.module import FDM
from fdm.precision import autocast, grad_scaler, load_scaler_state
from fdm.registry import find_adapter
from fdm.training.backbones import load_backbone
from fdm.training.checkpointing import (
    _capture_rng_state,
    _restore_rng_state,
    check_resumable,
    load_checkpoint,
    run_identity,
    save_checkpoint,
)
from fdm.training.discriminator import PatchDiscriminator
from fdm.training.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    derived_seed,
    init_distributed,
    make_sampler,
    wrap_ddp,
)
from fdm.training.feature_cache import encode_views
from fdm.training.monitoring import ImageMetrics, check_finite_losses
from fdm.training.phase3_config import RESUME_FIELDS, Phase3Config
from fdm.training.schedule import WarmupCosineLR, paper_optimizer
from fdm.validation import check_fdm_fits

__all__ = ["Phase3Config", "Phase3Trainer", "finetune"]

logger = logging.getLogger(__name__)


class _Generator(nn.Module):
    """The trainable part, FDM followed by the decoder modules, as one module (so one DDP wrapper covers it)."""

    def __init__(self, fdm_module: FDM, adapter: VQAdapter):
        super().__init__()
        self.fdm = fdm_module
        self.decoder = nn.ModuleDict(adapter.decoder_modules())
        self._adapter = adapter

    def forward(
        self, z_in: torch.Tensor, cell_mask: torch.Tensor | None, guide: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z_dq = self.fdm(z_in, cell_mask, check_binary=False)  # (B, C, h, w); the trainer's masks are binary by
        # construction (Phase3Trainer._masks): no check, no device sync
        return z_dq, self._adapter.decode(z_dq, **guide)  # (B, 3, H, W); guide: adapter.decode_guide(x, hole)


class Phase3Trainer:
    """Joint fine-tuning of an FDM and its base model's decoder.

    The FDM (a phase-2 result) and the model's decoder modules (``adapter.decoder_modules()``) are trained; the
    encoder and codebook stay frozen. The model is handled as :class:`~fdm.Dequantizer` handles it: by default
    the trainer fine-tunes a deep copy and your model keeps its decoder (weights, ``requires_grad`` and device);
    ``in_place=True`` fine-tunes your model's decoder itself (no second copy of the model in memory) and leaves
    the model frozen (``requires_grad`` off) in eval mode at the end of :meth:`train`. :meth:`train` returns a new :class:`~fdm.FDM` with
    ``finetuned_decoder=True`` carrying the decoder weights, and writes it with them to
    ``<output_dir>/fdm`` (``model.safetensors``, ``decoder.safetensors``, ``config.json``, ``README.md``).

    Args:
        model: the base VQ model (any model with a registered adapter).
        fdm_module: the FDM to fine-tune (phase 2's result; a phase-3 FDM continues with its own decoder).
        views: dataset of (3, H, W) training images in [-1, 1], H and W multiples of the model's factor
            (e.g. :class:`~fdm.training.ImageFolderViews`).
        config: the run's :class:`Phase3Config`.
        val_views: dataset of validation images (None: no validation).
        adapter: the model's adapter (found from the model's type when None); with the default copy of the
            model, an adapter of the same type is made for the copy.
        in_place: fine-tune ``model``'s own decoder instead of a copy's (see above).
        backbone: feature extractor for the perceptual and style terms; None loads VGG19 from
            ``config.vgg_weights`` or torchvision's cache and raises
            :class:`~fdm.training.backbones.VGG19WeightsMissing` if there is none (unless
            ``config.drop_vgg_terms``).

    Example:
        >>> views = ImageFolderViews("photos/train", crop_size=256)                         # doctest: +SKIP
        >>> config = Phase3Config(steps=20000, vgg_weights="vgg19-dcbac81d.pth")            # doctest: +SKIP
        >>> tuned = Phase3Trainer(vqgan, phase2_fdm, views, config).train()                 # doctest: +SKIP
        >>> deq = fdm.Dequantizer(vqgan, fdm.FDM.from_pretrained("fdm-phase3/fdm"))         # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        fdm_module: FDM,
        views: Dataset,
        config: Phase3Config,
        *,
        val_views: Dataset | None = None,
        adapter: VQAdapter | None = None,
        in_place: bool = False,
        backbone: nn.Module | None = None,
    ):
        self.config = cfg = config
        self.adapter = adapter if adapter is not None else find_adapter(model)
        if len(views) == 0:
            raise InputError("the training set is empty.")
        check_fdm_fits(fdm_module, self.adapter.channels, masked=cfg.hole_ratio is not None)
        if fdm_module.finetuned_decoder and fdm_module.decoder_state is None:
            raise CheckpointError("this FDM was fine-tuned with a decoder (finetuned_decoder=True) but carries no "
                                  "decoder weights; load it with FDM.from_pretrained.")
        if not in_place:
            model = copy.deepcopy(model)  # the caller's model keeps its own decoder (as with fdm.Dequantizer)
            self.adapter = type(self.adapter)(model)
        if fdm_module.finetuned_decoder:  # fine-tuning a phase-3 FDM further: its decoder goes in first
            apply_decoder_state(self.adapter, fdm_module.decoder_state, source="decoder of the phase-3 FDM given")
        self.ctx: DistContext = init_distributed(cfg.device if cfg.device is not None else self.adapter.device)
        self.device = self.ctx.device
        self.output_dir = Path(cfg.output_dir)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.generator = _Generator(fdm_module.to(self.device), self.adapter).requires_grad_(True)
        self.generator.decoder.requires_grad_(not cfg.freeze_decoder)
        self.generator.fdm.requires_grad_(not cfg.freeze_fdm)
        self._train_mode()
        self.views, self.val_views = views, val_views

        self.schedule = cfg.loss_schedule()
        if backbone is None and (self.schedule.uses("perceptual") or self.schedule.uses("style")):
            backbone = load_backbone(cfg.backbone, cfg.vgg_weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the same discriminator on every process
            disc = PatchDiscriminator(channels=cfg.disc_channels) if self.schedule.uses("adversarial") else None
        self.discriminator = disc.to(self.device).train() if disc is not None else None
        self.loss = Phase3Loss(self.schedule, backbone=backbone, discriminator=self.discriminator).to(self.device)

        self.net = wrap_ddp(self.generator, self.ctx)
        self.optimizer = paper_optimizer([p for p in self.generator.parameters() if p.requires_grad], cfg.lr)
        self.scheduler = WarmupCosineLR(self.optimizer, cfg.steps, cfg.warmup_steps, cfg.min_lr)
        self.scaler = grad_scaler(self.device, cfg.precision)  # enabled for fp16 only
        if self.discriminator is not None:
            self.disc_net = wrap_ddp(self.discriminator, self.ctx)
            self.disc_optimizer = paper_optimizer(self.discriminator.parameters(), cfg.disc_lr)
            disc_steps = max(1, cfg.steps - self.schedule.start_steps["adversarial"])
            self.disc_scheduler = WarmupCosineLR(self.disc_optimizer, disc_steps, cfg.disc_warmup_steps, cfg.min_lr)
            self.disc_scaler = grad_scaler(self.device, cfg.precision)
        self.step = 0
        self.seconds = 0.0  # wall time of train() calls in this process (a resumed run counts its own part)
        self._mask_generator = torch.Generator()
        self._metrics: ImageMetrics | None = None

    def _train_mode(self) -> None:
        """Training mode for the trained parts; a frozen decoder or FDM stays in eval mode."""
        self.generator.train()
        if self.config.freeze_decoder:
            self.generator.decoder.eval()
        if self.config.freeze_fdm:
            self.generator.fdm.eval()

    @property
    def checkpoint_dir(self) -> Path:
        """Folder of the resumable checkpoints (``<output_dir>/checkpoints``)."""
        return self.output_dir / "checkpoints"

    # --- data ------------------------------------------------------------------------------------------

    def _masks(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = batch.shape
        masks = [random_irregular_mask(h, w, self.config.hole_ratio, generator=generator) for _ in range(b)]
        return torch.stack(masks).to(self.device)  # (B, 1, H, W), 1 = hole

    @torch.no_grad()
    def _inputs(self, x: torch.Tensor, hole: torch.Tensor | None) -> dict[str, Any]:
        """Frozen encoder and codebook (:func:`fdm.pipeline.encode_latents`): FDM input ``z_in``, qe target ``z``,
        latent-cell mask and decoder guide of a batch (the holes come from :meth:`_masks`, binary by
        construction)."""
        lat = encode_views(self.adapter, x, hole)
        return {"z_in": lat.z_in.float(), "z": lat.z.float(), "cells": lat.cells, "guide": lat.guide}

    def _batches(self, sampler: DistributedSampler, steps_per_epoch: int) -> Iterator[torch.Tensor]:
        """Batches from the current step on; a resumed run continues mid-epoch in the same order."""
        bs = self.config.batch_size
        while True:
            epoch, position = divmod(self.step, steps_per_epoch)
            sampler.set_epoch(epoch)
            indices = list(sampler)[position * bs: steps_per_epoch * bs]
            yield from DataLoader(Subset(self.views, indices), batch_size=bs, drop_last=True,
                                  num_workers=self.config.num_workers)

    # --- one step --------------------------------------------------------------------------------------

    def _train_step(self, x: torch.Tensor) -> dict[str, float]:
        cfg, step = self.config, self.step
        x = x.to(self.device, non_blocking=True)
        hole = None
        if cfg.hole_ratio is not None:  # masks depend only on (seed, step, rank): nothing to carry on resume
            seed = derived_seed(cfg.seed, step, self.ctx.rank)
            hole = self._masks(x, self._mask_generator.manual_seed(seed))
        inp = self._inputs(x, hole)
        with autocast(self.device, cfg.precision):  # the losses cast to float32 before reducing (fdm.losses)
            z_dq, recon = self.net(inp["z_in"], inp["cells"], inp["guide"])
            total, terms = self.loss.generator(x, recon, step, hole=hole, z_dq=z_dq, z=inp["z"],
                                               cell_mask=inp["cells"])
        logs = {k: v.item() for k, v in terms.items()} | {"loss": total.item()}
        check_finite_losses(logs, step=step + 1)
        self._update(total, self.optimizer, self.scheduler, self.scaler, self.generator)
        if self.discriminator is not None and self.loss.discriminator_step_active(step):
            with autocast(self.device, cfg.precision):
                d_loss = self.loss.discriminator_loss(self.disc_net, x, recon)
            logs["discriminator"] = d_loss.item()
            check_finite_losses({"discriminator": logs["discriminator"]}, step=step + 1)
            self._update(d_loss, self.disc_optimizer, self.disc_scheduler, self.disc_scaler, self.discriminator)
        self.step += 1
        return logs

    def _update(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: WarmupCosineLR,
                scaler: torch.amp.GradScaler, module: nn.Module) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.config.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

    # --- validation and logs ---------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Reconstruct the first ``num_val_images`` validation images (fixed masks), write a PNG grid
        (masked input | reconstruction | original) to ``validation/step-*.png`` and return the metrics.

        Runs on rank 0 only (other processes return ``{}``).
        """
        if self.val_views is None or not self.ctx.is_main:
            return {}
        n = min(self.config.num_val_images, len(self.val_views))
        x = torch.stack([self.val_views[i] for i in range(n)]).to(self.device)  # (n, 3, H, W)
        hole = None
        if self.config.hole_ratio is not None:
            hole = self._masks(x, torch.Generator().manual_seed(self.config.seed))
        inp = self._inputs(x, hole)
        self.generator.eval()
        try:
            recon = self.generator(inp["z_in"], inp["cells"], inp["guide"])[1].float()
        finally:
            self._train_mode()
        if self._metrics is None:
            self._metrics = ImageMetrics(lpips=self.config.extra_metrics, fid=self.config.fid, device=self.device)
        metrics = self._metrics(recon, x)
        shown = x if hole is None else x * (1 - hole)  # holes shown mid-grey
        grid = self.output_dir / "validation" / f"step-{self.step:08d}.png"
        grid.parent.mkdir(parents=True, exist_ok=True)
        image_grid(list(zip(shown, recon, x)), ["input", "reconstruction", "target"]).save(grid)
        self._log({"step": self.step, "split": "val", **metrics})
        return metrics

    def _log(self, record: dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        logger.info("step %d %s: %s", record["step"], record["split"],
                    "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("step", "split")))

    # --- checkpoints -----------------------------------------------------------------------------------

    def _modules(self) -> dict[str, nn.Module]:
        modules = {"fdm": self.generator.fdm, "decoder": self.generator.decoder}
        if self.discriminator is not None:
            modules["discriminator"] = self.discriminator
        return modules

    def _stateful(self) -> dict[str, Any]:
        objects = {"optimizer": self.optimizer, "scheduler": self.scheduler}
        if self.discriminator is not None:
            objects |= {"disc_optimizer": self.disc_optimizer, "disc_scheduler": self.disc_scheduler}
        return objects

    def _scalers(self) -> dict[str, torch.amp.GradScaler]:
        scalers = {"scaler": self.scaler}
        if self.discriminator is not None:
            scalers["disc_scaler"] = self.disc_scaler
        return scalers

    def save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint of the current step (rank 0; every process waits for it)."""
        ranks = all_gather_objects({"rng": _capture_rng_state()}, self.ctx)  # each process's RNG states
        path = None
        if self.ctx.is_main:
            state = {name: obj.state_dict() for name, obj in (self._stateful() | self._scalers()).items()}
            state |= {"phase": 3, "config": self.config.to_dict(), "world_size": self.ctx.world_size, "ranks": ranks,
                      "data": self._data_identity()}
            path = save_checkpoint(self.checkpoint_dir, self.step, self._modules(), state,
                                   keep=self.config.keep_checkpoints)
        barrier(self.ctx)
        return path

    def resume(self, path: str | Path) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` of a run with the same config.

        ``precision`` may differ from the saved run's (e.g. a run moved to another device): the fp16 loss scale is
        restored where both runs use fp16 and starts afresh otherwise.

        Raises:
            CheckpointError: not a phase-3 checkpoint, another config, data, base model or process count, or
                weights that do not fit.
        """
        state = load_checkpoint(path, self._modules(), map_location=self.device)
        check_resumable(path, state, phase=3, config=self.config.to_dict(), fields=RESUME_FIELDS,
                        identity=self._data_identity(), world_size=self.ctx.world_size)
        for name, obj in self._stateful().items():
            obj.load_state_dict(state[name])
        for name, scaler in self._scalers().items():  # the precision may differ from the saved run's
            load_scaler_state(scaler, state.get(name))
        _restore_rng_state(state["ranks"][self.ctx.rank]["rng"])
        self.step = int(state["step"])

    def _data_identity(self) -> dict[str, str | None]:
        """The run's :func:`~fdm.training.checkpointing.run_identity`: its training and validation views and the
        base model's codebook."""
        return run_identity(self.adapter.fingerprint(), views=self.views, val=self.val_views)

    # --- the result ------------------------------------------------------------------------------------

    def result(self) -> FDM:
        """A copy of the FDM (CPU, eval) with ``finetuned_decoder=True`` carrying the current decoder weights, or,
        with ``freeze_decoder``, a plain FDM for the unchanged decoder."""
        source = self.generator.fdm
        config = {**source.config, "finetuned_decoder": not self.config.freeze_decoder}
        config["base_model_fingerprint"] = config["base_model_fingerprint"] or self.adapter.fingerprint()
        cfg = self.config
        config["training"] = {**source.training_info, "phase3": {
            "steps": self.step, "batch_size": cfg.batch_size, "world_size": self.ctx.world_size,
            "hole_ratio": list(cfg.hole_ratio) if cfg.hole_ratio is not None else None, "lr": cfg.lr,
            "warmup_steps": cfg.warmup_steps, "seed": cfg.seed, "freeze_decoder": cfg.freeze_decoder,
            "freeze_fdm": cfg.freeze_fdm, "backbone": cfg.backbone, "precision": cfg.precision,
            "seconds": round(self.seconds, 1),
            **self.schedule.to_dict()}}
        result = FDM(**config)
        result.load_state_dict(source.state_dict())
        if not cfg.freeze_decoder:
            result.decoder_state = decoder_state_dict(self.adapter)
        return result.cpu().eval()

    # --- the loop --------------------------------------------------------------------------------------

    def train(self, resume_from: str | Path | None = None, *, until: int | None = None) -> FDM:
        """Run (or resume) the fine-tuning and save the result to ``<output_dir>/fdm``.

        Args:
            resume_from: a checkpoint folder of an earlier run with the same config (see
                :func:`~fdm.training.checkpointing.latest_checkpoint`); the run continues exactly where it
                stopped.
            until: stop after this step with a checkpoint instead of running to ``config.steps`` (for jobs
                with a time limit; resume later). Nothing is written to ``<output_dir>/fdm`` then.

        Returns:
            The fine-tuned FDM with its decoder weights (see :meth:`result`).
        """
        cfg = self.config
        started = time.perf_counter()
        if resume_from is not None:
            self.resume(resume_from)
        stop = cfg.steps if until is None else min(until, cfg.steps)
        sampler = make_sampler(len(self.views), self.ctx, seed=cfg.seed)
        steps_per_epoch = len(sampler) // cfg.batch_size
        if steps_per_epoch == 0:
            raise InputError(f"{len(self.views)} training images give less than one batch of {cfg.batch_size} "
                             f"per process ({self.ctx.world_size} processes).")
        if self.step == 0:
            self.validate()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="FDM phase 3", unit="step",
                   disable=not (cfg.progress and self.ctx.is_main))
        running: dict[str, list[float]] = {}
        batches = self._batches(sampler, steps_per_epoch)
        while self.step < stop:
            logs = self._train_step(next(batches))
            for k, v in logs.items():
                running.setdefault(k, []).append(v)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            last = self.step == stop
            if (cfg.log_every and self.step % cfg.log_every == 0) or last:
                means = {k: all_reduce_mean(torch.tensor(float(np.mean(v)), device=self.device), self.ctx).item()
                         for k, v in sorted(running.items())}
                self._log({"step": self.step, "split": "train", "lr": self.scheduler.get_last_lr()[0], **means})
                running = {}
            if (cfg.val_every and self.step % cfg.val_every == 0) or (last and self.step == cfg.steps):
                self.validate()
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last:
                self.save_checkpoint()
        bar.close()
        self.seconds += time.perf_counter() - started
        result = self.result()
        if self.step == cfg.steps:
            self.model.requires_grad_(False).eval()  # done: the model (yours, with in_place) is left frozen
            if self.ctx.is_main:
                result.save_pretrained(self.output_dir / "fdm")
                logger.info("saved the fine-tuned FDM%s to %s", "" if cfg.freeze_decoder else " and its decoder",
                            self.output_dir / "fdm")
        barrier(self.ctx)
        return result


def finetune(
    model: nn.Module,
    fdm_module: FDM,
    views: Dataset,
    config: Phase3Config,
    *,
    resume_from: str | Path | None = None,
    **kwargs: Any,
) -> FDM:
    """Shortcut for ``Phase3Trainer(model, fdm_module, views, config, **kwargs).train(resume_from)``."""
    return Phase3Trainer(model, fdm_module, views, config, **kwargs).train(resume_from)
