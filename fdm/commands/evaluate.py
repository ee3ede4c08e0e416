"""Measure FDM's gain: PSNR, SSIM, feature error (+ FID, ST-LPIPS) without and with FDM over a folder of images.

Takes fixed random crops (seeded) of every image in FOLDER, reconstructs them with the base model without and
with FDM, and prints a table (or JSON with --json). Default model: the embedded demo VQGAN and its FDM.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fdm.commands.argtypes import positive_int
    from fdm.commands.model_options import add_model_arguments
    from fdm.precision import PRECISIONS

    parser.add_argument("folder", help="folder of images (searched recursively)")
    parser.add_argument("--crop", type=positive_int, default=128, help="crop side in pixels (default 128)")
    parser.add_argument("--views-per-image", type=positive_int, default=4, help="random crops per image (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops and hole masks (default 0)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--holes", action="store_true",
                        help="also evaluate oracle inpainting with random irregular holes")
    parser.add_argument("--no-extras", action="store_true", help="skip FID and ST-LPIPS")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="run the models in float32 (default), bfloat16 or float16 autocast; the metrics are "
                             "computed in float32")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_model_arguments(parser)


def format_report(report: dict) -> str:
    """The report of :func:`fdm.evaluation.evaluate_views` as a plain-text table."""
    lines = [f"{report['views']} views, precision {report.get('precision', 'fp32')}",
             f"{'setting':<22}{'metric':<16}{'without FDM':>12}{'with FDM':>10}"]
    for setting, metrics in report["settings"].items():
        for name, value in metrics.items():
            if name == "feature_ratio":
                lines.append(f"{setting:<22}{'feature error':<16}{1.0:>12.3f}{value:>10.3f}")
            elif name == "psnr_continuous":
                lines.append(f"{setting:<22}{'psnr decode(z)':<16}{value:>12.4f}{'(bound)':>10}")
            else:
                lines.append(f"{setting:<22}{name:<16}{value['vq']:>12.4f}{value['fdm']:>10.4f}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from fdm.commands.model_options import load_base_model, load_fdm
    from fdm.dequantizer import Dequantizer
    from fdm.evaluation import evaluate_views
    from fdm.training.data import ImageFolderViews

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    fdm_module = load_fdm(args)  # first: the cheapest to fail (a Hub id, a config.json)
    views = ImageFolderViews(folder, crop_size=args.crop, views_per_image=args.views_per_image, seed=args.seed,
                             scale_range=(1.0, 2.0))
    dequantizer = Dequantizer(load_base_model(args), fdm_module, load_decoder="in_place")  # a model of our own
    report = evaluate_views(dequantizer, views, batch_size=args.batch_size, holes=args.holes, seed=args.seed,
                            extras=not args.no_extras, progress=not args.no_progress, precision=args.precision)
    report.update(folder=str(folder), crop=args.crop, views_per_image=args.views_per_image, seed=args.seed,
                  model=args.model, precision=args.precision)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
