"""Semantic-conditional ADE20K generation with taming-transformers (CVPR 2021) and FDM (WACV 2025), side by side.

Each row: the segmentation map (colour-coded), taming's own decode, the decode with FDM attached. Maps
larger than the transformer's 16x16-code window are sampled with taming's sliding-window sampler.

    python examples/ade20k_semantic.py --config ade20k/configs/model.yaml --checkpoint ade20k/last.ckpt \\
        --fdm user/fdm-ade20k --segmentation ADE_val_00000001.png --out ade20k_samples
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import fdm
from fdm.adapters.taming import load_model
from fdm.adapters.taming.command import read_label_maps
from fdm.adapters.taming.sampling import decode_indices, sample_semantic
from fdm.images import save_grid


def colorize(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) class ids -> (B, 3, H, W) images in [-1, 1] with a fixed random colour per class."""
    palette = torch.rand(num_classes, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return palette[labels].permute(0, 3, 1, 2)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="*-project.yaml path (or filename in --repo-id)")
    parser.add_argument("--checkpoint", required=True, help=".ckpt / .safetensors path (or filename in --repo-id)")
    parser.add_argument("--repo-id", help="Hub repo holding --config and --checkpoint")
    parser.add_argument("--fdm", required=True, help="FDM folder or Hub repo id")
    parser.add_argument("--segmentation", type=Path, nargs="+", required=True,
                        help="ADE20K annotation PNGs (pixel value = class id, 0..150), all the same size")
    parser.add_argument("--window", type=int, default=16, help="transformer window in codes")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("ade20k_samples"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model = load_model(args.config, args.checkpoint, repo_id=args.repo_id).to(args.device)
    fdm_module = fdm.FDM.from_pretrained(args.fdm).to(args.device)
    labels = read_label_maps(args.segmentation)

    codes = sample_semantic(model, labels, window=args.window, top_k=args.top_k,
                            temperature=args.temperature, seed=args.seed)
    baseline = decode_indices(model, codes)  # taming's decode, unchanged
    with_fdm = decode_indices(model, codes, fdm_module)  # decode_to_img with FDM attached
    num_classes = model.cond_stage_model.encoder.conv_in.in_channels
    rows = torch.stack([colorize(labels, num_classes).to(baseline), baseline, with_fdm], dim=1).flatten(0, 1)
    return save_grid(rows, args.out / "ade20k_without_vs_with_fdm.png", nrow=3)


if __name__ == "__main__":
    print(main())
