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
import logging
import sys
import time

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
from fdm.commands.config_options import ConfigOption, add_config_options, config_from_args
from fdm.commands.data_options import add_data_arguments, add_run_start_options, open_training_source
from fdm.commands.model_options import add_model_arguments, load_base_model
from fdm.errors import UsageError
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

__all__ = ["add_arguments", "phase2_config", "run", "train", "training_source"]

logger = logging.getLogger(__name__)

#: Training length when none of --steps, --epochs and --minutes is given.
DEFAULT_EPOCHS = 20
#: Part of the images held out when --val-fraction is not given.
DEFAULT_VAL_FRACTION = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, fdm=False)
    add_data_arguments(parser, streaming=True, recipe=True)
    group = parser.add_argument_group("training")
    group.add_argument("--out", required=True, help="output folder: the trained FDM, its checkpoints and records")
    add_config_options(group.add_mutually_exclusive_group(), Phase2Config, [
        ConfigOption("steps", "number of optimizer steps (instead of --epochs)", positive_int),
        ConfigOption("epochs", f"number of passes over the training views (default {DEFAULT_EPOCHS} when neither "
                               "--steps nor --minutes is given)", positive_int),
    ])
    add_config_options(group, Phase2Config, [
        ConfigOption("minutes", "wall-time budget of the whole run, feature cache included: train until it is spent "
                                "(or until --steps/--epochs, whichever comes first), then save", positive_float),
    ])
    group.add_argument("--val-fraction", type=held_out_fraction, default=DEFAULT_VAL_FRACTION,
                       help=f"part of the images held out to check the FDM on unseen images (default "
                            f"{DEFAULT_VAL_FRACTION}, at least one image; 0: none)")
    add_config_options(group, Phase2Config, [
        ConfigOption("checks", "held-out checks per run, evenly spaced; the best one's weights are saved",
                     positive_int),
        ConfigOption("patience", "stop early after this many held-out checks in a row without improvement (0: "
                                 "never)", non_negative_int),
        ConfigOption("batch_size", "views per step and process", positive_int),
        ConfigOption("lr", "peak learning rate", positive_float),
        ConfigOption("warmup_steps", f"linear warm-up steps (default: the first {WARMUP_FRACTION:.0%} of the run, "
                                     "however long; needs --steps or --epochs)", non_negative_int),
    ])
    masks = group.add_mutually_exclusive_group()
    add_config_options(masks, Phase2Config, [
        ConfigOption("hole_ratio", "hole-area range of the random training masks (the official recipe)", fraction,
                     metavar=("LO", "HI"), nargs=2),
    ])
    masks.add_argument("--no-mask", action="store_true",
                       help="mask-free training (every cell generated): unconditional / class-conditional models")
    add_config_options(group, Phase2Config, [
        ConfigOption("cache", "where the frozen model's features live: memory, disk, or none (re-encode every "
                              "step)", choices=CACHE_MODES),
        ConfigOption("cache_dir", "disk cache folder (default OUT/feature-cache)"),
        ConfigOption("cache_dtype", "storage type of the cached features z (bfloat16 where float16 overflows; z_q "
                                    "is looked up from stored code indices)", choices=CACHE_DTYPES),
        ConfigOption("cache_shards", "cache shards (default: one per process); each process encodes and reads its "
                                     "own", int_at_least(1)),
        ConfigOption("num_workers", "data-loading workers while caching", non_negative_int),
        ConfigOption("hidden_channels", "FDM trunk width (default: the model's channels, at least 32 and at most "
                                        "256)", int_at_least(2)),
        ConfigOption("num_blocks", "FDM residual blocks", non_negative_int),
        ConfigOption("precision", "FDM forward passes in float32 (fp32), bfloat16 or float16 autocast (fp16 with "
                                  "gradient scaling); see docs/training.md, Mixed precision", choices=PRECISIONS),
        ConfigOption("checkpoint_every", "steps between checkpoints (0: none)", non_negative_int),
    ])
    add_run_start_options(group)
    add_config_options(group, Phase2Config, [
        ConfigOption("base_model", "name of the base model recorded in the FDM's config and model card, next to "
                                   "its codebook fingerprint (default: MODEL:CHECKPOINT)", metavar="NAME"),
        ConfigOption("seed", "seed of the FDM's initialisation, the views, their order and the masks", int),
        ConfigOption("progress", "no progress bars", flag="--no-progress"),
    ])


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
    config = phase2_config(args)
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
    module = trainer.train(trainer.start_point(resume=args.resume, overwrite=args.overwrite))
    _summarise(trainer, args.out)
    return module


def phase2_config(args: argparse.Namespace) -> Phase2Config:
    """The run's config from the parsed options: each field from its option, or its default."""
    no_length = args.steps is None and args.epochs is None and args.minutes is None
    return config_from_args(Phase2Config, args, epochs=DEFAULT_EPOCHS if no_length else args.epochs,
                            hole_ratio=None if args.no_mask else tuple(args.hole_ratio),
                            patience=args.patience or None, output_dir=args.out,
                            base_model=args.base_model or _base_model_name(args))


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
