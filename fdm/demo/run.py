"""`fdm demo`: the embedded VQGAN with and without its FDM (Park & Jung, WACV 2025) on the bundled sample images,
written as two labelled figures, a metrics table and ``metrics.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fdm.demo.model import ASSETS, load_demo_fdm, load_demo_vqgan
from fdm.dequantizer import Dequantizer
from fdm.evaluation.comparison import Comparison, compare
from fdm.evaluation.figures import (
    CHANGE_MAP_FULL,
    ERROR_MAP_WHITE,
    error_change_map,
    error_map,
    masked_input,
    outline,
    worst_region,
    zoom,
)
from fdm.images import image_grid, read_image, to_pil

__all__ = ["SAMPLE_IMAGES", "DemoResult", "box_mask", "format_table", "load_sample", "run_demo"]


#: Bundled sample images (scikit-image's data, public domain / CC0; see assets/SOURCES.md).
SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea")

RECONSTRUCTION_FIGURE = "fdm_demo_reconstruction.png"
INPAINTING_FIGURE = "fdm_demo_inpainting.png"
METRICS_FILE = "metrics.json"
CHANGE_CAPTION = ("Last column: green where FDM's pixels are closer to the original than plain VQ's, magenta where "
                  f"they are farther (full colour at a change of {CHANGE_MAP_FULL} in mean |difference|).")


@dataclass
class DemoResult:
    """What :func:`run_demo` wrote and measured.

    Attributes:
        figures: paths of the reconstruction and inpainting figures.
        metrics: ``{"reconstruction": rows, "inpainting": rows}``, one row per image (``image``, ``psnr_vq``,
            ``psnr_fdm``, ``ssim_vq``, ``ssim_fdm``, ``feature_ratio``) plus a ``mean`` row.
    """

    figures: list[Path]
    metrics: dict[str, list[dict[str, float | str]]]


def load_sample(name: str) -> torch.Tensor:
    """A bundled sample image as a (1, 3, H, W) tensor in [-1, 1]."""
    return read_image(ASSETS / f"{name}.png")


def box_mask(height: int, width: int) -> torch.Tensor:
    """The demo's hole: a box over the middle half of each side, not aligned to latent cells -> (1, 1, H, W)."""
    mask = torch.zeros(1, 1, height, width)
    mask[..., int(0.25 * height) + 1:int(0.75 * height) + 1, int(0.25 * width) + 1:int(0.75 * width) + 1] = 1
    return mask


def _rows(names: list[str], results: list[Comparison]) -> list[dict[str, float | str]]:
    keys = ("psnr_vq", "psnr_fdm", "ssim_vq", "ssim_fdm", "feature_ratio")
    rows = [{"image": n, **{k: float(getattr(r, k)[0]) for k in keys}} for n, r in zip(names, results)]
    rows.append({"image": "mean", **{k: float(np.mean([row[k] for row in rows])) for k in keys}})
    return rows


def format_table(metrics: dict[str, list[dict[str, float | str]]]) -> str:
    """The metrics as a plain-text table (PSNR in dB; feature error = ||z - z_dq|| / ||z - z_q||)."""
    lines = [f"{'setting':<15}{'image':<11}{'PSNR VQ':>9}{'PSNR FDM':>10}{'gain':>7}{'SSIM VQ':>9}{'SSIM FDM':>10}"
             f"{'feat. error':>13}"]
    for setting, rows in metrics.items():
        for row in rows:
            lines.append(f"{setting:<15}{row['image']:<11}{row['psnr_vq']:>9.2f}{row['psnr_fdm']:>10.2f}"
                         f"{row['psnr_fdm'] - row['psnr_vq']:>+7.2f}{row['ssim_vq']:>9.3f}{row['ssim_fdm']:>10.3f}"
                         f"{row['feature_ratio']:>13.3f}")
    return "\n".join(lines)


