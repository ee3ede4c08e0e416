"""Inpaint images with PUT (CVPR 2022), with and without FDM (WACV 2025): N completions per image as PNGs.

Mask files are white = hole by default (PConv masks); pass --white-is-known for PUT's own sample masks. A mask
must have its image's size (--resize-mask stretches it to the image's); --size resizes both.
Writes NAME_sampleK.png (FDM-corrected when an FDM is available), NAME_sampleK_without_fdm.png, and
NAME_compare.png (masked input, then each sample without | with FDM). The FDM comes from --fdm, or from
the --checkpoint itself when it is an FDM-authors checkpoint holding fdm.mix.* weights.

(The PUT family's own ``fdm inpaint`` sub-command, declared in ``fdm.adapters.put.FAMILY``.)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from fdm.commands.argtypes import positive_float, positive_int
from fdm.commands.model_options import add_model_arguments, load_base_model
from fdm.errors import InputError, UsageError
from fdm.images import image_size, read_image, save_image
from fdm.masks import load_mask
from fdm.module import FDM

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.set_defaults(model="put")
    io = parser.add_argument_group("inpainting")
    io.add_argument("--image", nargs="+", required=True, help="image file(s)")
    io.add_argument("--mask", nargs="+", required=True, help="mask file(s): one per image, or one for all")
    io.add_argument("--out", required=True, help="output folder")
    io.add_argument("--white-is-known", action="store_true", help="mask files use white = known (PUT's samples)")
    io.add_argument("--size", nargs=2, type=positive_int, metavar=("H", "W"),
                    help="resize image and mask (multiples of 8)")
    io.add_argument("--resize-mask", action="store_true",
                    help="resize a mask whose size differs from its image's to the image's (nearest neighbour); "
                         "without it such a mask is refused")
    io.add_argument("--num-samples", type=positive_int, default=4)
    io.add_argument("--top-k", type=positive_int, default=50, help="codes kept per cell before drawing (1 = greedy)")
    io.add_argument("--temperature", type=positive_float, default=1.0)
    io.add_argument("--cells-per-step", type=positive_int, default=1, help="cells filled per pass (1 = PUT, exact)")
    io.add_argument("--seed", type=int, default=0)
    io.add_argument("--no-paste", action="store_true", help="do not paste the known pixels back")
    io.add_argument("--no-progress", action="store_true")


def _fdm_for(args: argparse.Namespace) -> FDM | None:
    if args.fdm:
        return FDM.from_pretrained(args.fdm)
    from fdm.adapters.put.checkpoints import split_checkpoint
    from fdm.io.hub import resolve_file

    official = split_checkpoint(resolve_file(args.checkpoint))["fdm"]
    if official:
        return FDM.from_official_checkpoint(official)
    logger.info("no FDM given (--fdm) and none in the checkpoint: writing PUT's completions only")
    return None


def read_inputs(image_path: str, mask_path: str, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """One (image, hole mask) pair, (1, 3, H, W) and (1, 1, H, W), at ``--size`` if given.

    Raises:
        InputError: a file is missing or unreadable, or the mask's size differs from the image's without
            ``--resize-mask``.
    """
    image_hw = image_size(image_path)
    mask_hw = image_size(mask_path, "mask")
    if mask_hw != image_hw and not args.resize_mask:
        raise InputError(f"mask {mask_path} is {mask_hw[1]}x{mask_hw[0]} but image {image_path} is "
                         f"{image_hw[1]}x{image_hw[0]} (width x height); give a mask of the image's size, or "
                         "--resize-mask to stretch it to the image.")
    size = tuple(args.size) if args.size else image_hw
    image = read_image(image_path, size if args.size else None)
    mask = load_mask(mask_path, size if size != mask_hw else None, white_is_hole=not args.white_is_known)
    return image, mask


def run(args: argparse.Namespace) -> int:
    if args.model != "put":
        raise UsageError(f"fdm inpaint works with --model put (got --model {args.model}).")
    from fdm.adapters.put.inpaint import inpaint

    if len(args.mask) not in (1, len(args.image)):
        raise UsageError(f"give one mask, or one per image; got {len(args.mask)} masks for {len(args.image)} images.")
    masks = args.mask * len(args.image) if len(args.mask) == 1 else args.mask
    pairs = list(zip(args.image, masks))
    for image_path, mask_path in pairs:  # every file checked before the model is loaded
        read_inputs(image_path, mask_path, args)
    model = load_base_model(args)
    fdm_module = _fdm_for(args)
    if fdm_module is not None:
        fdm_module = fdm_module.to(args.device).eval()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, (image_path, mask_path) in enumerate(pairs):
        image, mask = (t.to(args.device) for t in read_inputs(image_path, mask_path, args))
        result = inpaint(model, image, mask, args.num_samples, top_k=args.top_k, fdm=fdm_module,
                         temperature=args.temperature, cells_per_step=args.cells_per_step, seed=args.seed + index,
                         paste_known=not args.no_paste, progress=not args.no_progress)
        stem = Path(image_path).stem
        masked = torch.where(mask.bool(), torch.ones_like(image), image)[0]  # holes shown white
        columns = [masked]
        for k in range(args.num_samples):
            save_image(result.images[0, k], out_dir / f"{stem}_sample{k}.png")
            if result.images_without_fdm is not None:
                save_image(result.images_without_fdm[0, k], out_dir / f"{stem}_sample{k}_without_fdm.png")
                columns.append(result.images_without_fdm[0, k])
            columns.append(result.images[0, k])
        save_image(torch.cat(columns, dim=-1), out_dir / f"{stem}_compare.png")
        logger.info("%s: %d completions written to %s", image_path, args.num_samples, out_dir)
    return 0
