"""Per-image benchmark of docs/quality.md: PSNR and ST-LPIPS of the embedded demo VQGAN without and with the
shipped FDM, for each photo of a folder at several scales (and the three demo images), to tell whether the
change in ST-LPIPS follows the scale of an image or its content. Prints one table (optionally writes JSON).

    python benchmarks/detail_by_image.py ../shared/data/photos/val

Views of each photo: the whole photo resized (shorter side to each ``--sizes`` value, bicubic, centre square) and a
centre square at native resolution (``--native``). Needs the taming and eval extras.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fdm import Dequantizer
from fdm.demo.model import load_demo_fdm, load_demo_vqgan
from fdm.demo.run import SAMPLE_IMAGES, load_sample
from fdm.evaluation.comparison import compare
from fdm.evaluation.metrics import load_stlpips
from fdm.images import read_image
from fdm.training import list_images


def _centre_square(x: torch.Tensor, side: int) -> torch.Tensor:
    """The centre ``side`` x ``side`` square of a (1, 3, H, W) image."""
    top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
    return x[..., top:top + side, left:left + side]


def _views(path: Path, sizes: list[int], native: int) -> list[tuple[str, torch.Tensor]]:
    """(label, (1, 3, S, S) image) for each view of one photo; views larger than the photo are left out."""
    photo = read_image(path)
    short = min(photo.shape[-2:])
    views = []
    for size in sizes:
        if size <= short:
            scale = size / short
            whole = F.interpolate(photo, size=[max(size, round(s * scale)) for s in photo.shape[-2:]],
                                  mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
            views.append((f"whole, {size} px", _centre_square(whole, size)))
    if 0 < native <= short:
        views.append((f"native, {native} px", _centre_square(photo, native)))
    return views


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 384],
                        help="shorter side of the resized whole photo, multiples of 4 (default: 160 384)")
    parser.add_argument("--native", type=int, default=160, help="centre square at native resolution (0: none)")
    parser.add_argument("--no-demo-images", action="store_true", help="leave out the three demo images")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if any(size % 4 for size in args.sizes + [args.native]):
        parser.error(f"sizes must be multiples of 4 (the VQGAN's factor), got {args.sizes} and --native {args.native}")
    torch.set_num_threads(args.threads)
    dequantizer, stlpips = Dequantizer(load_demo_vqgan(), load_demo_fdm()), load_stlpips()

    images = [] if args.no_demo_images else [(f"demo: {name}", [("as shipped", load_sample(name))])
                                              for name in SAMPLE_IMAGES]
    images += [(path.name, _views(path, args.sizes, args.native)) for path in list_images(args.folder)]
    rows = []
    for name, views in images:
        for view, x in views:
            result = compare(dequantizer, x)
            before, after = (stlpips(x, y).flatten().item() for y in (result.vq, result.fdm))
            rows.append({"image": name, "view": view, "psnr_vq": result.psnr_vq.item(),
                         "psnr_fdm": result.psnr_fdm.item(), "stlpips_vq": before, "stlpips_fdm": after})

    width = max(len(row["image"]) for row in rows) + 2
    print(f"{'image':<{width}}{'view':<18}{'PSNR VQ':>8}{'FDM':>7}{'gain':>7}{'ST-LPIPS VQ':>12}{'FDM':>8}{'change':>8}")
    for row in rows:
        print(f"{row['image']:<{width}}{row['view']:<18}{row['psnr_vq']:8.2f}{row['psnr_fdm']:7.2f}"
              f"{row['psnr_fdm'] - row['psnr_vq']:+7.2f}{row['stlpips_vq']:12.4f}{row['stlpips_fdm']:8.4f}"
              f"{row['stlpips_fdm'] - row['stlpips_vq']:+8.4f}")
    signs = {}
    for row in rows:
        signs.setdefault(row["image"], set()).add(row["stlpips_fdm"] > row["stlpips_vq"])
    worse = sorted(name for name, s in signs.items() if s == {True})
    consistent = sum(len(s) == 1 for s in signs.values())
    print(f"ST-LPIPS moves the same way at every view for {consistent} of {len(signs)} images; "
          f"worse at every view with FDM: {', '.join(worse) or 'none'}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "worse_at_every_view": worse}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
