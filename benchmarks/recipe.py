"""How the default `fdm train` recipe does with the budget and the number of photos, on the embedded demo VQGAN.

Each run is the command a user types, `fdm train --data PHOTOS --out DIR --minutes M` (or `--steps N`) with every
other option at its default, followed by `fdm eval --json` of the result on the photos from other sources
(data/eval-photos) and on the validation photos; the table lists the run's own held-out check (its last line)
beside them. Subsets of N photos are every k-th photo of the sorted training folder (k = 258 // N).

    python benchmarks/recipe.py                                    # the table of docs/training.md
    python benchmarks/recipe.py --runs 258:4 12:steps=5000          # chosen runs

Wall times depend on the machine: the table was measured on 2 CPU cores with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = ["258:1", "258:4", "258:15", "12:4", "30:4", "12:steps=5000"]


def subset(train: Path, count: int, out: Path) -> Path:
    """A folder of symbolic links to every k-th photo of ``train`` (sorted), ``count`` in all."""
    photos = sorted(p for p in train.iterdir() if p.is_file())
    if count >= len(photos):
        return train
    folder = out / f"photos-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos[:: len(photos) // count][:count]:
        link = folder / photo.name
        if not link.exists():
            link.symlink_to(photo.resolve())
    return folder


def evaluate(fdm_dir: Path, folder: Path) -> dict:
    """`fdm eval --json` (no FID / ST-LPIPS) of an FDM on ``folder``: reconstruction ratio, plain PSNR and gain."""
    result = subprocess.run([sys.executable, "-m", "fdm.cli", "eval", str(folder), "--fdm", str(fdm_dir),
                             "--no-extras", "--json", "--no-progress"], capture_output=True, text=True, check=True)
    r = json.loads(result.stdout)["settings"]["reconstruction"]
    return {"ratio": r["feature_ratio"], "vq": r["psnr"]["vq"], "gain": r["psnr"]["fdm"] - r["psnr"]["vq"]}


def run(spec: str, train: Path, out: Path, other: Path, val: Path) -> dict:
    count, budget = spec.split(":")
    data = subset(train, int(count), out)
    target = out / spec.replace(":", "-").replace("=", "")
    shutil.rmtree(target, ignore_errors=True)  # a run of its own, not a resume
    length = ["--steps", budget.split("=")[1]] if budget.startswith("steps=") else ["--minutes", budget]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fdm.cli", "train", "--data", str(data), "--out", str(target), *length,
                    "--no-progress"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    training = json.loads((target / "config.json").read_text())["training"]
    return {"photos": len(list(data.iterdir())), "budget": budget, "wall_s": wall, "steps": training["steps"],
            "heldout": training.get("heldout"), "other": evaluate(target, other), "val": evaluate(target, val)}


def table(rows: list[dict]) -> str:
    lines = ["| photos | budget | wall time | steps | held-out check (ratio, PSNR gain) | other sources: ratio, "
             "PSNR gain | validation photos: ratio, PSNR gain |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        held = r["heldout"]
        held_text = f"{held['feature_ratio']:.3f}, {held['psnr_gain']:+.2f} dB" if held else "-"
        budget = f"{r['budget'][6:]} steps" if r["budget"].startswith("steps=") else f"{r['budget']} min"
        lines.append(f"| {r['photos']} | {budget} | {r['wall_s'] / 60:.1f} min | {r['steps']} | {held_text} "
                     f"| {r['other']['ratio']:.3f}, {r['other']['gain']:+.2f} dB "
                     f"| {r['val']['ratio']:.3f}, {r['val']['gain']:+.2f} dB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS,
                        help="PHOTOS:MINUTES or PHOTOS:steps=N (default: %(default)s)")
    parser.add_argument("--train", type=Path, default=ROOT.parent / "shared" / "data" / "photos" / "train")
    parser.add_argument("--other", type=Path, default=ROOT / "data" / "eval-photos")
    parser.add_argument("--val", type=Path, default=ROOT.parent / "shared" / "data" / "photos" / "val")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "recipe")
    parser.add_argument("--json", type=Path, help="also append each run's numbers to this file (one line each)")
    args = parser.parse_args()
    rows = []
    for spec in args.runs:
        rows.append(run(spec, args.train, args.out, args.other, args.val))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
