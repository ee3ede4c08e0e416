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
from fdm.commands.config_options import ConfigOption, add_config_options, config_from_args
from fdm.commands.data_options import add_data_arguments, add_run_start_options, open_training_source
from fdm.commands.model_options import add_model_arguments, load_base_model, load_fdm
from fdm.errors import UsageError
from fdm.losses import TERMS
from fdm.module import FDM
from fdm.precision import PRECISIONS
from fdm.training import ImageSource, SeededViews, shutdown_distributed
from fdm.training.backbones import BACKBONES
from fdm.training.phase3 import Phase3Config, Phase3Trainer

__all__ = ["add_arguments", "finetune", "phase3_config", "run", "training_sources"]

logger = logging.getLogger(__name__)

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
    add_config_options(group, Phase3Config, [
        ConfigOption("batch_size", "images per step and process", positive_int),
        ConfigOption("lr", "peak learning rate", positive_float),
        ConfigOption("warmup_steps", "linear warm-up steps", non_negative_int),
        ConfigOption("disc_lr", "discriminator peak learning rate", positive_float),
        ConfigOption("grad_clip", "max gradient norm, 0 for none", non_negative_float),
    ])
    masks = group.add_mutually_exclusive_group()
    add_config_options(masks, Phase3Config, [
        ConfigOption("hole_ratio", "hole-area range of the random training masks", fraction, metavar=("LO", "HI"),
                     nargs=2),
    ])
    masks.add_argument("--no-mask", action="store_true",
                       help="mask-free fine-tuning (every cell quantized): unconditional / class-conditional models")
    add_config_options(group, Phase3Config, [
        ConfigOption("backbone", "network of the perceptual and style losses: vgg19 (the paper's; torchvision's "
                                 "weights, see --vgg-weights) or st-vgg16 (ST-LPIPS's shift-tolerant VGG16, shipped "
                                 "with the eval extra: offline)", choices=BACKBONES),
        ConfigOption("vgg_weights", "the backbone's weight file (default: torch's cache for vgg19, the "
                                    "stlpips_pytorch package for st-vgg16)"),
        ConfigOption("drop_vgg_terms", "drop the perceptual and style losses (no VGG19 weights needed)",
                     flag="--no-perceptual"),
    ])
    group.add_argument("--no-adversarial", action="store_true", help="drop the adversarial loss and discriminator")
    add_config_options(group, Phase3Config, [
        ConfigOption("freeze_decoder", "train the FDM alone through the frozen decoder (no decoder.safetensors; a "
                                       "drop-in FDM)"),
        ConfigOption("freeze_fdm", "train the decoder alone (with an identity FDM: the decoder-only ablation)"),
    ])
    group.add_argument("--loss-weight", type=_term_value(non_negative_float),
                       action="append", default=[], metavar="TERM=W",
                       help=f"override a loss weight (terms: {', '.join(TERMS)}); repeatable")
    group.add_argument("--start-step", type=_term_value(non_negative_int),
                       action="append", default=[], metavar="TERM=STEP",
                       help="override the step from which a loss term counts; repeatable")
    add_config_options(group, Phase3Config, [
        ConfigOption("precision", "generator and discriminator forward passes in float32 (fp32), bfloat16 or float16 "
                                  "autocast (fp16 with gradient scaling); see docs/training.md, Mixed precision",
                     choices=PRECISIONS),
        ConfigOption("val_every", "steps between validations", non_negative_int),
        ConfigOption("num_val_images", "validation images shown and scored", positive_int),
        ConfigOption("fid", "also compute FID on the validation images (slow on CPU)"),
        ConfigOption("checkpoint_every", "steps between checkpoints (0: only the last)", non_negative_int),
    ])
    add_run_start_options(group)
    add_config_options(group, Phase3Config, [
        ConfigOption("num_workers", "data-loading workers", non_negative_int),
        ConfigOption("seed", "seed of the data order, the masks and the discriminator's initialisation", int),
        ConfigOption("progress", "no progress bar", flag="--no-progress"),
    ])


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
    config = phase3_config(args)
    views = SeededViews(train_source, crop_size=args.crop_size, views_per_image=args.views_per_image, seed=args.seed)
    val_views = None if val_source is None else SeededViews(val_source, crop_size=args.crop_size, seed=args.seed,
                                                            flip=False)
    trainer = Phase3Trainer(model, fdm_module, views, config, val_views=val_views, in_place=True)  # loaded for this run
    return trainer.train(trainer.start_point(resume=args.resume, overwrite=args.overwrite))


def phase3_config(args: argparse.Namespace) -> Phase3Config:
    """The run's config from the parsed options: each field from its option, or its default."""
    weights = dict(args.loss_weight)
    if args.no_adversarial:
        weights["adversarial"] = 0.0
    return config_from_args(Phase3Config, args, grad_clip=args.grad_clip or None,
                            hole_ratio=None if args.no_mask else tuple(args.hole_ratio), weights=weights,
                            start_steps=dict(args.start_step), output_dir=args.out)


def _random_access_source(spec: str, option: str, args: argparse.Namespace) -> ImageSource:
    """The source ``spec`` names (see :func:`~fdm.training.open_source`); a streaming one is refused."""
    source = open_training_source(spec, args, option)
    if not source.random_access:
        raise UsageError(f"{option} {spec}: fine-tuning reads images by index and {source.describe()} only streams; "
                         "drop streaming=1.")
    return source
