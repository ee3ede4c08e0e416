"""Train an FDM for a VQ model in the two phases of the paper (Park & Jung, WACV 2025), on a folder of images:
phase 2 (qe loss, the whole model frozen), then phase 3 (FDM and decoder fine-tuned together), and compare
the reconstructions of validation images (known cells continuous, hole cells quantized) with neither, the
phase-2 FDM, and the phase-3 FDM with its decoder.

    python examples/train_fdm.py --model taming --config vqgan.yaml --checkpoint vqgan.ckpt \\
        --train photos/train --val photos/val --out runs/vqgan \\
        --phase2-steps 5000 --phase3-steps 20000 --vgg-weights vgg19-dcbac81d.pth

Both phases are data-parallel: ``torchrun --nproc_per_node 4 examples/train_fdm.py ...`` or
``accelerate launch --multi_gpu --num_processes 4 examples/train_fdm.py ...`` run it unchanged.
The results are ``OUT/phase2`` (FDM) and ``OUT/phase3/fdm`` (FDM + ``decoder.safetensors``).
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import torch

import fdm
from fdm.commands.model_options import add_model_arguments, load_base_model
from fdm.evaluation.metrics import psnr, ssim
from fdm.masks import DEFAULT_HOLE_RATIO
from fdm.training import ImageFolderViews, Phase2Config, Phase2Trainer, init_distributed, shutdown_distributed
from fdm.training.phase3 import Phase3Config, Phase3Trainer

log = logging.getLogger("train_fdm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, fdm=False)
    parser.add_argument("--train", required=True, help="folder of training images")
    parser.add_argument("--val", required=True, help="folder of validation images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--crop-size", type=int, default=256)
    parser.add_argument("--phase2-steps", type=int, default=5000)
    parser.add_argument("--phase3-steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=8, help="images per step and process")
    parser.add_argument("--no-mask", action="store_true", help="mask-free (unconditional / class-conditional models)")
    parser.add_argument("--vgg-weights", help="torchvision's vgg19-dcbac81d.pth (default: torch's cache)")
    parser.add_argument("--no-perceptual", action="store_true", help="phase 3 without the VGG19 losses")
    parser.add_argument("--num-val-images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


@torch.no_grad()
def compare(model: torch.nn.Module, phase2: fdm.FDM, phase3: fdm.FDM, x: torch.Tensor,
            mask: torch.Tensor | None) -> dict[str, dict[str, float]]:
    """PSNR / SSIM of oracle reconstructions of ``x`` without FDM, with the phase-2 and the phase-3 FDM."""
    rows = {}
    base = fdm.Dequantizer(model, phase2)  # the original decoder
    for name, deq, use_fdm in [("VQ only", base, False), ("phase 2 FDM", base, True),
                               ("phase 3 FDM + decoder", fdm.Dequantizer(copy.deepcopy(model), phase3), True)]:
        y = deq.reconstruct(x, mask, use_fdm=use_fdm)
        rows[name] = {"psnr": psnr(y, x).mean().item(), "ssim": ssim(y, x).mean().item()}
    return rows


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]] | None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    model = load_base_model(args)
    hole_ratio = None if args.no_mask else DEFAULT_HOLE_RATIO
    train = ImageFolderViews(args.train, crop_size=args.crop_size, seed=args.seed)
    val = ImageFolderViews(args.val, crop_size=args.crop_size, seed=args.seed, flip=False)
    try:
        # phase 2: the qe loss against the frozen model
        config2 = Phase2Config(steps=args.phase2_steps, batch_size=args.batch_size, hole_ratio=hole_ratio,
                               seed=args.seed, device=args.device, progress=not args.no_progress,
                               output_dir=str(out / "phase2"), base_model=f"{args.model}:{args.checkpoint}")
        phase2 = Phase2Trainer(model, train, config2).train()

        # phase 3: FDM + decoder; the trainer changes the model's decoder in place, keep the original to compare
        original = copy.deepcopy(model)
        config3 = Phase3Config(steps=args.phase3_steps, batch_size=args.batch_size, hole_ratio=hole_ratio,
                               vgg_weights=args.vgg_weights, drop_vgg_terms=args.no_perceptual, seed=args.seed,
                               device=args.device, output_dir=str(out / "phase3"),
                               num_val_images=args.num_val_images, progress=not args.no_progress)
        Phase3Trainer(model, copy.deepcopy(phase2), train, config3, val_views=val).train()
        if not init_distributed(args.device).is_main:
            return None

        # compare on validation images, as the files on disk load them
        phase2 = fdm.FDM.from_pretrained(out / "phase2").to(args.device)
        phase3 = fdm.FDM.from_pretrained(out / "phase3" / "fdm").to(args.device)
        n = min(args.num_val_images, len(val))
        x = torch.stack([val[i] for i in range(n)]).to(args.device)
        mask = None
        if hole_ratio is not None:
            g = torch.Generator().manual_seed(args.seed + 1)
            size = x.shape[-1]
            mask = torch.stack([fdm.random_irregular_mask(size, size, hole_ratio, generator=g) for _ in range(n)])
            mask = mask.to(args.device)
        rows = compare(original, phase2, phase3, x, mask)
        print(f"{'reconstruction':<24}{'PSNR (dB)':>10}{'SSIM':>8}")
        for name, row in rows.items():
            print(f"{name:<24}{row['psnr']:>10.2f}{row['ssim']:>8.4f}")
        return rows
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
