"""Pluralistic inpainting with PUT (CVPR 2022) and FDM (WACV 2025): N completions of one image, with and
without FDM, side by side.

    python examples/put_inpainting.py --codec fdm_tuning.pth --transformer generator.pth \\
        --image photo.png --mask hole.png --out results/ --num-samples 4

``--codec`` is a PUT P-VQVAE file or an FDM-authors checkpoint (whose fdm.mix.* weights are then used);
``--fdm`` loads an FDM saved by ``fdm train`` instead. Mask files: white = hole (``--white-is-known`` for
PUT's own sample masks). The same as ``fdm inpaint --model put``, written out with the library calls.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import fdm
from fdm.adapters.put import inpaint, load_model, split_checkpoint
from fdm.images import read_image, save_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", required=True, help="PUT P-VQVAE or FDM-authors checkpoint")
    parser.add_argument("--transformer", help="UQ-Transformer checkpoint (if not inside --codec)")
    parser.add_argument("--fdm", help="FDM folder / Hub repo id saved with fdm-vq")
    parser.add_argument("--image", required=True)
    parser.add_argument("--mask", required=True)
    parser.add_argument("--white-is-known", action="store_true")
    parser.add_argument("--out", default="put_results")
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model = load_model(args.codec, args.transformer).to(args.device)
    if args.fdm:
        fdm_module = fdm.FDM.from_pretrained(args.fdm)
    else:  # an FDM-authors checkpoint carries its FDM next to the codec
        fdm_module = fdm.FDM.from_official_checkpoint(split_checkpoint(args.codec)["fdm"])
    fdm_module = fdm_module.to(args.device)

    image = read_image(args.image, size=(256, 256)).to(args.device)  # the released models' size
    mask = fdm.load_mask(args.mask, size=(256, 256), white_is_hole=not args.white_is_known).to(args.device)
    result = inpaint(model, image, mask, args.num_samples, top_k=args.top_k, fdm=fdm_module, seed=args.seed)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    masked = torch.where(mask.bool(), torch.ones_like(image), image)[0]
    rows = [torch.cat([masked, result.images_without_fdm[0, k], result.images[0, k]], dim=-1)
            for k in range(args.num_samples)]
    save_image(torch.cat(rows, dim=-2), out / "put_with_and_without_fdm.png")  # input | PUT | PUT + FDM
    for k in range(args.num_samples):
        save_image(result.images[0, k], out / f"sample{k}.png")
    print(f"wrote {args.num_samples} completions to {out}")


if __name__ == "__main__":
    main()