def _rows_with_zoom(results: list[Comparison], labels: list[str], *, seam: bool) -> tuple[list, list[str]]:
    """Figure rows: per image, the six full tiles (the zoomed region outlined), then the same six zoomed.

    The zoomed region is where plain VQ loses most (``seam=False``), or, for the inpainting figure, a window on the
    hole's top-left corner (``seam=True``), where generated and known cells meet.
    """
    rows, row_labels = [], []
    for r, label in zip(results, labels):
        x, vq, fdm = r.x[0], r.vq[0], r.fdm[0]
        h, w = x.shape[-2:]
        side = min(h, w) // 4
        if seam:
            rows_hole, cols_hole = r.mask[0, 0].nonzero(as_tuple=True)
            corner = (max(0, int(rows_hole.min()) - side // 2), max(0, int(cols_hole.min()) - side // 2))
            first = masked_input(x, r.mask[0])
        else:
            corner = worst_region(x, vq, side)
            first = to_pil(x)
        full = [first, to_pil(vq), to_pil(fdm), error_map(x, vq), error_map(x, fdm), error_change_map(x, vq, fdm)]
        rows.append([outline(tile, corner, side) for tile in full])
        rows.append([zoom(tile, corner, side, h) for tile in [to_pil(x), *full[1:]]])
        row_labels += [label, f"zoom x{h / side:.0f} on the yellow square"]
    return rows, row_labels


def _label(r: Comparison) -> str:
    return (f"PSNR {float(r.psnr_vq[0]):.2f} -> {float(r.psnr_fdm[0]):.2f} dB, SSIM {float(r.ssim_vq[0]):.3f} -> "
            f"{float(r.ssim_fdm[0]):.3f}, feature error ratio {float(r.feature_ratio[0]):.2f}")


@torch.no_grad()
def run_demo(out_dir: str | Path, *, progress: bool = True, device: str | torch.device = "cpu") -> DemoResult:
    """Run the demo: load the embedded models, reconstruct the sample images, write figures and metrics.

    Args:
        out_dir: folder for the figures and ``metrics.json`` (created).
        progress: show a tqdm progress bar.
        device: where the models run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=2 + 2 * len(SAMPLE_IMAGES), desc="fdm demo", unit="step", disable=not progress)
    bar.set_postfix_str("loading the embedded VQGAN and FDM")
    dequantizer = Dequantizer(load_demo_vqgan().to(device), load_demo_fdm().to(device))
    bar.update(1)
    names, plain, masked = list(SAMPLE_IMAGES), [], []
    for name in names:
        x = load_sample(name).to(device)
        bar.set_postfix_str(name)
        plain.append(compare(dequantizer, x))
        bar.update(1)
        masked.append(compare(dequantizer, x, box_mask(*x.shape[-2:]).to(device)))
        bar.update(1)

    factor, codes = dequantizer.factor, dequantizer.adapter.codebook().shape[0]
    rows, row_labels = _rows_with_zoom(plain, [_label(r) for r in plain], seam=False)
    recon = image_grid(
        rows,
        ["original", "VQ reconstruction", "with FDM", "error, VQ", "error, with FDM", "FDM closer / farther"],
        title=f"FDM on the embedded VQGAN (f{factor}, {codes} codes): reconstruction",
        row_labels=row_labels,
        caption="Every latent cell quantized to its nearest code; FDM predicts the quantization error z - z_q from "
                "the codes and adds it back. Zoomed: where plain VQ loses most. Error maps: mean |difference|, "
                f"black = 0, white >= {ERROR_MAP_WHITE}. {CHANGE_CAPTION}",
    )
    rows, row_labels = _rows_with_zoom(masked, [_label(r) for r in masked], seam=True)
    inpaint = image_grid(
        rows,
        ["masked input", "without FDM", "with FDM", "error, without", "error, with FDM", "FDM closer / farther"],
        title=f"FDM on the embedded VQGAN (f{factor}, {codes} codes): inpainting-style decode (oracle sampler)",
        row_labels=row_labels,
        caption="Oracle sampler: hole cells get the nearest codebook entry of the true feature (a perfect sampler), "
                "known cells keep their continuous encoder features. Without FDM the hole is decoded from codes "
                "next to continuous features and shows a seam; FDM corrects the hole cells only. Zoomed: the "
                "hole's corner (the zoomed original shows the true pixels). " + CHANGE_CAPTION,
    )
    figures = [out / RECONSTRUCTION_FIGURE, out / INPAINTING_FIGURE]
    recon.save(figures[0])
    inpaint.save(figures[1])
    metrics = {"reconstruction": _rows(names, plain), "inpainting": _rows(names, masked)}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    bar.update(1)
    bar.close()
    return DemoResult(figures=figures, metrics=metrics)
