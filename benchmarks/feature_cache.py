"""Benchmark: the compact phase-2 feature cache (``z`` in float16 / bfloat16 / float32 plus code indices, ``z_q``
looked up) against the earlier layout (``z`` and ``z_q`` both float32), in one run: bytes per view, extraction
throughput, and the feature error ratio ``||z - z_dq|| / ||z - z_q||`` of an FDM trained on each cache (same
seed, steps and views), measured on held-out photos.

    python benchmarks/feature_cache.py                      # demo VQGAN, the shared photos, about 3 min on 2 cores

Target (issue: dataset-scale training): at most 50 % of the earlier bytes, with a final feature error ratio
within 0.005 of the float32 cache's.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import fdm
from fdm.evaluation.comparison import evaluate_views
from fdm.training import FeatureCache, ImageFolderViews, Phase2Config, Phase2Trainer, encode_views

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"


def earlier_layout(adapter: fdm.VQAdapter, views, folder: Path, batch_size: int) -> tuple[float, float]:
    """Write ``z`` and ``z_q`` as float32 ``.npy`` memory maps, as the cache did before; -> (bytes/view, views/s)."""
    start = time.perf_counter()
    z_file = z_q_file = None
    row = 0
    for images in DataLoader(views, batch_size=batch_size):
        latents = encode_views(adapter, images)
        z, z_q = latents.z.float(), latents.z_q.float()
        if z_file is None:
            shape = (len(views), *z.shape[1:])
            z_file, z_q_file = (np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float32,
                                                          shape=shape) for name in ("z", "z_q"))
        z_file[row:row + len(z)], z_q_file[row:row + len(z)] = z.numpy(), z_q.numpy()
        row += len(z)
    z_file.flush()
    z_q_file.flush()
    seconds = time.perf_counter() - start
    size = sum((folder / f"{name}.npy").stat().st_size for name in ("z", "z_q"))
    return size / len(views), len(views) / seconds


def compact(adapter: fdm.VQAdapter, views, folder: Path, dtype: str, batch_size: int) -> tuple[float, float]:
    """Fill a disk cache in ``dtype``; -> (bytes/view on disk, views/s)."""
    cache = FeatureCache(adapter, views, mode="disk", cache_dir=folder, dtype=dtype, batch_size=batch_size,
                         progress=False)
    start = time.perf_counter()
    cache.prepare()
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (folder / cache.key()).rglob("*.npy"))
    return size / len(views), len(views) / seconds


def trained_ratio(model, views, held_out, folder: Path, dtype: str, args: argparse.Namespace) -> float:
    """Train an FDM on the ``dtype`` cache in ``folder``; -> its mean feature error ratio on ``held_out``."""
    config = Phase2Config(steps=args.steps, batch_size=args.batch_size, lr=1e-3, warmup_steps=args.steps // 20,
                          cache="disk", cache_dir=str(folder), cache_dtype=dtype, hidden_channels=args.hidden,
                          num_blocks=4, progress=False, checkpoint_every=0, log_every=10**9,
                          output_dir=str(folder / f"fdm-{dtype}"))
    module = Phase2Trainer(model, views, config).train()
    result = evaluate_views(fdm.Dequantizer(model, module), held_out, extras=False, progress=False)
    return result["settings"]["reconstruction"]["feature_ratio"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "train", help="training photos")
    parser.add_argument("--held-out", type=Path, default=SHARED / "val", help="photos the ratio is measured on")
    parser.add_argument("--views-per-image", type=int, default=4)
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=600, help="phase-2 steps per cache")
    parser.add_argument("--hidden", type=int, default=32, help="FDM width")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from fdm.demo.model import load_demo_vqgan

    model = load_demo_vqgan().eval()
    adapter = fdm.find_adapter(model)
    views = ImageFolderViews(args.data, crop_size=args.crop_size, views_per_image=args.views_per_image, seed=0)
    held_out = ImageFolderViews(args.held_out, crop_size=128, views_per_image=4, seed=0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "earlier").mkdir()
        rows["z + z_q float32 (earlier)"] = (*earlier_layout(adapter, views, work / "earlier", args.batch_size), None)
        for dtype in ("float32", "float16", "bfloat16"):
            folder = work / dtype
            size, speed = compact(adapter, views, folder, dtype, args.batch_size)
            rows[f"z {dtype} + indices"] = (size, speed, trained_ratio(model, views, held_out, folder, dtype, args))

    c = adapter.channels
    print(f"phase-2 feature cache, demo VQGAN (f4, {c} channels, {adapter.codebook().shape[0]} codes), "
          f"{len(views)} views of {args.crop_size} px from {args.data.name}/; FDM {args.hidden} wide, "
          f"{args.steps} steps of {args.batch_size}; ratio on {len(held_out)} views of {args.held_out.name}/")
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} thread(s)\n")
    earlier_bytes = rows["z + z_q float32 (earlier)"][0]
    reference = rows["z float32 + indices"][2]
    print("| cache                      | bytes/view | of earlier | extraction (views/s) | feature error ratio | vs float32 |")
    print("|----------------------------|-----------:|-----------:|---------------------:|--------------------:|-----------:|")
    for name, (size, speed, ratio) in rows.items():
        ratio_text = f"{ratio:19.4f} | {ratio - reference:+10.4f}" if ratio is not None else f"{'-':>19} | {'-':>10}"
        print(f"| {name:<26} | {size:10.0f} | {size / earlier_bytes:9.1%} | {speed:20.1f} | {ratio_text} |")


if __name__ == "__main__":
    main()
