"""Quality benchmark of docs/quality.md: plain VQ, FDM (Park & Jung, WACV 2025) trained three ways, decoder-only
fine-tuning with the same losses and budget, and decoding ``z`` unquantized (the bound), on fixed random crops of a
folder of photos. Prints one table (optionally writes JSON).

    python benchmarks/quality.py ../shared/data/photos/val --views-per-image 32

Every row starts from the embedded demo VQGAN. The FDM folders are written by examples/train_demo_model.py
(``fdm``, ``fdm-addon``, ``fdm-joint``, ``decoder-only``); a row whose folder is missing is skipped. Inference time
ratio: reconstruction time of a batch with the row's FDM over the plain model's, measured in this run (median of
repeats). Training time: the wall time recorded in each FDM's training record (phase 2 + phase 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fdm import FDM, Dequantizer
from fdm.demo.model import load_demo_vqgan
from fdm.evaluation.comparison import evaluate_views
from fdm.training.data import ImageFolderViews

# (label, option, column of evaluate_views to read, note)
ROWS = (
    ("phase-2 FDM", "phase2", "fdm", "qe loss only, base model frozen"),
    ("add-on FDM", "addon", "fdm", "phase 2 + image losses through the frozen decoder"),
    ("FDM + decoder (paper)", "joint", "fdm", "phase 2 + phase 3: FDM and decoder jointly"),
    ("decoder-only fine-tuning", "decoder_only", "vq", "ablation: same losses and budget, no FDM"),
)
COLUMNS = [("psnr", 8, ".2f"), ("psnr_gain", 7, "+.2f"), ("ssim", 7, ".3f"), ("stlpips", 9, ".4f"),
           ("fid", 8, ".1f"), ("feature_ratio", 8, ".3f"), ("added_params", 9, "d"), ("time_ratio", 7, ".2f"),
           ("train_s", 8, ".0f")]
HEADERS = {"psnr": "PSNR", "psnr_gain": "gain", "ssim": "SSIM", "stlpips": "ST-LPIPS", "fid": "FID",
           "feature_ratio": "ratio", "added_params": "params", "time_ratio": "time", "train_s": "train s"}


def _reconstruct_seconds(deq: Dequantizer, x: torch.Tensor, use_fdm: bool, repeats: int) -> float:
    """Median wall time of one ``deq.reconstruct(x)`` after a warm-up call."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            deq.reconstruct(x, use_fdm=use_fdm)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _training_seconds(module: FDM) -> float | None:
    """Wall time recorded by the trainers: phase 2 (if the FDM started there) plus phase 3."""
    info = module.training_info or {}
    parts = [info.get("seconds"), (info.get("phase3") or {}).get("seconds")]
    parts = [p for p in parts if p is not None]
    return sum(parts) if parts else None


def _evaluate_row(label: str, folder: Path, column: str, views, args, x_timing: torch.Tensor) -> tuple[dict, dict]:
    """The row of the FDM in ``folder`` (``column``: "fdm", or "vq" for a row whose FDM is an identity) and the
    whole evaluate_views report."""
    module = FDM.from_pretrained(folder)
    deq = Dequantizer(load_demo_vqgan(), module)  # a fresh base model: a phase-3 row brings its own decoder
    report = evaluate_views(deq, views, batch_size=args.batch_size, extras=not args.no_extras,
                            progress=not args.no_progress)
    metrics = report["settings"]["reconstruction"]
    row = {"method": label, **{k: metrics[k][column] for k in ("psnr", "ssim", "stlpips", "fid") if k in metrics}}
    row["feature_ratio"] = metrics["feature_ratio"] if column == "fdm" else 1.0
    row["added_params"] = sum(p.numel() for p in module.parameters()) if column == "fdm" else 0
    row["time_ratio"] = (_reconstruct_seconds(deq, x_timing, column == "fdm", args.timing_repeats)
                         / _reconstruct_seconds(deq, x_timing, False, args.timing_repeats))
    row["train_s"] = _training_seconds(module)
    return row, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--views-per-image", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--phase2", type=Path, default=Path("runs/fdm-phase2"))
    parser.add_argument("--addon", type=Path, default=Path("runs/fdm-addon"))
    parser.add_argument("--joint", type=Path, default=Path("runs/fdm-joint"))
    parser.add_argument("--decoder-only", type=Path, default=Path("runs/decoder-only"))
    parser.add_argument("--no-extras", action="store_true", help="skip FID and ST-LPIPS")
    parser.add_argument("--timing-repeats", type=int, default=5,
                        help="timed reconstructions per row and setting, after a warm-up (median; default 5)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    views = ImageFolderViews(args.folder, crop_size=args.crop, views_per_image=args.views_per_image, seed=args.seed,
                             scale_range=(1.0, 2.0))
    x_timing = torch.stack([views[i] for i in range(min(8, len(views)))])
    rows, notes, plain, bound = [], [], None, None
    for label, option, column, note in ROWS:
        folder = getattr(args, option)
        if not (folder / "config.json").is_file():
            notes.append(f"{label}: skipped, no FDM folder at {folder}")
            continue
        row, report = _evaluate_row(label, folder, column, views, args, x_timing)
        if plain is None:  # the first row's "vq" column is the plain model (phase 2 does not touch the decoder)
            metrics = report["settings"]["reconstruction"]
            notes += report["notes"]
            plain = {"method": "plain VQ", **{k: metrics[k]["vq"] for k in ("psnr", "ssim", "stlpips", "fid")
                                              if k in metrics},
                     "feature_ratio": 1.0, "added_params": 0, "time_ratio": 1.0, "train_s": None}
            bound = {"method": "decode(z), the bound", "psnr": metrics["psnr_continuous"], "feature_ratio": 0.0}
            rows.append(plain)
        rows.append(row | {"note": note})
    if plain is None:
        print("no FDM folder found; train them with examples/train_demo_model.py (see docs/demo.md)", file=sys.stderr)
        return 2
    rows.append(bound)
    for row in rows:
        row["psnr_gain"] = row["psnr"] - plain["psnr"]
    width = max(len(row["method"]) for row in rows) + 2
    print(f"{len(views)} views ({args.crop} px crops of {args.folder}, seed {args.seed}); FID over {len(views)} views "
          "is biased upwards at this size: compare rows, not with published FIDs")
    print(f"{'method':<{width}}" + "".join(f"{HEADERS[name]:>{w + 1}}" for name, w, _ in COLUMNS))
    for row in rows:
        cells = ["-" if row.get(name) is None else format(row[name], fmt) for name, _, fmt in COLUMNS]
        print(f"{row['method']:<{width}}" + "".join(f"{c:>{w + 1}}" for c, (_, w, _) in zip(cells, COLUMNS)))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        args.json.write_text(json.dumps({"views": len(views), "rows": rows, "notes": notes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
