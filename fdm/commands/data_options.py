"""Command-line options shared by `fdm train` and `fdm finetune`: the training images and their crops, and where a
run starts."""

from __future__ import annotations

import argparse
import logging

from fdm.commands.argtypes import positive_int
from fdm.training.sources import DATA_FORMS, ImageSource, open_source
from fdm.training.sources.base import skip_unreadable

logger = logging.getLogger(__name__)

__all__ = ["add_data_arguments", "add_run_start_options", "open_training_source"]


def add_data_arguments(
    parser: argparse.ArgumentParser, *, streaming: bool, validation: bool = False, recipe: bool = False
) -> None:
    """Add ``--data``, ``--skip-bad-images``, ``--crop-size`` and ``--views-per-image`` (and ``--val-data``) in a
    "data" group.

    ``streaming``: whether the command accepts streamed Hugging Face datasets (it says so in ``--data``'s help).
    ``recipe``: crop and views per image default to None, for the command to choose from the model and the data
    (:mod:`fdm.training.recipe`); otherwise 256 px and 1.
    """
    if streaming:
        options = ("options as in 'hf:PATH?split=train&column=image&streaming=1&num_images=N' (streaming needs "
                   "--cache memory or disk; see docs/training.md, Data sources)")
    else:
        options = ("options as in 'hf:PATH?split=train&column=image&num_images=N' (no streaming: this command "
                   "reads images by index; see docs/training.md, Data sources)")
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, metavar="SPEC", help=f"training images: {DATA_FORMS}; {options}")
    group.add_argument("--skip-bad-images", action="store_true",
                       help="read every image once first and leave out those that cannot be decoded, listing them "
                            "(default: stop at the first one, naming it)")
    if validation:
        group.add_argument("--val-data", metavar="SPEC",
                           help="validation images, in the forms of --data (PNG grids and metrics every --val-every "
                                "steps)")
    if recipe:
        group.add_argument("--crop-size", type=positive_int,
                           help="side of the square training crops (default: 16 latent cells, 64 px for a factor-4 "
                                "model, 256 px for factor 16)")
        group.add_argument("--views-per-image", type=positive_int,
                           help="fixed random crops per image (default: about 1024 views in all, at most 64 per image)")
    else:
        group.add_argument("--crop-size", type=positive_int, default=256,
                           help="side of the square training crops (default 256)")
        group.add_argument("--views-per-image", type=positive_int, default=1,
                           help="fixed random crops per image (default 1)")


def add_run_start_options(group: argparse._ActionsContainer) -> None:
    """Add ``--resume`` and ``--overwrite``: where a training command's run starts
    (:meth:`~fdm.training.TrainingLoop.start_point`)."""
    start = group.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in OUT from its latest checkpoint")
    start.add_argument("--overwrite", action="store_true",
                       help="replace the earlier run in OUT (its record, metrics, checkpoints and results; a feature "
                            "cache is kept)")


def open_training_source(spec: str, args: argparse.Namespace, option: str = "--data") -> ImageSource:
    """The source ``spec`` names; with ``--skip-bad-images``, without the images that do not decode (a warning lists
    them with their count).

    Raises:
        InputError: nothing at ``spec``, or (with ``--skip-bad-images``) no image of it decodes.
        UsageError: ``--skip-bad-images`` on a streamed source.
    """
    source = open_source(spec)
    if not args.skip_bad_images:
        return source
    source, unreadable = skip_unreadable(source, progress=args.progress)
    if unreadable:
        shown = ", ".join(unreadable[:10]) + (f" and {len(unreadable) - 10} more" if len(unreadable) > 10 else "")
        logger.warning("%s %s: skipped %d unreadable image%s: %s", option, spec, len(unreadable),
                       "s" if len(unreadable) != 1 else "", shown)
    return source
