"""Benchmark: mixed precision (``--precision``, :mod:`fdm.precision`) against float32 for FDM's phase-2 training,
phase-3 training and inference, on the embedded demo VQGAN and the shared training photos.
Prints one table measured side by side in one run: throughput per precision, the time ratio to fp32, and the
feature error ratio ``||z - z_dq|| / ||z - z_q||``.

    python benchmarks/precision.py --threads 1                  # CPU: fp32 vs bf16, tiny sizes (minutes)
    python benchmarks/precision.py --device cuda --precisions fp32 bf16 fp16 --crop 128 --images 64

Rows: (a) phase 2: FDM steps on cached features (mask-free, every cell quantized), timed over the epochs after the
first; (b) phase 3: joint FDM + decoder + discriminator steps (qe, L1, gradient and adversarial terms; no VGG
terms), timed after one warm-up step; (c) inference: ``Dequantizer.reconstruct`` under autocast; (d) the feature
error ratio of the phase-2 FDMs of (a) (same seed, same steps), evaluated in float32; (e) that of the demo's own FDM
evaluated at each precision. Needs the taming extra (``pip install ".[taming]"`` from a clone).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from phase2_cache import cpu_name, views_of

import fdm
from fdm.demo.model import load_demo_fdm, load_demo_vqgan
from fdm.evaluation.metrics import feature_error_ratio
from fdm.precision import PRECISIONS, autocast
from fdm.training import Phase2Config, Phase2Trainer
from fdm.training.phase3 import Phase3Config, Phase3Trainer

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos" / "train"


@torch.no_grad()
def feature_ratio(deq: fdm.Dequantizer, x: torch.Tensor, precision: str) -> float:
    """``||z - z_dq|| / ||z - z_q||`` over every cell of ``x``, the models run at ``precision``."""
    with autocast(x.device, precision):
        z = deq.encode(x)
        z_q, _ = deq.quantize(z)
        z_dq = deq.correct(z_q)
    return float(feature_error_ratio(z.float(), z_q.float(), z_dq.float()))


def phase2(model, views, x, precision: str, args, work: Path) -> tuple[float, float]:
    """Phase-2 steps/s (epochs after the first) and the trained FDM's feature error ratio (evaluated in fp32)."""
    config = Phase2Config(steps=args.phase2_steps, batch_size=args.batch_size, lr=1e-3, warmup_steps=5,
                          hole_ratio=None, hidden_channels=64, num_blocks=6, seed=0, device=args.device,
                          precision=precision, progress=False, checkpoint_every=0, log_every=10**9,
                          output_dir=str(work / f"phase2-{precision}"))
    trainer = Phase2Trainer(model, views, config)
    trained = trainer.train()
    later = trainer.history[1:]
    steps = args.phase2_steps * len(later) / len(trainer.history)
    return steps / sum(h["seconds"] for h in later), feature_ratio(fdm.Dequantizer(model, trained), x, "fp32")


def phase3(model, views, precision: str, args, work: Path, sync) -> float:
    """Phase-3 steps/s after one warm-up step (the trainer's step: batch, masks, frozen encoder, both updates)."""
    config = Phase3Config(steps=args.phase3_steps + 1, batch_size=args.phase3_batch_size, warmup_steps=1,
                          disc_warmup_steps=1, drop_vgg_terms=True, start_steps={"gradient": 0, "adversarial": 0},
                          device=args.device, precision=precision, progress=False, log_every=0, val_every=0,
                          checkpoint_every=0, output_dir=str(work / f"phase3-{precision}"))
    trainer = Phase3Trainer(model, load_demo_fdm(), views, config)  # fine-tunes a copy of the model's decoder
    trainer.prepare()  # the batches in the loop's order
    trainer.train_step(0.0)  # warm-up (the trainer's loop adds only records and checkpoints)
    sync()
    start = time.perf_counter()
    for _ in range(args.phase3_steps):
        trainer.train_step(0.0)
    sync()
    return args.phase3_steps / (time.perf_counter() - start)


