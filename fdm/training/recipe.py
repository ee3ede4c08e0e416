"""The default phase-2 recipe: FDM size, learning rate and training views chosen from the base model and the data,
measured on the demo VQGAN to help at any budget (docs/training.md, "The default recipe").

The paper trains a 256-wide, 8-block FDM on 256-channel features with a peak rate of 2e-4 for days. Here the
FDM keeps the paper's architecture (8 residual blocks) with a trunk at least :data:`MIN_WIDTH` wide (a trunk as
narrow as a small model's 16 channels learns almost nothing), a higher peak rate for short runs,
a warm-up and decay proportional to the run's length, and several fixed views per image, so that a few photos
still give hundreds of different training crops.
"""

from __future__ import annotations

import math

__all__ = [
    "CACHE_SHARE",
    "HELDOUT_CROP",
    "LATENT_SIDE",
    "MAX_VIEWS_PER_IMAGE",
    "MAX_WIDTH",
    "MIN_WIDTH",
    "RECIPE_BATCH",
    "RECIPE_LR",
    "TARGET_VIEWS",
    "VIEW_SCALE_RANGE",
    "WARMUP_FRACTION",
    "crop_size_for",
    "fdm_width",
    "views_per_image_for",
]

MIN_WIDTH = 32
"""Narrowest default FDM trunk; models with more channels get a trunk as wide as their channel count (the paper)."""
MAX_WIDTH = 256
"""Widest default FDM trunk (the paper's, at 256 channels)."""
RECIPE_LR = 2e-3
"""Default peak learning rate (the paper's 2e-4 suits its week-long runs; short runs need more)."""
RECIPE_BATCH = 8
"""Default views per step (8 and 16 learned about as much in 4 minutes: docs/training.md)."""
WARMUP_FRACTION = 0.05
"""Fraction of a run spent warming the learning rate up, whatever its length."""
TARGET_VIEWS = 1024
"""Training views per epoch the default aims at (more views per image when there are few images)."""
MAX_VIEWS_PER_IMAGE = 64
"""Most default views of one image."""
LATENT_SIDE = 16
"""Default training crops cover this many latent cells per side (64 px at factor 4, 256 px at factor 16)."""
VIEW_SCALE_RANGE = (1.0, 2.0)
"""Default scale range of the training views (shorter image side in units of the crop), as in ``fdm eval``."""
CACHE_SHARE = 0.25
"""Most of a time budget (``--minutes``) the default views' feature cache may take."""
HELDOUT_CROP = 128
"""Smallest crop side of the held-out views (``fdm eval``'s default crop)."""


def fdm_width(channels: int) -> int:
    """Default FDM trunk width for a model whose quantized features have ``channels`` channels."""
    return min(MAX_WIDTH, max(MIN_WIDTH, channels))


def crop_size_for(factor: int) -> int:
    """Default training crop side for a model with downsampling factor ``factor`` (``LATENT_SIDE`` cells)."""
    return LATENT_SIDE * factor


def views_per_image_for(num_images: int, *, budget_seconds: float | None = None,
                        seconds_per_view: float | None = None) -> int:
    """Default fixed views per image: about :data:`TARGET_VIEWS` in all, 1 to :data:`MAX_VIEWS_PER_IMAGE` each; with
    a time budget and the measured cost of one view's features, no more than fill :data:`CACHE_SHARE` of it."""
    if num_images < 1:
        raise ValueError(f"need at least one image; got {num_images}.")
    per_image = max(1, min(MAX_VIEWS_PER_IMAGE, math.ceil(TARGET_VIEWS / num_images)))
    if budget_seconds is not None and seconds_per_view:
        affordable = math.floor(CACHE_SHARE * budget_seconds / seconds_per_view / num_images)
        per_image = max(1, min(per_image, affordable))
    return per_image
