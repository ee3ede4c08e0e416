"""Reconstruct an image with a diffusers ``VQModel`` without and with FDM (Park & Jung, WACV 2025), side by side.

    python examples/diffusers_vqmodel.py --vqmodel FOLDER|owner/repo|hf://owner/repo/subfolder --fdm FOLDER|owner/repo \\
        --image photo.jpg --out side_by_side.png [--size 256] [--mask holes.png] [--image-range 0 1] [--device cuda]

Writes one PNG with three panels (input | VQ reconstruction | VQ + FDM) and prints PSNR / SSIM against the
input. With ``--mask`` (white = hole) known cells keep their continuous features and only hole cells are
quantized (an oracle stand-in for a sampler), as in inpainting; FDM then corrects the hole cells only.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import fdm
from fdm.adapters.diffusers import DiffusersVQAdapter, load_model
from fdm.evaluation.metrics import psnr, ssim
from fdm.images import image_grid


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Centre-crop ``path`` to a square, resize to ``size`` and return (1, 3, size, size) in [-1, 1]."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        array = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vqmodel", required=True,
                        help="VQModel folder, saved pipeline folder, Hub repo id, or hf://owner/repo/subfolder")
    parser.add_argument("--fdm", required=True, help="FDM folder or Hub repo id (FDM.save_pretrained layout)")
    parser.add_argument("--image", required=True, help="input image (any size; centre-cropped)")
    parser.add_argument("--out", default="diffusers_fdm.png", help="output PNG (input | VQ | VQ + FDM)")
    parser.add_argument("--size", type=int, default=256, help="side length after resizing (multiple of the factor)")
    parser.add_argument("--mask", help="optional hole mask image, white = hole (resized to --size)")
    parser.add_argument("--image-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="pixel range the VQModel was trained on (default: 0 1 for aMUSEd-style models, else -1 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the comparison; returns the metrics it prints (``psnr_vq``, ``psnr_fdm``, ``ssim_vq``, ``ssim_fdm``)."""
    args = parse_args(argv)
    model = load_model(args.vqmodel).to(args.device)
    adapter = DiffusersVQAdapter(model, image_range=args.image_range)
    dequantizer = fdm.Dequantizer(model, fdm.FDM.from_pretrained(args.fdm).to(args.device), adapter=adapter)
    x = load_image(args.image, args.size).to(args.device)
    mask = fdm.load_mask(args.mask, size=(args.size, args.size)).to(args.device) if args.mask else None

    plain = dequantizer.reconstruct(x, mask, use_fdm=False)
    corrected = dequantizer.reconstruct(x, mask)
    image_grid(list(zip(x, plain, corrected)), ["input", "VQ reconstruction", "VQ + FDM"]).save(args.out)

    metrics = {
        "psnr_vq": psnr(plain, x).item(),
        "psnr_fdm": psnr(corrected, x).item(),
        "ssim_vq": ssim(plain, x).item(),
        "ssim_fdm": ssim(corrected, x).item(),
    }
    print(f"{'':10}{'PSNR (dB)':>12}{'SSIM':>10}")
    print(f"{'VQ':10}{metrics['psnr_vq']:12.2f}{metrics['ssim_vq']:10.4f}")
    print(f"{'VQ + FDM':10}{metrics['psnr_fdm']:12.2f}{metrics['ssim_fdm']:10.4f}")
    print(f"wrote {args.out}")
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
