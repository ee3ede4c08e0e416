"""Command-line options that name the training images and their crops, shared by `fdm train` and `fdm finetune`."""

from __future__ import annotations

import argparse

from fdm.commands.argtypes import positive_int
from fdm.training.sources import DATA_FORMS

__all__ = ["add_data_arguments"]



def add_data_arguments(
    parser: argparse.ArgumentParser, *, streaming: bool, validation: bool = False, recipe: bool = False
) -> None:
    """Add ``--data``, ``--crop-size`` and ``--views-per-image`` (and ``--val-data``) in a "data" group.

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
