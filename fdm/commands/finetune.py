"""Fine-tune an FDM together with the base model's decoder (phase 3: L_qe + L1 + gradient + GAN + VGG losses).

Starts from an FDM trained by `fdm train` (--fdm) and writes the fine-tuned FDM and decoder to OUT/fdm
(model.safetensors + decoder.safetensors; load with fdm.FDM.from_pretrained, push with `fdm push`).
The perceptual and style losses need torchvision's ImageNet VGG19 weights (vgg19-dcbac81d.pth): from
--vgg-weights or torch's cache; nothing is downloaded. Without them, pass --no-perceptual.
Runs unchanged under `torchrun --nproc_per_node N -m fdm.cli finetune ...` and `accelerate launch`.

Examples:
  fdm finetune --model taming --config vqgan.yaml --checkpoint vqgan.ckpt --fdm fdm-vqgan \\
      --data photos/train --val-data photos/val --out fdm-vqgan-ft --steps 20000 --vgg-weights vgg19-dcbac81d.pth
  fdm finetune --model diffusers --checkpoint ./vqmodel --fdm fdm-faces --data faces/ --out ft --steps 5000 \\
      --no-mask --no-perceptual
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from torch import nn

from fdm.commands.argtypes import fraction, non_negative_float, non_negative_int, positive_float, positive_int
from fdm.commands.data_options import add_data_arguments, open_training_source
from fdm.commands.model_options import add_model_arguments, load_base_model, load_fdm
from fdm.errors import UsageError
from fdm.losses import TERMS
from fdm.masks import DEFAULT_HOLE_RATIO
from fdm.module import FDM
from fdm.precision import PRECISIONS
from fdm.training import ImageSource, SeededViews, checkpoint_to_resume, shutdown_distributed
from fdm.training.backbones import BACKBONES
from fdm.training.phase3 import Phase3Config, Phase3Trainer

__all__ = ["add_arguments", "finetune", "run", "training_sources"]

logger = logging.getLogger(__name__)

_DEFAULTS = Phase3Config()


def _term_value(kind: Callable[[str], float | int]) -> Callable[[str], tuple[str, float | int]]:
    """TERM=VALUE with a loss term name and ``kind`` (an argparse type function) for the value."""

    def parse(text: str) -> tuple[str, float | int]:
        name, sep, value = text.partition("=")
        if not sep or name not in TERMS:
            raise argparse.ArgumentTypeError(f"expected TERM=VALUE with TERM in {', '.join(TERMS)}; got {text!r}")
        try:
            return name, kind(value)
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{text}: {err}") from None

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_data_arguments(parser, streaming=False, validation=True)
    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--out", required=True, help="output folder: checkpoints, validation grids, metrics, OUT/fdm")
    group.add_argument("--steps", type=positive_int, required=True, help="number of optimizer steps")
    group.add_argument("--batch-size", type=positive_int, default=_DEFAULTS.batch_size,
                       help=f"images per step and process (default {_DEFAULTS.batch_size})")
    group.add_argument("--lr", type=positive_float, default=_DEFAULTS.lr,
                       help=f"peak learning rate (default {_DEFAULTS.lr})")
    group.add_argument("--warmup-steps", type=non_negative_int, default=_DEFAULTS.warmup_steps,
                       help=f"linear warm-up steps (default {_DEFAULTS.warmup_steps})")
    group.add_argument("--disc-lr", type=positive_float, default=_DEFAULTS.disc_lr,
                       help=f"discriminator peak learning rate (default {_DEFAULTS.disc_lr})")
    group.add_argument("--grad-clip", type=non_negative_float, default=_DEFAULTS.grad_clip,
                       help=f"max gradient norm, 0 for none (default {_DEFAULTS.grad_clip})")
    masks = group.add_mutually_exclusive_group()
    masks.add_argument("--hole-ratio", type=fraction, nargs=2, metavar=("LO", "HI"), default=list(DEFAULT_HOLE_RATIO),
                       help="hole-area range of the random training masks (default %(default)s)")
    masks.add_argument("--no-mask", action="store_true",
                       help="mask-free fine-tuning (every cell quantized): unconditional / class-conditional models")
    group.add_argument("--backbone", choices=BACKBONES, default=_DEFAULTS.backbone,
                       help="network of the perceptual and style losses: vgg19 (the paper's; torchvision's weights, "
                            "see --vgg-weights) or st-vgg16 (ST-LPIPS's shift-tolerant VGG16, shipped with the eval "
                            "extra: offline) (default %(default)s)")
    group.add_argument("--vgg-weights", help="the backbone's weight file (default: torch's cache for vgg19, the "
                                             "stlpips_pytorch package for st-vgg16)")
    group.add_argument("--no-perceptual", action="store_true",
                       help="drop the perceptual and style losses (no VGG19 weights needed)")
    group.add_argument("--no-adversarial", action="store_true", help="drop the adversarial loss and discriminator")
    group.add_argument("--freeze-decoder", action="store_true",
                       help="train the FDM alone through the frozen decoder (no decoder.safetensors; a drop-in FDM)")
    group.add_argument("--freeze-fdm", action="store_true",
                       help="train the decoder alone (with an identity FDM: the decoder-only ablation)")
    group.add_argument("--loss-weight", type=_term_value(non_negative_float),
                       action="append", default=[], metavar="TERM=W",
                       help=f"override a loss weight (terms: {', '.join(TERMS)}); repeatable")
    group.add_argument("--start-step", type=_term_value(non_negative_int),
                       action="append", default=[], metavar="TERM=STEP",
                       help="override the step from which a loss term counts; repeatable")
    group.add_argument("--precision", choices=PRECISIONS, default=_DEFAULTS.precision,
                       help="generator and discriminator forward passes in float32 (default), bfloat16 or float16 "
                            "autocast (fp16 with gradient scaling); see docs/training.md, Mixed precision")
    group.add_argument("--val-every", type=non_negative_int, default=_DEFAULTS.val_every,
                       help="steps between validations")
    group.add_argument("--num-val-images", type=positive_int, default=_DEFAULTS.num_val_images)
    group.add_argument("--fid", action="store_true", help="also compute FID on the validation images (slow on CPU)")
    group.add_argument("--checkpoint-every", type=non_negative_int, default=_DEFAULTS.checkpoint_every,
                       help="steps between checkpoints (0: only the last)")
    group.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    group.add_argument("--num-workers", type=non_negative_int, default=_DEFAULTS.num_workers, help="data-loading workers")
    group.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        sources = training_sources(args)  # first: the data and the FDM fail before the model is loaded
        fdm_module = load_fdm(args)
        finetune(load_base_model(args), fdm_module, args, sources)
    finally:
        shutdown_distributed()
    return 0


def training_sources(args: argparse.Namespace) -> tuple[ImageSource, ImageSource | None]:
    """The sources ``--data`` and ``--val-data`` name (None without ``--val-data``); streaming ones are refused."""
    val = _random_access_source(args.val_data, "--val-data", args) if args.val_data else None
    return _random_access_source(args.data, "--data", args), val


def finetune(model: nn.Module, fdm_module: FDM, args: argparse.Namespace,
             sources: tuple[ImageSource, ImageSource | None] | None = None) -> FDM:
    """Fine-tune ``fdm_module`` (and ``model``'s decoder unless ``--freeze-decoder``) as the parsed options say, on
    ``sources`` (training and validation images; default: :func:`training_sources`)."""
    train_source, val_source = sources if sources is not None else training_sources(args)
    weights = dict(args.loss_weight)
    if args.no_adversarial:
        weights["adversarial"] = 0.0
    config = Phase3Config(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        disc_lr=args.disc_lr,
        grad_clip=args.grad_clip or None,
        hole_ratio=None if args.no_mask else tuple(args.hole_ratio),
        weights=weights,
        start_steps=dict(args.start_step),
        backbone=args.backbone,
        vgg_weights=args.vgg_weights,
        drop_vgg_terms=args.no_perceptual,
        freeze_decoder=args.freeze_decoder,
        freeze_fdm=args.freeze_fdm,
        precision=args.precision,
        seed=args.seed,
        device=args.device,
        output_dir=args.out,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        num_val_images=args.num_val_images,
        fid=args.fid,
        num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    views = SeededViews(train_source, crop_size=args.crop_size, views_per_image=args.views_per_image, seed=args.seed)
    val_views = None if val_source is None else SeededViews(val_source, crop_size=args.crop_size, seed=args.seed,
                                                            flip=False)
    trainer = Phase3Trainer(model, fdm_module, views, config, val_views=val_views, in_place=True)  # loaded for this run
    return trainer.train(checkpoint_to_resume(trainer.checkpoint_dir, resume=args.resume))


def _random_access_source(spec: str, option: str, args: argparse.Namespace) -> ImageSource:
    """The source ``spec`` names (see :func:`~fdm.training.open_source`); a streaming one is refused."""
    source = open_training_source(spec, args, option)
    if not source.random_access:
        raise UsageError(f"{option} {spec}: fine-tuning reads images by index and {source.describe()} only streams; "
                         "drop streaming=1.")
    return source
