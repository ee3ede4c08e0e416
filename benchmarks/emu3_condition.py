"""Where FDM should correct an Emu3-style (MoVQ) decoder, measured: the decoder reads the quantized map twice, through
``post_quant_conv`` and as the spatial-normalisation condition. Prints one table of held-out pixel errors for the
decoder fed (input, condition) = (z_q, z_q), (z_dq, z_q), (z_dq, z_dq), (z, z_q) and (z, z), so that the figures in
docs/transformers.md can be reproduced.

    python benchmarks/emu3_condition.py ../shared/data/photos [--ae-steps 400] [--fdm-steps 400]

A released Emu3 tokenizer cannot be downloaded here, so a small transformers ``Emu3VQVAE`` (same classes, f4, 4-dim
codes, 2 frames folded into one) is first trained as a VQ autoencoder on random crops of ``photos/train`` (L1 +
codebook + commitment losses, straight-through), then an FDM is trained on its frozen features (phase 2's
loss on features computed once), and
every variant is decoded on crops of ``photos/val``. Needs the transformers extra; CPU minutes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fdm
from fdm.evaluation.metrics import psnr
from fdm.losses.qe import qe_loss
from fdm.training import ImageFolderViews


def build_model(codes: int):
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(0)
    return Emu3VQVAE(Emu3VQVAEConfig(codebook_size=codes, embed_dim=4, latent_channels=4, base_channels=32,
                                     channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[],
                                     temporal_downsample_factor=2, hidden_size=64))


def crops(folder: Path, size: int, views_per_image: int, seed: int) -> torch.Tensor:
    views = ImageFolderViews(folder, size, views_per_image=views_per_image, seed=seed)
    return torch.stack([views[i] for i in range(len(views))])  # (N, 3, size, size) in [-1, 1]


def batches(images: torch.Tensor, batch_size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield images[torch.randint(len(images), (batch_size,), generator=g)]


def train_autoencoder(model, images: torch.Tensor, steps: int, batch_size: int) -> None:
    """VQ autoencoder training of ``model`` (L1 reconstruction, codebook and 0.25 x commitment losses)."""
    adapter = fdm.find_adapter(model)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step, x in enumerate(batches(images, batch_size, steps, seed=1)):
        z = adapter.encode(x)
        if step == 0:  # codebook from the first features: every code starts in use
            with torch.no_grad():
                feats = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                pick = torch.randperm(len(feats))[: model.quantize.embedding.num_embeddings]
                model.quantize.embedding.weight.copy_(feats[pick])
        with torch.no_grad():
            _, indices = adapter.quantize(z)
        codes = adapter.lookup(indices)
        z_st = z + (codes - z).detach()
        loss = F.l1_loss(adapter.decode(z_st), x) + F.mse_loss(codes, z.detach()) + 0.25 * F.mse_loss(z, codes.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"autoencoder step {step}: loss {loss.item():.4f}")
    model.eval()


def train_fdm(model, images: torch.Tensor, steps: int, batch_size: int) -> fdm.FDM:
    """An FDM trained with phase 2's loss (every cell generated) on features computed once: the encoder is frozen."""
    adapter = fdm.find_adapter(model)
    with torch.no_grad():
        z = torch.cat([adapter.encode(x) for x in images.split(64)])
        z_q, _ = adapter.quantize(z)
    torch.manual_seed(2)
    module = fdm.FDM(adapter.channels, mask_channels=0, hidden_channels=32, num_blocks=4)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        pick = torch.randint(len(z), (batch_size,), generator=g)
        loss = qe_loss(module(z_q[pick]), z[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            print(f"FDM step {step}: qe loss {loss.item():.4f}")
    return module.eval()


@torch.no_grad()
def measure(model, module: fdm.FDM, x: torch.Tensor) -> list[tuple[str, float, float, float]]:
    """(variant, PSNR dB, pixel L1, feature L1 of the map the decoder's input gets) per variant."""
    adapter = fdm.find_adapter(model)
    z = adapter.encode(x)
    z_q, _ = adapter.quantize(z)
    z_dq = module(z_q)
    rows = []
    for name, (inp, cond) in {"VQ: (z_q, z_q)": (z_q, z_q), "FDM, input only: (z_dq, z_q)": (z_dq, z_q),
                              "FDM, both reads: (z_dq, z_dq)": (z_dq, z_dq), "continuous, input only: (z, z_q)": (z, z_q),
                              "continuous, both: (z, z)": (z, z)}.items():
        image = adapter.decode(inp, condition=cond).clamp(-1, 1)
        rows.append((name, psnr(image, x).mean().item(), (image - x).abs().mean().item(), (inp - z).abs().mean().item()))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="folder with train/ and val/ photos")
    parser.add_argument("--size", type=int, default=24)
    parser.add_argument("--codes", type=int, default=64)
    parser.add_argument("--ae-steps", type=int, default=300)
    parser.add_argument("--fdm-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.time()
    train = crops(args.photos / "train", args.size, views_per_image=2, seed=0)
    val = crops(args.photos / "val", args.size, views_per_image=8, seed=1)
    model = build_model(args.codes)
    train_autoencoder(model, train, args.ae_steps, args.batch_size)
    module = train_fdm(model, train, args.fdm_steps, 64)
    print(f"\n{len(val)} held-out {args.size}x{args.size} crops; autoencoder: {args.ae_steps} steps of "
          f"{args.batch_size}, {args.codes} codes of {fdm.find_adapter(model).channels}; FDM: {args.fdm_steps} steps of "
          f"64 ({time.time() - start:.0f} s)")
    print(f"{'decoder reads (post_quant_conv input, spatial-norm condition)':<48}{'PSNR dB':>9}{'L1':>9}{'feat. L1':>10}")
    for name, value, l1, feature in measure(model, module, val):
        print(f"{name:<48}{value:>9.2f}{l1:>9.4f}{feature:>10.4f}")

if __name__ == "__main__":
    main()
