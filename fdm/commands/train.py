"""Train an FDM for a base VQ model on a set of images (phase 2: the paper's sampler-free qe loss).

The base model stays frozen; its features of every training view are computed once and cached. A tenth of the
images is held out: the FDM is checked on them during the run, the best check's weights are saved, and the last
line says whether the FDM beats plain VQ on images it never saw. The result is written to --out in the
save_pretrained layout (load it with fdm.FDM.from_pretrained or --fdm DIR).
Runs unchanged under `torchrun --nproc_per_node N -m fdm.cli train ...` and `accelerate launch`.

Examples:
  fdm train --data photos/ --out fdm-mine --minutes 4        # the embedded demo VQGAN, 4 minutes
  fdm train --model taming --config vqgan.yaml --checkpoint vqgan.ckpt --data photos/ --out fdm-vqgan --epochs 20
  fdm train --model diffusers --checkpoint ./vqmodel --data faces/ --out fdm-faces --steps 5000 --no-mask
  fdm train --model taming --config vqgan.yaml --checkpoint vqgan.ckpt --out fdm-in \
      --data 'shards/imagenet-train-{000000..001023}.tar' --epochs 2 --cache disk
  fdm train --model taming --config vqgan.yaml --checkpoint vqgan.ckpt --out fdm-places \
      --data 'hf:data/places?streaming=1&num_images=1803460' --epochs 2 --cache disk
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from types import SimpleNamespace

import torch
from torch import nn

from fdm.adapter import VQAdapter
from fdm.commands.argtypes import (
    fraction,
    held_out_fraction,
    int_at_least,
    non_negative_int,
    positive_float,
    positive_int,
)
from fdm.commands.data_options import add_data_arguments, open_training_source
from fdm.commands.model_options import add_model_arguments, load_base_model
from fdm.errors import UsageError
from fdm.masks import DEFAULT_HOLE_RATIO
from fdm.module import FDM
from fdm.precision import PRECISIONS
from fdm.registry import find_adapter
from fdm.training import (
    CACHE_DTYPES,
    CACHE_MODES,
    ImageSource,
    Phase2Config,
    Phase2Trainer,
    SeededViews,
    checkpoint_to_resume,
    encode_views,
    shutdown_distributed,
    split_heldout,
)
from fdm.training.recipe import (
    HELDOUT_CROP,
    VIEW_SCALE_RANGE,
    WARMUP_FRACTION,
    crop_size_for,
    views_per_image_for,
)

__all__ = ["add_arguments", "run", "train", "training_source"]

#: Every option's default is Phase2Config's (a config needs a run length, so its field defaults are read).
_DEFAULTS = SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(Phase2Config)})

logger = logging.getLogger(__name__)

#: Training length when none of --steps, --epochs and --minutes is given.
DEFAULT_EPOCHS = 20
#: Part of the images held out when --val-fraction is not given.
DEFAULT_VAL_FRACTION = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, fdm=False)
    add_data_arguments(parser, streaming=True, recipe=True)
    run_group = parser.add_argument_group("training")
    run_group.add_argument("--out", required=True, help="output folder: the trained FDM and its checkpoints")
    length = run_group.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help="number of optimizer steps (instead of --epochs)")
    length.add_argument("--epochs", type=positive_int,
                        help=f"number of passes over the training views (default {DEFAULT_EPOCHS} when neither --steps "
                             "nor --minutes is given)")
    run_group.add_argument("--minutes", type=positive_float,
                           help="wall-time budget of the whole run, feature cache included: train until it is spent "
                                "(or until --steps/--epochs, whichever comes first), then save")
    run_group.add_argument("--val-fraction", type=held_out_fraction, default=DEFAULT_VAL_FRACTION,
                           help=f"part of the images held out to check the FDM on unseen images (default "
                                f"{DEFAULT_VAL_FRACTION}, at least one image; 0: none)")
    run_group.add_argument("--checks", type=positive_int, default=_DEFAULTS.checks,
                           help="held-out checks per run, evenly spaced (default %(default)s); the best one's weights "
                                "are saved")
    run_group.add_argument("--patience", type=non_negative_int, default=_DEFAULTS.patience,
                           help="stop early after this many held-out checks in a row without improvement (default "
                                "%(default)s; 0: never)")
    run_group.add_argument("--batch-size", type=positive_int, default=_DEFAULTS.batch_size,
                           help="views per step and process (default %(default)s)")
    run_group.add_argument("--lr", type=positive_float, default=_DEFAULTS.lr,
                           help="peak learning rate (default %(default)s)")
    run_group.add_argument("--warmup-steps", type=non_negative_int,
                           help=f"linear warm-up steps (default: the first {WARMUP_FRACTION * 100:.0f}%% of the run, however "
                                "long; needs --steps or --epochs)")
    masks = run_group.add_mutually_exclusive_group()
    masks.add_argument("--hole-ratio", type=fraction, nargs=2, metavar=("LO", "HI"), default=list(DEFAULT_HOLE_RATIO),
                       help="hole-area range of the random training masks (default %(default)s, the official recipe)")
    masks.add_argument("--no-mask", action="store_true",
                       help="mask-free training (every cell generated): unconditional / class-conditional models")
    run_group.add_argument("--cache", choices=CACHE_MODES, default=_DEFAULTS.cache,
                           help="where the frozen model's features live: memory, disk, or none (re-encode every "
                                "step); default %(default)s")
    run_group.add_argument("--cache-dir", help="disk cache folder (default OUT/feature-cache)")
    run_group.add_argument("--cache-dtype", choices=CACHE_DTYPES, default=_DEFAULTS.cache_dtype,
                           help="storage type of the cached features z (default %(default)s; bfloat16 where float16 "
                                "overflows; z_q is looked up from stored code indices)")
    run_group.add_argument("--cache-shards", type=int_at_least(1),
                           help="cache shards (default: one per process); each process encodes and reads its own")
    run_group.add_argument("--num-workers", type=non_negative_int, default=_DEFAULTS.num_workers,
                           help="data-loading workers while caching")
    run_group.add_argument("--hidden-channels", type=int_at_least(2),
                           help="FDM trunk width (default: the model's channels, at least 32 and at most 256)")
    run_group.add_argument("--num-blocks", type=non_negative_int, default=_DEFAULTS.num_blocks,
                           help="FDM residual blocks (default %(default)s)")
    run_group.add_argument("--precision", choices=PRECISIONS, default=_DEFAULTS.precision,
                           help="FDM forward passes in float32 (fp32, the default), bfloat16 or float16 autocast (fp16 with "
                                "gradient scaling); see docs/training.md, Mixed precision")
    run_group.add_argument("--checkpoint-every", type=non_negative_int, default=_DEFAULTS.checkpoint_every,
                           help="steps between checkpoints (default %(default)s; 0: none)")
    run_group.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    run_group.add_argument("--base-model", metavar="NAME",
                           help="name of the base model recorded in the FDM's config and model card, next to its "
                                "codebook fingerprint (default: MODEL:CHECKPOINT)")
    run_group.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    run_group.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    try:
        source = training_source(args)  # first: options and data fail before the model is loaded
        train(load_base_model(args), args, source)
    finally:
        shutdown_distributed()
    return 0


def training_source(args: argparse.Namespace) -> ImageSource:
    """Check the options that need no model and open ``--data``.

    Raises:
        UsageError: ``--warmup-steps`` without a length in steps, or ``--cache none`` on a streamed source.
        InputError: ``--data`` does not exist or cannot be opened (or, with ``--skip-bad-images``, holds no readable
            image).
    """
    if args.warmup_steps is not None and args.steps is None and args.epochs is None and args.minutes is not None:
        raise UsageError("--warmup-steps counts steps: give --steps or --epochs too, or leave it out (the warm-up "
                         f"is then the first {WARMUP_FRACTION:.0%} of the run).")
    source = open_training_source(args.data, args)
    if args.cache == "none" and not source.random_access:
        raise UsageError(f"--cache none re-encodes views by index at every step, which {source.describe()} cannot "
                         "do (it streams); use --cache memory or --cache disk.")
    return source


def train(model: nn.Module, args: argparse.Namespace, source: ImageSource | None = None) -> FDM:
    """Train an FDM for ``model`` as the parsed ``fdm train`` options say, on ``source`` (default:
    :func:`training_source`); returns the trained FDM."""
    source = source if source is not None else training_source(args)
    adapter = find_adapter(model)
    no_length = args.steps is None and args.epochs is None and args.minutes is None
    config = Phase2Config(
        steps=args.steps,
        epochs=DEFAULT_EPOCHS if no_length else args.epochs,
        minutes=args.minutes,
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
        checks=args.checks,
        patience=args.patience or None,
    )
    source, heldout = split_heldout(source, args.val_fraction, seed=args.seed)
    crop = args.crop_size or crop_size_for(adapter.factor)
    per_image = args.views_per_image or views_per_image_for(
        len(source), budget_seconds=None if args.minutes is None else 60 * args.minutes,
        seconds_per_view=None if args.minutes is None else _seconds_per_view(adapter, source, crop, args.seed))
    views = SeededViews(source, crop_size=crop, views_per_image=per_image, seed=args.seed,
                        scale_range=VIEW_SCALE_RANGE)
    heldout_views = None if heldout is None else SeededViews(
        heldout, crop_size=max(crop, HELDOUT_CROP), views_per_image=4, seed=args.seed + 1, scale_range=(1.0, 2.0))
    trainer = Phase2Trainer(model, views, config, adapter=adapter, heldout_views=heldout_views)
    module = trainer.train(checkpoint_to_resume(trainer.checkpoint_dir, resume=args.resume))
    _summarise(trainer, args.out)
    return module


def _seconds_per_view(adapter: VQAdapter, source: ImageSource, crop: int, seed: int) -> float:
    """Wall time to read, crop and encode one training view (measured on up to 8 views of the first images)."""
    probe = SeededViews(source, crop_size=crop, views_per_image=1, seed=seed, scale_range=VIEW_SCALE_RANGE)
    count = min(8, len(probe))
    started = time.perf_counter()
    images = torch.stack([view for _, view in probe.iter_views(0, count)]).to(adapter.device)
    with torch.no_grad():
        encode_views(adapter, images)
    return (time.perf_counter() - started) / count


def _summarise(trainer: Phase2Trainer, out: str) -> None:
    """Print the run's last lines (first process only): where the FDM is and, with held-out images, whether it beats
    plain VQ."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    print(f"saved the FDM to {out} ({trainer.step} steps)")
    result = trainer.heldout_result
    if result is None:
        print("no images held out (--val-fraction 0 or a single image): measure the FDM with fdm eval on images "
              "it did not see")
        return
    print(f"held-out ({trainer.heldout_views.source.describe()}): {result.describe()}")
    if not result.helps:
        print("this FDM does not beat plain VQ on the held-out images: train longer (--minutes, --steps), wider "
              "(--hidden-channels), or on more images", file=sys.stderr)


def _base_model_name(args: argparse.Namespace) -> str:
    return f"{args.model}:{args.checkpoint}" if args.checkpoint else args.model
