"""Quality benchmark: FDM (Park & Jung, WACV 2025) against the plain VQ reconstruction and against what a user could
do instead with the same data and budget (a decoder fine-tuned on quantized features, a doubled codebook), on
fixed random crops of a folder of photos. Prints one table (optionally writes JSON).

    python benchmarks/quality.py ../shared/data/photos/val \
        --decoder-baseline runs/decoder-baseline --codebook-baseline runs/codebook-baseline \
        --decoder-control runs/decoder-control --fdm-variant "phase 2 only=runs/fdm-phase2"

Baselines are VQGAN folders (``vqgan.yaml`` + ``vqgan.safetensors``) written by examples/train_demo_model.py;
each is skipped when its folder is missing. The control (decoder fine-tuned on ``z`` itself, same budget) shows how
much of the baselines' gain is further training of the decoder rather than a better use of the codes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fdm import FDM, Dequantizer
from fdm.adapters.taming import load_model
from fdm.demo.evaluation import evaluate_views
from fdm.demo.model import load_demo_fdm, load_demo_vqgan
from fdm.training.data import ImageFolderViews

# (--option, method, note): VQGAN folders written by examples/train_demo_model.py, evaluated without FDM
BASELINES = (
    ("decoder_baseline", "decoder fine-tuned on z_q", "same size; replaces the decoder"),
    ("codebook_baseline", "codebook doubled", "new codes: the transformer must be retrained"),
    ("decoder_control", "decoder fine-tuned on z (control)", "decodes z_q, never trained on it"),
)


def _evaluate(model: torch.nn.Module, module: FDM, views, args) -> dict:
    """evaluate_views of ``model`` + ``module`` with the command line's batch size, extras and progress."""
    return evaluate_views(Dequantizer(model, module), views, batch_size=args.batch_size, extras=not args.no_extras,
                          progress=not args.no_progress)


def _plain(model: torch.nn.Module, views, args) -> dict:
    """Reconstruction metrics of a model without FDM: a fresh FDM is an exact identity (zero-initialised head), so
    the evaluation's "fdm" column equals its "vq" column; the "vq" column is used."""
    identity = FDM(model.post_quant_conv.in_channels, hidden_channels=2, num_blocks=0)
    return _evaluate(model, identity, views, args)["settings"]["reconstruction"]


def _row(name: str, metrics: dict, column: str, added: int, base_psnr: float, feature_ratio: float | None,
         note: str = "") -> dict:
    """One table row from ``metrics[...][column]``. ``feature_ratio``: ||z - z_dq|| / ||z - z_q|| against the
    embedded model's codes (None for a baseline with another codebook or decoder: not comparable)."""
    row = {"method": name, "added_params": added, "note": note, "feature_ratio": feature_ratio}
    for key in ("psnr", "ssim", "stlpips", "fid"):
        if key in metrics:
            row[key] = metrics[key][column]
    row["psnr_gain"] = row["psnr"] - base_psnr
    row["gain_per_100k_params"] = row["psnr_gain"] / added * 1e5 if added else None
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--views-per-image", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--decoder-baseline", type=Path, default=Path("runs/decoder-baseline"))
    parser.add_argument("--codebook-baseline", type=Path, default=Path("runs/codebook-baseline"))
    parser.add_argument("--decoder-control", type=Path, default=Path("runs/decoder-control"))
    parser.add_argument("--fdm-variant", action="append", default=[], metavar="LABEL=FOLDER",
                        help="another FDM for the embedded VQGAN (save_pretrained folder), one more row")
    parser.add_argument("--no-extras", action="store_true", help="skip FID and ST-LPIPS")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    views = ImageFolderViews(args.folder, crop_size=args.crop, views_per_image=args.views_per_image, seed=args.seed,
                             scale_range=(1.0, 2.0))
    base, fdm_module = load_demo_vqgan(), load_demo_fdm()
    report = _evaluate(base, fdm_module, views, args)
    recon = report["settings"]["reconstruction"]
    base_psnr = recon["psnr"]["vq"]
    rows = [_row("VQGAN (plain)", recon, "vq", 0, base_psnr, 1.0),
            _row("VQGAN + FDM (shipped)", recon, "fdm", sum(p.numel() for p in fdm_module.parameters()), base_psnr,
                 recon["feature_ratio"])]
    for variant in args.fdm_variant:
        label, _, folder = variant.partition("=")
        module = FDM.from_pretrained(folder)
        metrics = _evaluate(base, module, views, args)["settings"]["reconstruction"]
        rows.append(_row(f"VQGAN + FDM ({label})", metrics, "fdm", sum(p.numel() for p in module.parameters()),
                         base_psnr, metrics["feature_ratio"]))
    for option, name, note in BASELINES:
        folder = getattr(args, option)
        if not (folder / "vqgan.safetensors").is_file():
            continue
        model = load_model(folder / "vqgan.yaml", folder / "vqgan.safetensors")
        metrics = _plain(model, views, args)
        added = model.quantize.embedding.weight.numel() - base.quantize.embedding.weight.numel()
        rows.append(_row(name, metrics, "vq", added, base_psnr, None,
                         note=f"{note}; its decode(z): {metrics['psnr_continuous']:.2f} dB"))
    rows.append({"method": "decoding z unquantized", "added_params": None, "psnr": recon["psnr_continuous"],
                 "psnr_gain": recon["psnr_continuous"] - base_psnr, "feature_ratio": 0.0,
                 "note": "bound of any feature correction"})
    width = max(len(row["method"]) for row in rows) + 2
    cols = [("method", width, "s"), ("added_params", 13, "d"), ("psnr", 8, ".2f"), ("psnr_gain", 11, "+.2f"),
            ("gain_per_100k_params", 22, ".2f"), ("ssim", 7, ".3f"), ("feature_ratio", 14, ".3f"),
            ("stlpips", 9, ".4f"), ("fid", 9, ".2f")]
    print(f"{report['views']} views ({args.crop} px crops of {args.folder}, seed {args.seed})")
    print("".join(f"{name:>{w}}" if fmt != "s" else f"{name:<{w}}" for name, w, fmt in cols))
    for row in rows:
        cells = []
        for name, w, fmt in cols:
            value = row.get(name)
            text = "-" if value is None else format(value, fmt)
            cells.append(f"{text:<{w}}" if fmt == "s" else f"{text:>{w}}")
        print("".join(cells) + (f"  ({row['note']})" if row["note"] else ""))
    for note in report["notes"]:
        print(f"note: {note}")
    if args.json:
        args.json.write_text(json.dumps({"views": report["views"], "rows": rows, "notes": report["notes"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
