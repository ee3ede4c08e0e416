"""Phase-2 training estimates for the released models (FDM, Park & Jung, WACV 2025): FLOPs per training view of the
frozen encoder (the feature cache's fill) and of FDM's forward + backward, counted with
``torch.utils.flop_counter.FlopCounterMode`` on the CPU on full-size architectures with random weights
(taming-transformers f16 VQGANs, CVPR 2021; PUT's P-VQVAE, CVPR 2022; Janus's VQ-16 tokenizer in transformers); the feature cache's size; and the time
per epoch on one GPU at an assumed sustained throughput. Prints the table that docs/training.md quotes.

    python benchmarks/training_estimates.py                      # 30 % of an H100 SXM's dense bf16 peak
    python benchmarks/training_estimates.py --peak-tflops 1979 --utilisation 0.25

FlopCounterMode counts matrix products, convolutions and attention, not element-wise work; data loading (JPEG
decoding, resizing), mask drawing and optimizer updates are not in the estimate.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import torch
from gpu_check import put_codec, taming_vqgan
from torch.utils.flop_counter import FlopCounterMode

import fdm
from fdm.losses.qe import qe_loss
from fdm.masks import keep_known
from fdm.training import encode_views
from fdm.training.feature_cache import index_dtype
from fdm.training.recipe import fdm_width

H100_BF16_DENSE_TFLOPS = 989.4
"""NVIDIA H100 SXM, dense bf16 tensor-core peak (1979 with 2:4 sparsity)."""
VIEW = 256  # side of a training view, pixels


@dataclasses.dataclass(frozen=True)
class Release:
    name: str
    family: str  # "taming", "put" or "janus"
    codes: int  # codebook size
    views: int  # training views: one 256 x 256 crop per training image (fdm train's default)
    data: str


RELEASES = (
    Release("taming FFHQ f16-1024", "taming", 1024, 60_000, "FFHQ, 60,000 training images"),
    Release("taming ImageNet f16-16384", "taming", 16384, 1_281_167, "ImageNet-1k train"),
    Release("taming ADE20K (first stage)", "taming", 1024, 20_210, "ADE20K train (ADEChallengeData2016)"),
    Release("PUT FFHQ", "put", 1024, 60_000, "FFHQ, 60,000 training images"),
    Release("PUT Places", "put", 1024, 1_803_460, "Places365-Standard train"),
    Release("PUT ImageNet", "put", 1024, 1_281_167, "ImageNet-1k train"),
    Release("Janus VQ-16 (transformers)", "janus", 16384, 1_281_167, "ImageNet-1k train"),
)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@functools.cache
def base_model(family: str, codes: int) -> torch.nn.Module:
    """The full-size architecture with random weights: taming's f16 VQGAN with ``codes`` codes, PUT's P-VQVAE, or
    transformers' JanusVQVAE (its config's defaults: the released tokenizer's sizes)."""
    torch.manual_seed(0)
    if family == "put":
        return put_codec(tiny=False).eval()
    if family == "janus":
        from transformers import JanusVQVAE, JanusVQVAEConfig

        return JanusVQVAE(JanusVQVAEConfig(num_embeddings=codes)).eval()
    return taming_vqgan(tiny=False, n_embed=codes)


@functools.cache
def encoder_flops(family: str, codes: int) -> int:
    """FLOPs of encoding and quantizing one view (what filling the cache costs per view)."""
    adapter = fdm.find_adapter(base_model(family, codes))
    x = torch.rand(1, 3, VIEW, VIEW) * 2 - 1
    with torch.no_grad():
        return count_flops(lambda: encode_views(adapter, x))


@functools.cache
def fdm_step_flops(family: str) -> int:
    """FLOPs of one phase-2 step on one view: FDM forward, qe loss and backward (``fdm train``'s FDM: the paper's,
    C = 256, for taming and PUT; trunk width 32 for Janus's 8 channels).

    taming and Janus: mask-free (unconditional / class-conditional generation); PUT: with a hole mask (inpainting).
    """
    adapter = fdm.find_adapter(base_model(family, 16384 if family == "janus" else 1024))
    side = VIEW // adapter.factor
    z = torch.randn(1, adapter.channels, side, side)
    z_q = torch.randn_like(z)
    if family == "put":
        module = fdm.FDM(adapter.channels, hidden_channels=fdm_width(adapter.channels))
        cells = (torch.rand(1, 1, side, side) < 0.4).float()  # FDM's cost does not depend on the hole
        x = keep_known(z, z_q, cells)
    else:
        module = fdm.FDM(adapter.channels, mask_channels=0, hidden_channels=fdm_width(adapter.channels))
        cells, x = None, z_q
    return count_flops(lambda: qe_loss(module(x, cells), z, cells).backward())


def cache_bytes_per_view(family: str, codes: int) -> tuple[int, int]:
    """(float16 z + int16 / int32 code index per cell, the earlier float32 z and z_q) in bytes per view."""
    adapter = fdm.find_adapter(base_model(family, codes))
    cells, channels = (VIEW // adapter.factor) ** 2, adapter.channels
    index_bytes = torch.empty((), dtype=getattr(torch, index_dtype(codes))).element_size()
    return cells * (channels * 2 + index_bytes), 2 * cells * channels * 4


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="the GPU's peak (default: H100 SXM dense bf16, 989.4)")
    parser.add_argument("--utilisation", type=float, default=0.3, help="sustained fraction of the peak (0.3)")
    parser.add_argument("--batch-size", type=int, default=16, help="views per step, for the steps per epoch (16)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the counting runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rate = args.peak_tflops * args.utilisation * 1e12
    print(f"Phase-2 estimates per release: {VIEW}x{VIEW} views (one per training image), FLOPs counted with "
          f"FlopCounterMode on the CPU (random weights); time at an assumed {rate / 1e12:.0f} TFLOP/s sustained "
          f"({args.utilisation:.0%} of {args.peak_tflops:g}); GB = 1e9 bytes\n")
    header = ("release", "views", "latent h x w x C", "encoder GFLOP/view", "FDM fwd+bwd GFLOP/view",
              "cache fp16 z + codes", "cache fp32 z + z_q (before)", f"steps/epoch (batch {args.batch_size})",
              "epoch 1 with cache fill (est.)", "later epochs (est.)")
    rows = []
    for release in RELEASES:
        adapter = fdm.find_adapter(base_model(release.family, release.codes))
        side = VIEW // adapter.factor
        encoder, step = encoder_flops(release.family, release.codes), fdm_step_flops(release.family)
        compact, before = cache_bytes_per_view(release.family, release.codes)
        rows.append((release.name, f"{release.views:,}", f"{side} x {side} x {adapter.channels}",
                     f"{encoder / 1e9:.1f}", f"{step / 1e9:.2f}", f"{compact * release.views / 1e9:.1f} GB",
                     f"{before * release.views / 1e9:.1f} GB", f"{-(-release.views // args.batch_size):,}",
                     duration(release.views * (encoder + step) / rate), duration(release.views * step / rate)))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
              + " |")
    for family, codes in sorted({(r.family, r.codes) for r in RELEASES}):
        compact, before = cache_bytes_per_view(family, codes)
        print(f"\n{family} ({codes} codes): {compact:,} bytes per view cached as float16 z + "
              f"int{16 if codes <= 2**15 else 32} codes, {before:,} as float32 z + z_q", end="")
    print()


if __name__ == "__main__":
    main()