@torch.no_grad()
def inference(deq: fdm.Dequantizer, x: torch.Tensor, precision: str, repeats: int, sync) -> float:
    """Images/s of ``Dequantizer.reconstruct`` under autocast (one warm-up call, then ``repeats`` timed ones)."""
    with autocast(x.device, precision):
        deq.reconstruct(x)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            deq.reconstruct(x)
        sync()
    return repeats * x.shape[0] / (time.perf_counter() - start)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} thread(s), capability " \
           f"{torch.backends.cpu.get_cpu_capability()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of training images")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32", "bf16"],
                        help="precisions compared (fp32 first: the reference of the ratios)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--images", type=int, default=16, help="training images used (one view each)")
    parser.add_argument("--crop", type=int, default=32, help="view side (a multiple of 8, at least 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="phase-2 batch")
    parser.add_argument("--phase2-steps", type=int, default=40, help="phase-2 steps per precision")
    parser.add_argument("--phase3-batch-size", type=int, default=1)
    parser.add_argument("--phase3-steps", type=int, default=2, help="timed phase-3 steps per precision")
    parser.add_argument("--inference-batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed inference calls per precision")
    args = parser.parse_args()
    if args.precisions[0] != "fp32":
        parser.error("--precisions must start with fp32 (the reference)")
    if args.phase2_steps < 2 * math.ceil(args.images / args.batch_size):
        parser.error(f"--phase2-steps must cover at least two epochs of --images {args.images} in batches of "
                     f"{args.batch_size} (the first epoch is not timed); got {args.phase2_steps}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    model = load_demo_vqgan().to(device)
    demo = fdm.Dequantizer(model, load_demo_fdm().to(device))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        views = views_of(args.data, args.images, args.crop, work)
        x = torch.stack([views[i] for i in range(len(views))]).to(device)
        for precision in args.precisions:
            rate, ratio = phase2(model, views, x, precision, args, work)
            results[precision] = {
                "phase2": rate,
                "phase3": phase3(model, views, precision, args, work, sync),
                "inference": inference(demo, x[:args.inference_batch_size], precision, args.repeats, sync),
                "trained_ratio": ratio,
                "demo_ratio": feature_ratio(demo, x, precision),
            }

    adapter = demo.adapter
    print(f"FDM mixed precision, demo VQGAN (f{adapter.factor}, {adapter.channels} channels, "
          f"{adapter.codebook().shape[0]} codes) + FDM (hidden 64, 6 blocks), "
          f"{len(views)} views of {args.crop}x{args.crop}; {datetime.date.today()}")
    print(f"machine: {machine(device)}, torch {torch.__version__}, device {device}\n")
    others = args.precisions[1:]
    header = "| measure | " + " | ".join(args.precisions) + " | " + \
             " | ".join(f"time {p} / fp32" for p in others) + " |"
    print(header)
    print("|---|" + "---:|" * (len(args.precisions) + len(others)))
    rows = [
        ("phase2", f"(a) phase-2 training, steps/s (batch {args.batch_size})", True),
        ("phase3", f"(b) phase-3 training, steps/s (batch {args.phase3_batch_size})", True),
        ("inference", f"(c) inference (reconstruct), images/s (batch {args.inference_batch_size})", True),
        ("trained_ratio", f"(d) feature error ratio after {args.phase2_steps} phase-2 steps (evaluated in fp32)",
         False),
        ("demo_ratio", "(e) feature error ratio of the demo FDM, evaluated at the precision", False),
    ]
    for key, name, is_rate in rows:
        values = [results[p][key] for p in args.precisions]
        cells = [f"{v:.3g}" if is_rate else f"{v:.4f}" for v in values]
        ratios = [f"{results['fp32'][key] / results[p][key]:.1f}x" if is_rate else "-" for p in others]
        print(f"| {name} | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    main()
