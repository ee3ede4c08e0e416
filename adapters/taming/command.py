"""Sample a taming-transformers model with FDM and write PNG grids (unconditional, class, semantic).

(The taming family's own ``fdm sample`` sub-command, declared in ``fdm.adapters.taming.FAMILY``.)

Examples:
  fdm sample unconditional --config ffhq/configs/2021-04-23T18-19-01-project.yaml \\
      --checkpoint ffhq/checkpoints/last.ckpt --fdm user/fdm-ffhq --num-samples 16 --out samples/
  fdm sample class --config cin/configs/model.yaml --checkpoint cin/last.ckpt --fdm user/fdm-imagenet \\
      --classes 1 88 207 --per-class 4 --out samples/
  fdm sample semantic --config ade20k/model.yaml --checkpoint ade20k/last.ckpt --fdm user/fdm-ade20k \\
      --segmentation ADE_val_00000001.png --out samples/
  Add --no-fdm for the baseline (taming's decode unchanged).

Writes OUT/grid.png and OUT/sample_NNNN.png.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from fdm.commands.argtypes import non_negative_int, positive_float, positive_int, unit_interval
from fdm.commands.model_options import add_model_arguments
from fdm.errors import InputError, UsageError
from fdm.images import open_image
from fdm.limits import current as current_limits

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)

TASKS = ("unconditional", "class", "semantic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    helps = {"unconditional": "SOS-token models (FFHQ)", "class": "class-conditional models (ImageNet cin)",
             "semantic": "segmentation-conditional models (ADE20K)"}
    for task in TASKS:
        sub = tasks.add_parser(task, help=helps[task])
        add_model_arguments(sub)
        sub.set_defaults(model="taming")
        options = sub.add_argument_group("sampling")
        options.add_argument("--out", required=True, type=Path, help="output folder")
        options.add_argument("--no-fdm", action="store_true", help="decode without FDM (the baseline)")
        options.add_argument("--batch-size", type=positive_int, default=8)
        options.add_argument("--temperature", type=positive_float, default=1.0)
        options.add_argument("--top-k", type=positive_int, default=None, help="keep the k most likely codes")
        options.add_argument("--top-p", type=unit_interval, default=None, help="nucleus sampling threshold")
        options.add_argument("--seed", type=int, default=0)
        options.add_argument("--nrow", type=positive_int, default=None, help="images per grid row")
        options.add_argument("--no-progress", action="store_true", help="hide progress bars")
        if task == "unconditional":
            options.add_argument("--num-samples", type=positive_int, default=16)
        elif task == "class":
            options.add_argument("--classes", type=non_negative_int, nargs="+", required=True, help="class ids")
            options.add_argument("--per-class", type=positive_int, default=1, help="samples per class id")
        else:
            options.add_argument("--segmentation", type=Path, nargs="+", required=True,
                                 help="label-map PNGs (pixel value = class id) or .npy arrays, all the same size")
            options.add_argument("--window", type=positive_int, default=16, help="sliding window in codes")


def read_label_maps(paths: list[Path]) -> torch.Tensor:
    """Read label maps (PNG with one channel of class ids, or .npy) -> (B, H, W) long tensor.

    Raises:
        InputError: a missing or unreadable file, a map that is not 2-D, larger than ``fdm.limits``
            ``max_label_map_pixels`` (a .npy file is memory-mapped and checked before anything is copied),
            not of integers (or of floats holding whole numbers), or with negative values.
    """
    maps = []
    for path in paths:
        if path.suffix == ".npy":
            if not path.is_file():
                raise InputError(f"Segmentation file not found: {path}")
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)  # nothing read into memory yet
            except (OSError, ValueError) as err:
                raise InputError(f"Cannot read segmentation file {path}: {err}") from err
        else:
            with open_image(path, "segmentation") as img:
                array = np.asarray(img)
        if array.ndim != 2:
            raise InputError(f"{path}: a label map must have one channel (class ids); got shape {array.shape}.")
        if array.size > (most := current_limits().max_label_map_pixels):
            raise InputError(f"{path}: a label map of {array.shape[0]}x{array.shape[1]} is larger than the "
                             f"{most} pixels read (fdm.limits).")
        if array.dtype.kind not in "iuf":
            raise InputError(f"{path}: a label map holds class ids (integers); got dtype {array.dtype}.")
        if array.size and array.dtype.kind == "f" and not (np.isfinite(array).all() and (array == np.round(array)).all()):
            raise InputError(f"{path}: a label map of floats must hold whole numbers (class ids); it holds NaN, "
                             "Inf or fractions.")
        if array.size and array.min() < 0:
            raise InputError(f"{path}: class ids cannot be negative; got {array.min()}.")
        maps.append(torch.from_numpy(np.array(array, dtype=np.int64)))
    if len({m.shape for m in maps}) > 1:
        raise InputError(f"All segmentation maps must have the same size; got {sorted({tuple(m.shape) for m in maps})}.")
    return torch.stack(maps)


def run(args: argparse.Namespace) -> int:
    if args.model != "taming":
        raise UsageError(f"fdm sample works with taming transformers (--model taming); got --model {args.model}.")
    from fdm.adapters.taming.sampling import (
        decode_indices,
        sample_class,
        sample_semantic,
        sample_unconditional,
    )
    from fdm.commands.model_options import load_base_model, load_fdm
    from fdm.images import save_grid, save_images

    fdm_module = None if args.no_fdm else load_fdm(args)  # first: the cheapest to fail
    model = load_base_model(args)
    options = {"batch_size": args.batch_size, "temperature": args.temperature, "top_k": args.top_k,
               "top_p": args.top_p, "seed": args.seed, "progress": not args.no_progress}
    if args.task == "unconditional":
        indices = sample_unconditional(model, args.num_samples, **options)
    elif args.task == "class":
        ids = torch.tensor(args.classes).repeat_interleave(args.per_class)
        indices = sample_class(model, ids, **options)
    else:
        indices = sample_semantic(model, read_label_maps(args.segmentation), window=args.window, **options)
    images = decode_indices(model, indices, fdm_module, batch_size=args.batch_size)
    grid = save_grid(images, args.out / "grid.png", args.nrow)
    save_images(images, args.out)
    logger.info("wrote %d samples (%s FDM) and %s", images.shape[0], "without" if args.no_fdm else "with", grid)
    return 0
