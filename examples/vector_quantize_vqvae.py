"""A second base model anyone can train offline: a small conv VQ-VAE built with vector-quantize-pytorch
(lucidrains), trained on photo crops on a CPU in minutes, then an FDM for it (Park & Jung, WACV 2025) with fdm-vq's
phase-2 trainer, and its held-out gain measured with the code of ``fdm eval`` (fdm.evaluation.evaluate_views).

    pip install ".[vector-quantize]"    # from a clone of fdm-vq
    python examples/vector_quantize_vqvae.py --out runs/vq-vqvae   # 5 min of training, about 9 in all on 2 CPU cores

Writes ``OUT/vqvae.safetensors`` and ``OUT/vqvae.json`` (the architecture's sizes: :func:`build_vqvae` rebuilds it,
then :func:`fdm.adapters.vector_quantize.load_weights` fills it), the FDM in ``OUT/fdm`` (``FDM.from_pretrained``)
and ``OUT/metrics.json``; prints a table of PSNR without and with FDM and the feature error ratio on the held-out
photos. Data: ``--train`` and ``--heldout`` folders of photos (default: the project's shared photos, and the
other-source photos shipped in ``data/eval-photos``). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import fdm
from fdm.adapters.vector_quantize import VQAutoencoder, save_weights
from fdm.evaluation import evaluate_views
from fdm.training import ImageFolderViews, Phase2Config, Phase2Trainer, TensorViews

log = logging.getLogger("vector_quantize_vqvae")

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "photos"
HELDOUT = {"validation photos": PHOTOS / "val", "other sources": ROOT / "data" / "eval-photos"}


class ResBlock(nn.Module):
    """x + conv3x3(relu(conv3x3(relu(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def build_vqvae(width: int = 32, dim: int = 16, codebook_size: int = 512, levels: int = 1) -> VQAutoencoder:
    """The example's VQ-VAE, factor 4: a ``VectorQuantize`` on channel-first maps (``levels`` > 1: a ``ResidualVQ`` of
    that many levels) of ``codebook_size`` codes of ``dim`` channels, k-means initialised, EMA updated, dead codes
    replaced."""
    from vector_quantize_pytorch import ResidualVQ, VectorQuantize

    common = dict(dim=dim, codebook_size=codebook_size, decay=0.9, commitment_weight=0.25, kmeans_init=True,
                  threshold_ema_dead_code=2)
    quantizer = (VectorQuantize(accept_image_fmap=True, **common) if levels == 1
                 else ResidualVQ(num_quantizers=levels, **common))
    encoder = nn.Sequential(
        nn.Conv2d(3, width // 2, 4, stride=2, padding=1), nn.ReLU(),  # (B, w/2, H/2, W/2)
        nn.Conv2d(width // 2, width, 4, stride=2, padding=1),  # (B, w, H/4, W/4)
        ResBlock(width), nn.ReLU(),
    )
    decoder = nn.Sequential(
        ResBlock(width), nn.ReLU(),  # (B, w, H/4, W/4), after post_quant
        nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1), nn.ReLU(),  # (B, w/2, H/2, W/2)
        nn.ConvTranspose2d(width // 2, 3, 4, stride=2, padding=1), nn.Tanh(),  # (B, 3, H, W)
    )
    return VQAutoencoder(encoder, quantizer, decoder, factor=4, pre_quant=nn.Conv2d(width, dim, 1),
                         post_quant=nn.Conv2d(dim, width, 1))


def training_crops(folder: Path, crop: int, per_image: int, seed: int) -> torch.Tensor:
    """Fixed random crops (N, 3, crop, crop) in [-1, 1]: each photo's shorter side resized to 2-4x ``crop`` first,
    the pixel scale of ``fdm eval``'s 2x-larger crops at 1-2x."""
    views = ImageFolderViews(folder, crop_size=crop, views_per_image=per_image, seed=seed, scale_range=(2.0, 4.0))
    return torch.stack([view for _, view in views.iter_views()])


def train_vqvae(model: VQAutoencoder, crops: torch.Tensor, *, minutes: float, batch: int, lr: float, seed: int,
                continuous: float, progress: bool) -> dict[str, float]:
    """Adam on L1 + MSE reconstruction + the quantizer's commitment loss, cosine decay over the time budget.

    ``continuous``: the fraction of samples whose decoder input is the continuous ``z`` instead of the quantizer's
    output (quantization dropout, as the demo VQGAN is trained: docs/demo.md), so that the decoder learns to use
    the detail that quantization removes and FDM restores; 0 trains a plain VQ-VAE.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    start, step, recent = time.monotonic(), 0, []
    bar = tqdm(total=100, desc="VQ-VAE", unit="%", disable=not progress)
    while (done := (time.monotonic() - start) / (60 * minutes)) < 1 or step == 0:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        x = crops[torch.randint(len(crops), (batch,), generator=gen)]
        z = model.encode(x)
        z_q, _, commit = model.quantize(z)
        keep = torch.rand(batch, 1, 1, 1, generator=gen) < continuous
        image = model.decode(torch.where(keep, z, z_q))
        rec = F.l1_loss(image, x) + F.mse_loss(image, x)
        opt.zero_grad(set_to_none=True)
        (rec + commit).backward()
        opt.step()
        step += 1
        recent = (recent + [rec.item()])[-50:]
        bar.update(min(100, round(100 * done)) - bar.n)
        bar.set_postfix(step=step, loss=f"{sum(recent) / len(recent):.4f}")
    bar.close()
    return {"steps": step, "seconds": round(time.monotonic() - start, 1), "final_loss": sum(recent) / len(recent)}


def measure(deq: fdm.Dequantizer, folders: dict[str, Path], crop: int, views: int, extras: bool,
            progress: bool) -> dict[str, dict]:
    """``fdm eval``'s reconstruction metrics on each folder: ``views`` seeded crops per photo, shorter side at
    1-2x ``crop`` (``fdm eval FOLDER --crop-size crop --views-per-image views``)."""
    results = {}
    for name, folder in folders.items():
        held = ImageFolderViews(folder, crop_size=crop, views_per_image=views, seed=0, scale_range=(1.0, 2.0))
        results[name] = evaluate_views(deq, held, batch_size=8, extras=extras, progress=progress)
    return results


def table(results: dict[str, dict]) -> str:
    """The reconstruction metrics as a markdown table (ST-LPIPS and FID where they were measured)."""
    extra = [(key, label) for key, label in (("stlpips", "ST-LPIPS"), ("fid", "FID (biased: few views)"))
             if all(key in r["settings"]["reconstruction"] for r in results.values())]
    rows = ["| photos | views | PSNR plain VQ -> with FDM | gain | bound: decode(z) | feature error ratio | SSIM | "
            + "".join(f"{label} | " for _, label in extra).rstrip(), "|---" * (7 + len(extra)) + "|"]
    for name, report in results.items():
        m = report["settings"]["reconstruction"]
        rows.append(f"| {name} | {report['views']} | {m['psnr']['vq']:.2f} -> {m['psnr']['fdm']:.2f} dB | "
                    f"{m['psnr']['fdm'] - m['psnr']['vq']:+.2f} dB | {m['psnr_continuous']:.2f} dB | "
                    f"{m['feature_ratio']:.3f} | {m['ssim']['vq']:.3f} -> {m['ssim']['fdm']:.3f} | "
                    + "".join(f"{m[key]['vq']:.4g} -> {m[key]['fdm']:.4g} | " for key, _ in extra).rstrip())
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--train", type=Path, default=PHOTOS / "train", help="folder of training photos")
    parser.add_argument("--heldout", type=Path, nargs="*", default=None,
                        help="held-out photo folders (default: the shared validation photos and data/eval-photos)")
    parser.add_argument("--vq-minutes", type=float, default=3.0, help="VQ-VAE training budget")
    parser.add_argument("--fdm-minutes", type=float, default=2.0,
                        help="FDM (phase 2) budget, its feature cache included")
    parser.add_argument("--crop", type=int, default=64, help="training crop side")
    parser.add_argument("--crops-per-image", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=32, help="VQ-VAE channel width")
    parser.add_argument("--continuous", type=float, default=0.9,
                        help="fraction of VQ-VAE training samples decoded from z itself (0: a plain VQ-VAE)")
    parser.add_argument("--levels", type=int, default=1, help="1: VectorQuantize; more: a ResidualVQ of that many")
    parser.add_argument("--fdm-hidden", type=int, default=32, help="FDM trunk width")
    parser.add_argument("--fdm-blocks", type=int, default=8)
    parser.add_argument("--eval-crop", type=int, default=128)
    parser.add_argument("--eval-views", type=int, default=4, help="crops per held-out photo")
    parser.add_argument("--no-extras", action="store_true", help="skip ST-LPIPS and FID")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: fastest on a 2-core machine shared with other jobs)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    progress = not args.no_progress
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sizes = {"width": args.width, "dim": 16, "codebook_size": 512, "levels": args.levels}
    model = build_vqvae(**sizes)
    crops = training_crops(args.train, args.crop, args.crops_per_image, args.seed)
    log.info("%d training crops of %d px from %s", len(crops), args.crop, args.train)
    vq_run = train_vqvae(model, crops, minutes=args.vq_minutes, batch=args.batch, lr=2e-3, seed=args.seed,
                         continuous=args.continuous, progress=progress)
    model.eval()
    save_weights(model, args.out / "vqvae.safetensors")
    (args.out / "vqvae.json").write_text(json.dumps(sizes, indent=2) + "\n")
    log.info("VQ-VAE: %d steps in %.0f s, saved to %s", vq_run["steps"], vq_run["seconds"], args.out)

    config = Phase2Config(minutes=args.fdm_minutes, batch_size=args.batch, hole_ratio=None, seed=args.seed,
                          hidden_channels=args.fdm_hidden, num_blocks=args.fdm_blocks, checkpoint_every=0,
                          progress=progress, log_every=200, output_dir=str(args.out / "fdm-run"),
                          base_model=f"examples/vector_quantize_vqvae.py VQ-VAE {sizes}")
    started = time.monotonic()
    module = Phase2Trainer(model, TensorViews(crops), config, fdm_module=fdm.FDM(
        16, mask_channels=0, hidden_channels=args.fdm_hidden, num_blocks=args.fdm_blocks)).train()
    fdm_run = {"steps": module.training_info.get("steps"), "seconds": round(time.monotonic() - started, 1)}
    module.save_pretrained(args.out / "fdm")

    heldout = {p.name: p for p in args.heldout} if args.heldout is not None else HELDOUT
    results = measure(fdm.Dequantizer(model, module), heldout, args.eval_crop, args.eval_views,
                      not args.no_extras, progress)
    record = {"vqvae": sizes | vq_run | {"continuous": args.continuous}, "fdm": {"hidden": args.fdm_hidden, "blocks": args.fdm_blocks} | fdm_run,
              "heldout": results}
    (args.out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table(results))
    return record


if __name__ == "__main__":
    main()
