"""Phase 3 of FDM training (Park & Jung, WACV 2025, sec. 3.3): FDM and the decoder (with its post-quant conv)
fine-tuned together, ``L = L_qe + L_rec``, against a patch discriminator on its own optimiser; the encoder
and the codebook stay frozen. Runs as one process or under ``torchrun`` / ``accelerate launch`` (DDP).

With masks (inpainting), the FDM input is the continuous feature ``z`` on known cells and its quantized
version ``z_q`` on hole cells, as in phase 2; mask-free, every cell is quantized (unconditional models).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from fdm.adapter import VQAdapter
from fdm.errors import CheckpointError, InputError
from fdm.images import image_grid
from fdm.io.decoder_weights import apply_decoder_state, decoder_state_dict
from fdm.losses import Phase3Loss
from fdm.masks import random_irregular_mask
from fdm.module import FDM
from fdm.precision import autocast, grad_scaler
from fdm.registry import find_adapter
from fdm.training.backbones import load_backbone
from fdm.training.checkpointing import run_identity
from fdm.training.data import load_batches
from fdm.training.discriminator import PatchDiscriminator
from fdm.training.distributed import barrier, make_sampler, wrap_ddp
from fdm.training.feature_cache import encode_views
from fdm.training.loop import TrainingLoop, optimizer_step
from fdm.training.monitoring import ImageMetrics, check_finite_losses
from fdm.training.phase3_config import RESUME_FIELDS, Phase3Config
from fdm.training.schedule import RunBudget, WarmupCosineLR, paper_optimizer
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


class Phase3Trainer(TrainingLoop):
    """Joint fine-tuning of an FDM and its base model's decoder.

    The FDM (a phase-2 result) and the model's decoder modules (``adapter.decoder_modules()``) are trained; the
    encoder and codebook stay frozen. The model is handled as :class:`~fdm.Dequantizer` handles it: by default
    the trainer fine-tunes a deep copy and your model keeps its decoder (weights, ``requires_grad`` and device);
    ``in_place=True`` fine-tunes your model's decoder itself (no second copy of the model in memory) and leaves
    the model frozen (``requires_grad`` off) in eval mode at the end of :meth:`train`. :meth:`train` returns a new :class:`~fdm.FDM` with
    ``finetuned_decoder=True`` carrying the decoder weights, and writes it with them to
    ``<output_dir>/fdm`` (``model.safetensors``, ``decoder.safetensors``, ``config.json``, ``README.md``). The step
    loop, its records (``<output_dir>/metrics.jsonl``), checkpoints and resume are
    :class:`~fdm.training.loop.TrainingLoop`'s.

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

    phase = 3
    resume_fields = RESUME_FIELDS
    checkpoint_at_end = True
    results = ("fdm", "validation")

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
        cfg = config
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
        super().__init__(config, self.adapter.device)
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
        self._mask_generator = torch.Generator()
        self._metrics: ImageMetrics | None = None
        self._batches: Iterator[torch.Tensor] | None = None

    def _train_mode(self) -> None:
        """Training mode for the trained parts; a frozen decoder or FDM stays in eval mode, and so do normalisation
        layers with running statistics (batch norm, as in Emu3's decoder): they keep the base model's, which small
        fine-tuning batches would overwrite."""
        self.generator.train()
        if self.config.freeze_decoder:
            self.generator.decoder.eval()
        if self.config.freeze_fdm:
            self.generator.fdm.eval()
        for module in self.generator.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

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

    def _epochs(self, sampler: DistributedSampler, steps_per_epoch: int) -> Iterator[torch.Tensor]:
        """Batches from the current step on; a resumed run continues mid-epoch in the same order (an image that
        cannot be decoded stops the run with one line naming it, also when a worker process met it)."""
        bs = self.config.batch_size
        while True:
            epoch, position = divmod(self.step, steps_per_epoch)
            sampler.set_epoch(epoch)
            indices = list(sampler)[position * bs: steps_per_epoch * bs]
            batches = [indices[i: i + bs] for i in range(0, len(indices) - bs + 1, bs)]  # full batches only
            yield from load_batches(self.views, batches, num_workers=self.config.num_workers)

    def prepare(self) -> RunBudget:
        """Order the batches from the current step on, and validate before the first step."""
        cfg = self.config
        sampler = make_sampler(len(self.views), self.ctx, seed=cfg.seed)
        steps_per_epoch = len(sampler) // cfg.batch_size
        if steps_per_epoch == 0:
            raise InputError(f"{len(self.views)} training images give less than one batch of {cfg.batch_size} "
                             f"per process ({self.ctx.world_size} processes).")
        self._batches = self._epochs(sampler, steps_per_epoch)
        if self.step == 0:
            self.validate()
        return RunBudget(cfg.steps)

    # --- one step --------------------------------------------------------------------------------------

    def train_step(self, progress: float) -> dict[str, float]:
        cfg, step = self.config, self.step
        x = next(self._batches).to(self.device, non_blocking=True)
        hole = None
        if cfg.hole_ratio is not None:  # masks depend only on (seed, step, rank): nothing to carry on resume
            hole = self._masks(x, self._mask_generator.manual_seed(self.step_seed(self.ctx.rank)))
        inp = self._inputs(x, hole)
        with autocast(self.device, cfg.precision):  # the losses cast to float32 before reducing (fdm.losses)
            z_dq, recon = self.net(inp["z_in"], inp["cells"], inp["guide"])
            total, terms = self.loss.generator(x, recon, step, hole=hole, z_dq=z_dq, z=inp["z"],
                                               cell_mask=inp["cells"])
        logs = {k: v.item() for k, v in terms.items()} | {"loss": total.item()}
        check_finite_losses(logs, step=step + 1)
        optimizer_step(total, self.optimizer, self.scaler, clip=cfg.grad_clip, parameters=self.generator.parameters())
        self.scheduler.step()
        if self.discriminator is not None and self.loss.discriminator_step_active(step):
            with autocast(self.device, cfg.precision):
                d_loss = self.loss.discriminator_loss(self.disc_net, x, recon)
            logs["discriminator"] = d_loss.item()
            check_finite_losses({"discriminator": logs["discriminator"]}, step=step + 1)
            optimizer_step(d_loss, self.disc_optimizer, self.disc_scaler, clip=cfg.grad_clip,
                           parameters=self.discriminator.parameters())
            self.disc_scheduler.step()
        return logs

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def after_step(self, progress: float) -> bool:
        """Validate every ``val_every`` steps and at the run's end."""
        if (self.config.val_every and self.step % self.config.val_every == 0) or progress >= 1.0:
            self.validate()
        return False

    # --- validation ------------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Reconstruct the first ``num_val_images`` validation images (fixed masks), write a PNG grid
        (masked input | reconstruction | original) to ``validation/step-*.png`` and return the metrics (also
        recorded in ``metrics.jsonl``, ``"split": "val"``).

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
        self.log_record({"step": self.step, "split": "val", **metrics})
        return metrics

    # --- checkpoints -----------------------------------------------------------------------------------

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        modules = {"fdm": self.generator.fdm, "decoder": self.generator.decoder}
        if self.discriminator is not None:
            modules["discriminator"] = self.discriminator
        return modules

    def checkpoint_objects(self) -> dict[str, Any]:
        objects = {"optimizer": self.optimizer, "scheduler": self.scheduler}
        if self.discriminator is not None:
            objects |= {"disc_optimizer": self.disc_optimizer, "disc_scheduler": self.disc_scheduler}
        return objects

    def gradient_scalers(self) -> dict[str, torch.amp.GradScaler]:
        scalers = {"scaler": self.scaler}
        if self.discriminator is not None:
            scalers["disc_scaler"] = self.disc_scaler
        return scalers

    def run_identity(self) -> dict[str, Any]:
        """The training and validation views and the base model's codebook
        (:func:`~fdm.training.checkpointing.run_identity`)."""
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
            **self.training_record(), "freeze_decoder": cfg.freeze_decoder, "freeze_fdm": cfg.freeze_fdm,
            "backbone": cfg.backbone, **self.schedule.to_dict()}}
        result = FDM(**config)
        result.load_state_dict(source.state_dict())
        if not cfg.freeze_decoder:
            result.decoder_state = decoder_state_dict(self.adapter)
        return result.cpu().eval()

    def finish(self, complete: bool) -> FDM:
        """:meth:`result`; at the run's end also saved to ``<output_dir>/fdm``, with the model left frozen."""
        result = self.result()
        if complete:
            self.model.requires_grad_(False).eval()  # done: the model (yours, with in_place) is left frozen
            if self.ctx.is_main:
                result.save_pretrained(self.output_dir / "fdm")
                logger.info("saved the fine-tuned FDM%s to %s", "" if self.config.freeze_decoder else " and its "
                            "decoder", self.output_dir / "fdm")
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
