"""Pluralistic inpainting with PUT (CVPR 2022) and FDM (WACV 2025): sample codes for the hole cells with the
UQ-Transformer, then decode [continuous features on known cells, sampled codes on generated cells], with the
FDM correction on generated cells when an FDM is given (hyudsl/FDM ``InpaintingModel.sample``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdm.adapters.put.model import PUT
from fdm.adapters.put.sampler import sample_codes
from fdm.dequantizer import Dequantizer
from fdm.errors import InputError
from fdm.masks import keep_known
from fdm.module import FDM
from fdm.validation import check_image, check_pixel_mask

__all__ = ["InpaintOutput", "inpaint"]


@dataclass
class InpaintOutput:
    """Result of :func:`inpaint`. ``N`` = ``num_samples``; images in [-1, 1].

    Attributes:
        images: (B, N, 3, H, W) completions, FDM-corrected when an FDM was given.
        images_without_fdm: (B, N, 3, H, W) the same samples decoded without FDM, or None without an FDM.
        indices: (B, N, h, w) codes: sampled on generated cells, the nearest known-patch code elsewhere.
        cell_mask: (B, 1, h, w) float, 1 = generated cell (its patch has a hole pixel).
    """

    images: torch.Tensor
    images_without_fdm: torch.Tensor | None
    indices: torch.Tensor
    cell_mask: torch.Tensor


@torch.no_grad()
def inpaint(
    model: PUT,
    image: torch.Tensor,
    mask: torch.Tensor,
    num_samples: int = 1,
    *,
    top_k: int = 50,
    fdm: FDM | None = None,
    temperature: float = 1.0,
    cells_per_step: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    paste_known: bool = True,
    quantize_known: bool = False,
    progress: bool = True,
    check_fingerprint: bool = True,
) -> InpaintOutput:
    """Fill the holes of ``image`` with ``num_samples`` different completions.

    Args:
        model: a :class:`PUT` with its UQ-Transformer (:func:`fdm.adapters.put.load_model`).
        image: (B, 3, H, W) in [-1, 1], H and W multiples of the patch size (8), on the model's device.
        mask: (B, 1, H, W) or (1, 1, H, W), 1 = hole (the library's convention; PUT's files use 1 = known).
        num_samples: completions per image.
        top_k: codes kept per cell before drawing (50 in the paper); 1 = greedy and deterministic.
        fdm: an FDM trained for this model; applied to the generated cells before decoding.
        temperature: softmax temperature of the draws (PUT: 1).
        cells_per_step: cells filled per transformer pass; 1 reproduces PUT, more is faster and approximate.
        seed / generator: make the draws reproducible (``seed`` builds a generator on the model's device).
        paste_known: copy the known pixels of ``image`` into the outputs.
        quantize_known: decode known cells from their nearest code, as PUT's release does, instead of their
            continuous features (the FDM paper's pipeline, the default).
        progress: tqdm bar over the sampling steps.
        check_fingerprint: refuse an FDM recorded for another codebook.

    Returns:
        :class:`InpaintOutput`.
    """
    if not isinstance(model, PUT) or model.transformer is None:
        raise InputError("inpaint needs a PUT model with its UQ-Transformer: load_model(codec, transformer=...).")
    codec = model.codec
    check_image(image, factor=codec.patch_size)
    check_pixel_mask(mask, image)  # the one binary check of the mask; the steps below take it as checked
    if num_samples < 1:
        raise InputError(f"num_samples must be >= 1; got {num_samples}.")
    b, n = image.shape[0], num_samples
    device = codec.post_quant_conv.weight.device
    if image.device != device or mask.device != device:
        raise InputError(f"image and mask must be on the model's device ({device}); got {image.device} and "
                         f"{mask.device}.")
    mask = mask.to(image.dtype).expand(b, -1, -1, -1)
    if generator is None and seed is not None:
        generator = torch.Generator(device).manual_seed(seed)

    z = codec.encode(image, mask)  # (B, C, h, w) features of the masked image
    known = codec.known_cells(mask, image)  # (B, h, w), True = known (PUT's convention)
    _, known_idx = codec.quantize.quantize(z, known)  # (B, h, w)
    x, m, z, known, known_idx = (t.repeat_interleave(n, dim=0) for t in (image, mask, z, known, known_idx))
    codes = sample_codes(model.transformer, codec.quantize.embedding, z, known, top_k=top_k,
                         temperature=temperature, cells_per_step=cells_per_step, generator=generator,
                         progress=progress)  # (B*N, h, w), -1 on known cells
    indices = torch.where(known, known_idx, codes)
    features = codec.quantize.lookup(indices)
    cells = (~known[:, None]).to(features.dtype)  # (B*N, 1, h, w), 1 = generated
    if not quantize_known:
        features = keep_known(z, features, cells)  # (B*N, C, h, w)

    plain = codec.decode(features, x, m)
    corrected = None
    if fdm is not None:
        deq = Dequantizer(model, fdm, check_fingerprint=check_fingerprint)
        z_dq = deq.fdm(features, cells, check_binary=False)
        corrected = deq.adapter.decode(z_dq, image=x, pixel_mask=m)  # deq's adapter: the phase-3 decoder if any
    if paste_known:
        plain = torch.where(m.bool(), plain, x)
        corrected = None if corrected is None else torch.where(m.bool(), corrected, x)

    def per_image(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, n, *t.shape[1:])

    return InpaintOutput(
        images=per_image(plain if corrected is None else corrected),
        images_without_fdm=None if corrected is None else per_image(plain),
        indices=per_image(indices),
        cell_mask=(~known[::n, None]).to(image.dtype),
    )
