"""Train an FDM for a base VQ model on a set of images (phase 2: the paper's sampler-free qe loss).

The base model stays frozen; its features of every training view are computed once and cached. The result
is written to --out in the save_pretrained layout (load it with fdm.FDM.from_pretrained or --fdm DIR).
Runs unchanged under `torchrun --nproc_per_node N -m fdm.cli train ...` and `accelerate launch`.

Examples:
  fdm train --model taming --config vqgan.yaml --checkpoint vqgan.ckpt --data photos/ --out fdm-vqgan --epochs 20
  fdm train --model diffusers --checkpoint ./vqmodel --data faces/ --out fdm-faces --steps 5000 --no-mask
  fdm train --model taming --config vqgan.yaml --checkpoint vqgan.ckpt --out fdm-in \
      --data 'shards/imagenet-train-{000000..001023}.tar' --epochs 2 --cache disk
  fdm train --model taming --config vqgan.yaml --checkpoint vqgan.ckpt --out fdm-places \
      --data 'hf:data/places?streaming=1&num_images=1803460' --epochs 2 --cache disk
"""

from __future__ import annotations

import argparse
import logging

from torch import nn

from fdm.adapter import find_adapter
from fdm.commands.argtypes import fraction, int_at_least, non_negative_int, positive_float, positive_int
from fdm.commands.data_options import add_data_arguments
from fdm.commands.model_options import add_model_arguments, load_base_model
from fdm.errors import UsageError
from fdm.masks import DEFAULT_HOLE_RATIO
from fdm.module import FDM
from fdm.precision import PRECISIONS
from fdm.training import (
    CACHE_DTYPES,
    CACHE_MODES,
    Phase2Config,
    Phase2Trainer,
    SeededViews,
    latest_checkpoint,
    open_source,
    shutdown_distributed,
)
from fdm.training.schedule import PAPER_LR, PAPER_WARMUP_STEPS

__all__ = ["add_arguments", "run", "train"]

logger = logging.getLogger(__name__)

#: Training length when neither --steps nor --epochs is given.
DEFAULT_EPOCHS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, fdm=False)
    add_data_arguments(parser, streaming=True)
    run_group = parser.add_argument_group("training")
    run_group.add_argument("--out", required=True, help="output folder: the trained FDM and its checkpoints")
    length = run_group.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help="number of optimizer steps (instead of --epochs)")
    length.add_argument("--epochs", type=positive_int,
                        help=f"number of passes over the training views (default {DEFAULT_EPOCHS} when --steps is "
                             "not given)")
    run_group.add_argument("--batch-size", type=positive_int, default=16,
                           help="views per step and process (default 16)")
    run_group.add_argument("--lr", type=positive_float, default=PAPER_LR,
                           help=f"peak learning rate (default {PAPER_LR})")
    run_group.add_argument("--warmup-steps", type=non_negative_int, default=PAPER_WARMUP_STEPS,
                           help=f"linear warm-up steps (default {PAPER_WARMUP_STEPS})")
    masks = run_group.add_mutually_exclusive_group()
    masks.add_argument("--hole-ratio", type=fraction, nargs=2, metavar=("LO", "HI"), default=list(DEFAULT_HOLE_RATIO),
                       help="hole-area range of the random training masks (default %(default)s, the official recipe)")
    masks.add_argument("--no-mask", action="store_true",
                       help="mask-free training (every cell generated): unconditional / class-conditional models")
    run_group.add_argument("--cache", choices=CACHE_MODES, default="memory",
                           help="where the frozen model's features live: memory (default), disk, or none "
                                "(re-encode every step)")
    run_group.add_argument("--cache-dir", help="disk cache folder (default OUT/feature-cache)")
    run_group.add_argument("--cache-dtype", choices=CACHE_DTYPES, default="float16",
                           help="storage type of the cached features z (default float16; bfloat16 where float16 "
                                "overflows; z_q is looked up from stored code indices)")
    run_group.add_argument("--cache-shards", type=int_at_least(1),
                           help="cache shards (default: one per process); each process encodes and reads its own")
    run_group.add_argument("--num-workers", type=non_negative_int, default=0,
                           help="data-loading workers while caching")
    run_group.add_argument("--hidden-channels", type=int_at_least(2),
                           help="FDM trunk width (default: the model's channels)")
    run_group.add_argument("--num-blocks", type=non_negative_int, default=8, help="FDM residual blocks (default 8)")
    run_group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                           help="FDM forward passes in float32 (default), bfloat16 or float16 autocast (fp16 with "
                                "gradient scaling); see docs/training.md, Mixed precision")
    run_group.add_argument("--checkpoint-every", type=non_negative_int, default=1000,
                           help="steps between checkpoints (0: none)")
    run_group.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    run_group.add_argument("--base-model", metavar="NAME",
                           help="name of the base model recorded in the FDM's config and model card, next to its "
                                "codebook fingerprint (default: MODEL:CHECKPOINT)")
    run_group.add_argument("--seed", type=int, default=0)
    run_group.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    try:
        train(load_base_model(args), args)
    finally:
        shutdown_distributed()
    return 0


def train(model: nn.Module, args: argparse.Namespace) -> FDM:
    """Train an FDM for ``model`` as the parsed ``fdm train`` options say; returns the trained FDM."""
    adapter = find_adapter(model)
    config = Phase2Config(
        steps=args.steps,
        epochs=args.epochs if args.epochs is not None or args.steps is not None else DEFAULT_EPOCHS,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        hole_ratio=None if args.no_mask else tuple(args.hole_ratio),
        cache=args.cache,
        cache_dir=args.cache_dir,
        cache_dtype=args.cache_dtype,
        cache_shards=args.cache_shards,
        num_workers=args.num_workers,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
        checkpoint_every=args.checkpoint_every,
        output_dir=args.out,
        hidden_channels=args.hidden_channels,
        num_blocks=args.num_blocks,
        base_model=args.base_model or _base_model_name(args),
    )
    source = open_source(args.data)
    if args.cache == "none" and not source.random_access:
        raise UsageError(f"--cache none re-encodes views by index at every step, which {source.describe()} cannot "
                         "do (it streams); use --cache memory or --cache disk.")
    views = SeededViews(source, crop_size=args.crop_size, views_per_image=args.views_per_image, seed=args.seed)
    trainer = Phase2Trainer(model, views, config, adapter=adapter)
    resume_from = None
    if args.resume:
        resume_from = latest_checkpoint(trainer.checkpoint_dir)
        if resume_from is None:
            logger.info("--resume: no checkpoint in %s yet, starting from scratch", trainer.checkpoint_dir)
    return trainer.train(resume_from)


def _base_model_name(args: argparse.Namespace) -> str:
    source = args.checkpoint or args.config
    return f"{args.model}:{source}" if source else args.model
