"""Benchmark: FDM phase-2 time per epoch with the feature cache (memory, disk) versus re-encoding every step
(what the official hyudsl/FDM code does), for an encoder of the released taming-transformers f16 VQGAN size
(Esser et al., CVPR 2021) at 256x256 with random weights. Prints one table measured side by side in one run.

    python benchmarks/phase2_cache.py --images 8 --batch-size 4 --epochs 3 --threads 1

Needs the taming extra (``pip install ".[taming]"`` from a clone) and the shared photos (or ``--data DIR``).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn

import fdm
from fdm.adapters.taming.adapter import VQModelAdapter
from fdm.training import ImageFolderViews, Phase2Config, Phase2Trainer

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos" / "train"


class TamingF16Encoder(nn.Module):
    """The first half of the released f16 VQGAN: taming's Encoder, 1x1 quant_conv, VectorQuantizer2 (1024 x 256)."""

    def __init__(self):
        super().__init__()
        from taming.modules.diffusionmodules.model import Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer2

        self.encoder = Encoder(ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=[16],
                               dropout=0.0, in_channels=3, resolution=256, z_channels=256, double_z=False)
        self.quant_conv = nn.Conv2d(256, 256, 1)
        self.quantize = VectorQuantizer2(1024, 256, beta=0.25, sane_index_shape=True)


class TamingF16EncoderAdapter(VQModelAdapter):
    """Encode / quantize only, as taming's VQModel adapter does: all that phase 2 needs from the base model."""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, TamingF16Encoder)

    @property
    def channels(self) -> int:
        return 256  # no post_quant_conv to read it from

    def decode(self, z: torch.Tensor, **model_kwargs) -> torch.Tensor:
        raise NotImplementedError("this benchmark's model is an encoder only: phase 2 never decodes")

    def hook_module(self) -> nn.Module:
        raise NotImplementedError("this benchmark's model is an encoder only: phase 2 never decodes")

    def decoder_modules(self) -> dict[str, nn.Module]:
        return {}


def time_epochs(model: nn.Module, views: ImageFolderViews, cache: str, args: argparse.Namespace, work: Path) -> dict:
    config = Phase2Config(epochs=args.epochs, batch_size=args.batch_size, warmup_steps=1, cache=cache,
                          cache_dir=str(work / "cache"), progress=False, checkpoint_every=0, log_every=10**9,
                          output_dir=str(work / cache))
    trainer = Phase2Trainer(model, views, config, adapter=TamingF16EncoderAdapter(model))
    trainer.train()
    seconds = [h["seconds"] for h in trainer.history]
    return {"first": trainer.cache_fill_seconds + seconds[0], "fill": trainer.cache_fill_seconds,
            "later": sum(seconds[1:]) / max(1, len(seconds) - 1)}


def views_of(folder: Path, images: int, crop: int, work: Path) -> ImageFolderViews:
    """One seeded ``crop`` x ``crop`` view of each of the first ``images`` images of ``folder`` (linked into
    ``work/images``)."""
    subset = work / "images"
    subset.mkdir()
    for path in fdm.training.list_images(folder)[:images]:
        os.symlink(path.resolve(), subset / path.name)
    return ImageFolderViews(subset, crop_size=crop, views_per_image=1, seed=0)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of training images")
    parser.add_argument("--images", type=int, default=8, help="number of images used (one 256x256 view each)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    model = TamingF16Encoder().eval()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        views = views_of(args.data, args.images, 256, work)
        results = {mode: time_epochs(model, views, mode, args, work) for mode in ("none", "memory", "disk")}

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"FDM phase 2, taming f16 encoder ({params:.1f} M parameters, random weights), 256x256, "
          f"{len(views)} views, batch {args.batch_size}, {args.epochs} epochs")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}, {args.threads} thread(s), device cpu\n")
    base = results["none"]["later"]
    print("| features                 | epoch 1 (s) | of which cache fill (s) | later epochs (s/epoch) | speed-up, later epochs |")
    print("|--------------------------|------------:|------------------------:|-----------------------:|-----------------------:|")
    names = {"none": "re-encoded every step", "memory": "cached in memory", "disk": "cached on disk"}
    for mode, r in results.items():
        print(f"| {names[mode]:<24} | {r['first']:11.2f} | {r['fill']:23.2f} | {r['later']:22.2f} | "
              f"{base / r['later']:21.1f}x |")


if __name__ == "__main__":
    main()
