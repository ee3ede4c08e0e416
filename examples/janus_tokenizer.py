"""Reconstruct images with Janus's image tokenizer (transformers' ``JanusVQVAE``) without and with FDM (Park & Jung,
WACV 2025).

    python examples/janus_tokenizer.py --checkpoint FOLDER|owner/repo [--fdm FOLDER|owner/repo] --out DIR \\
        [--size 384] [--device cuda] photo.jpg [more.jpg ...]

Writes ``NAME_vq.png`` (the tokenizer's own reconstruction) and, with ``--fdm``, ``NAME_fdm.png`` into ``--out`` and
prints PSNR against the input.

Weights: a transformers-format Janus checkpoint, a folder or Hub repo with ``config.json`` and ``model*.safetensors``
(``model.safetensors.index.json`` for sharded ones), for example ``deepseek-community/Janus-Pro-1B`` on the Hugging
Face Hub (the repo transformers' JanusConfig names); only the tokenizer's shards are read. A folder written by
``JanusVQVAE.save_pretrained`` works too. DeepSeek's original-format repos (``deepseek-ai/Janus-Pro-1B``,
``deepseek-ai/Janus-Pro-7B``, ``deepseek-ai/Janus-1.3B``) use another layout and are not read. Needs
``pip install ".[transformers]"``; nothing is downloaded unless you name a Hub repo.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

import fdm
from fdm.adapters.transformers import load_model
from fdm.evaluation.metrics import psnr
from fdm.images import read_image, save_image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="input images (resized to --size x --size)")
    parser.add_argument("--checkpoint", required=True,
                        help="Janus checkpoint (transformers format) or JanusVQVAE folder, local or a Hub repo id")
    parser.add_argument("--fdm", help="FDM folder or Hub repo id trained for this tokenizer (optional)")
    parser.add_argument("--out", default="janus_fdm", help="output folder")
    parser.add_argument("--size", type=int, default=384, help="side in pixels (Janus generates 384; multiple of 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Reconstruct every image; returns the PSNRs it prints, by image name (``psnr_vq``, and ``psnr_fdm`` with
    ``--fdm``)."""
    args = parse_args(argv)
    model = load_model(args.checkpoint).to(args.device)
    module = fdm.FDM.from_pretrained(args.fdm).to(args.device) if args.fdm else None
    dequantizer = fdm.Dequantizer(model, module) if module is not None else None
    adapter = fdm.find_adapter(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, dict[str, float]] = {}
    for path in map(Path, args.images):
        x = read_image(path, (args.size, args.size)).to(args.device)
        z_q, _ = adapter.quantize(adapter.encode(x))
        results = {"vq": adapter.decode(z_q).clamp(-1, 1)}
        if dequantizer is not None:
            results["fdm"] = dequantizer.decode(z_q).clamp(-1, 1)
        metrics[path.name] = {}
        for name, image in results.items():
            save_image(image[0].cpu(), out / f"{path.stem}_{name}.png")
            metrics[path.name][f"psnr_{name}"] = psnr(image, x).item()
        print(path.name, "  ".join(f"{k} {v:.2f} dB" for k, v in metrics[path.name].items()))
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
