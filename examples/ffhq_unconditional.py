"""Unconditional FFHQ generation with taming-transformers (CVPR 2021) and FDM (WACV 2025), side by side.

The same sampled codes are decoded twice: by taming's own decoder (left) and with FDM attached (right).

    python examples/ffhq_unconditional.py --config ffhq/configs/2021-04-23T18-19-01-project.yaml \\
        --checkpoint ffhq/checkpoints/last.ckpt --fdm user/fdm-ffhq --num-samples 8 --out ffhq_samples
    # or with Hub files: --repo-id owner/taming-ffhq --config model.yaml --checkpoint last.ckpt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import fdm
from fdm.adapters.taming import load_model
from fdm.adapters.taming.sampling import decode_indices, sample_unconditional
from fdm.images import save_grid


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="*-project.yaml path (or filename in --repo-id)")
    parser.add_argument("--checkpoint", required=True, help=".ckpt / .safetensors path (or filename in --repo-id)")
    parser.add_argument("--repo-id", help="Hub repo holding --config and --checkpoint")
    parser.add_argument("--fdm", required=True, help="FDM folder or Hub repo id")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=250)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("ffhq_samples"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model = load_model(args.config, args.checkpoint, repo_id=args.repo_id).to(args.device)
    fdm_module = fdm.FDM.from_pretrained(args.fdm).to(args.device)

    codes = sample_unconditional(model, args.num_samples, top_k=args.top_k, top_p=args.top_p,
                                 temperature=args.temperature, seed=args.seed)
    baseline = decode_indices(model, codes)  # taming's decode, unchanged
    with_fdm = decode_indices(model, codes, fdm_module)  # decode_to_img with FDM attached
    pairs = torch.stack([baseline, with_fdm], dim=1).flatten(0, 1)  # rows: (without, with)
    return save_grid(pairs, args.out / "ffhq_without_vs_with_fdm.png", nrow=2)


if __name__ == "__main__":
    print(main())
