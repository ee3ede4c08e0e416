"""FDM's share of a PUT inpainting run (FDM, WACV 2025, reports about 0.02 %), at the released sizes.

Random weights (timing only): P-VQVAE 1024 x 256 codebook, UQ-Transformer 35 x 512 (111 M parameters),
FDM at C = 256, one 256 x 256 image with a 40 % irregular hole. Sampling fills one cell per transformer
pass; the full run's sampling time is extrapolated from ``--steps`` measured passes (each pass costs the
same: the transformer always sees all 1024 cells). Prints a table.

    python benchmarks/put_fdm_overhead.py --steps 2 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

import fdm
from fdm.adapters.put import PUT, PVQVAE, UQTransformer


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="sampling passes measured")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the encode / FDM / decode timings")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = PUT(PVQVAE(), UQTransformer()).to(device).eval()
    module = fdm.FDM(channels=256).to(device).eval()
    torch.nn.init.normal_(module.head.weight, std=1e-3)
    image = (torch.rand(1, 3, 256, 256, device=device) * 2 - 1)
    hole = fdm.random_irregular_mask(256, 256, (0.4, 0.4), generator=torch.Generator().manual_seed(0))
    hole = hole[None].to(device)
    codec, transformer = model.codec, model.transformer
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with torch.inference_mode():
        z = codec.encode(image, hole)
        known = codec.known_cells(hole, image)
        cells = int((~known).sum())
        emb = transformer.embed(z)
        cell_mask = (~known[:, None]).float()

        def run(fn):
            def wrapped():
                fn()
                sync()
            return wrapped

        t_encode = timed(run(lambda: codec.encode(image, hole)), args.repeats)
        t_step = timed(run(lambda: transformer(emb)), args.steps)
        t_fdm = timed(run(lambda: module(z, cell_mask)), args.repeats)
        t_decode = timed(run(lambda: codec.decode(z, image, hole)), args.repeats)
    t_sampling = t_step * cells
    total = t_encode + t_sampling + t_fdm + t_decode
    print(f"device {device}, threads {torch.get_num_threads()}, hole {float(hole.mean()):.1%} of pixels, "
          f"{cells} of 1024 cells generated (one per pass, PUT's default)")
    print(f"{'part':<34}{'seconds':>14}{'share of run':>16}")
    rows = [("encode masked image", t_encode), (f"sampling ({cells} passes, extrapolated)", t_sampling),
            ("FDM correction", t_fdm), ("decode", t_decode), ("total", total)]
    for name, seconds in rows:
        print(f"{name:<34}{seconds:>14.4f}{seconds / total:>15.4%}")
    print(f"measured: one transformer pass {t_step:.3f} s (mean of {args.steps}); "
          f"FDM / (sampling + decoding) = {t_fdm / (t_sampling + t_decode):.4%}")


if __name__ == "__main__":
    main()
