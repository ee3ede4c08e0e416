"""Measure FDM's gain: PSNR, SSIM, feature error (+ FID, ST-LPIPS) without and with FDM over a folder of images.

Takes fixed random crops (seeded) of every image in FOLDER, reconstructs them with the base model without and
with FDM, and prints a table (or JSON with --json). Default model: the embedded demo VQGAN and its FDM.
--report DIR also writes an HTML page of every photo (original, plain VQ, with FDM, where FDM helps), PNG files and
metrics.json: DIR must be new, empty, or a previous report, which is replaced.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fdm.errors import UsageError

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fdm.commands.argtypes import positive_int
    from fdm.commands.model_options import add_model_arguments
    from fdm.precision import PRECISIONS

    parser.add_argument("folder", help="folder of images (searched recursively)")
    parser.add_argument("--crop-size", "--crop", dest="crop", type=positive_int, default=128,
                        help="crop side in pixels (default 128); any size: padded to a multiple of the model's factor "
                             "(--crop is the older name)")
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
    parser.add_argument("--report", metavar="DIR",
                        help="also write an HTML report of every photo (index.html, PNG files, metrics.json) to DIR: "
                             "a new or empty folder, or a previous report, which is replaced")
    add_model_arguments(parser)


def format_report(report: dict) -> str:
    """The report of :func:`fdm.evaluation.evaluate_views` as a plain-text table."""
    from fdm.evaluation.report import summary_rows

    lines = [f"{report['views']} views, precision {report.get('precision', 'fp32')}",
             f"{'setting':<22}{'metric':<16}{'without FDM':>12}{'with FDM':>10}"]
    lines += [f"{setting:<22}{metric:<16}{vq:>12}{fdm:>10}" for setting, metric, vq, fdm in summary_rows(report)]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from fdm.commands.model_options import family_options_given, load_base_model, load_fdm
    from fdm.dequantizer import Dequantizer
    from fdm.evaluation.comparison import evaluate_views
    from fdm.evaluation.report import check_report_dir, write_report
    from fdm.training.data import ImageFolderViews

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if args.report:
        check_report_dir(args.report)  # before the models load: the cheapest to fail
        if folder.resolve() in Path(args.report).resolve().parents:
            raise UsageError(f"--report {args.report} is inside the image folder {folder}: its PNG files would be "
                             "read as photos by the next fdm eval of that folder; expected a folder outside it.")
    fdm_module = load_fdm(args)  # first of the models: the cheapest to fail (a Hub id, a config.json)
    views = ImageFolderViews(folder, crop_size=args.crop, views_per_image=args.views_per_image, seed=args.seed,
                             scale_range=(1.0, 2.0))
    dequantizer = Dequantizer(load_base_model(args), fdm_module, load_decoder="in_place")  # a model of our own
    options = dict(batch_size=args.batch_size, holes=args.holes, seed=args.seed, extras=not args.no_extras,
                   progress=not args.no_progress, precision=args.precision)
    settings = dict(folder=str(folder), crop=args.crop, views_per_image=args.views_per_image, seed=args.seed,
                    model=args.model, precision=args.precision)
    if args.report:
        page = {**settings, "photos": len(views.files), "checkpoint": args.checkpoint, **family_options_given(args),
                "fdm": args.fdm or f"the default of --model {args.model}", "holes": args.holes,
                "extras (FID, ST-LPIPS)": not args.no_extras, "device": args.device}
        report = write_report(args.report, dequantizer, views, run=page, **options)
        logger.info("report: %s", Path(args.report) / "index.html")
    else:
        report = evaluate_views(dequantizer, views, **options)
    report.update(settings)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
