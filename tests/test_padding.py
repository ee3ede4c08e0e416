"""Images of any size: fdm.padding, the Dequantizer's ``pad`` (encode, reconstruct, decode's ``size``), compare and
``fdm eval --crop``, on the toy model (factor 4) and tiny taming (4), PUT (8) and diffusers (4) models.

Sides that are not multiples of the factor are padded (reflect; replicate where a side is too short) at the bottom
and right, masks as known, and the output cropped back; for multiples the results are bit-identical to the path
without padding, written out here as it was before padding existed (``old_reconstruct``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import fdm
from fdm.errors import InputError
from fdm.evaluation.comparison import compare
from fdm.masks import keep_known, latent_mask
from fdm.padding import crop, pad_image, pad_mask, padded_size

DATA = Path(__file__).parent / "data" / "put"
ODD_SIZES = [(17, 30), (13, 4), (5, 3), (2, 7), (1, 1)]  # one pixel over a multiple, under one step, under reflect
OLD_MESSAGE = "x size 18x16 is not a multiple of the downsampling factor 4; crop or pad to 16x16."


def random_fdm(channels: int) -> fdm.FDM:
    """An FDM that is not the identity (a fresh one would hide a padding mistake on the correction)."""
    module = fdm.FDM(channels, hidden_channels=16, num_blocks=2)
    torch.nn.init.normal_(module.head.weight, std=0.1)
    module.base_model_fingerprint = "not-checked"
    return module.eval()


def dequantizer(model: torch.nn.Module) -> fdm.Dequantizer:
    return fdm.Dequantizer(model, random_fdm(fdm.find_adapter(model).channels), check_fingerprint=False)


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def hole(b: int, h: int, w: int) -> torch.Tensor:
    """A hole in the top-left part of each image (at least one pixel)."""
    mask = torch.zeros(b, 1, h, w)
    mask[..., : max(1, h // 2), : max(1, w // 3)] = 1
    return mask


def old_reconstruct(deq: fdm.Dequantizer, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantizer.reconstruct as it was before padding (sizes multiples of the factor)."""
    adapter = deq.adapter
    z = adapter.encode(x)
    z_q, _ = adapter.quantize(z)
    cells, guide = None, {}
    if mask is not None:
        cells = latent_mask(mask, deq.factor)
        z_q = keep_known(adapter.encode_known(x, mask, z), z_q, cells)
        guide = adapter.decode_guide(x, mask)
    return adapter.decode(deq.fdm(z_q, cells), **guide)


def check_any_size(deq: fdm.Dequantizer, sizes: list[tuple[int, int]], multiple: tuple[int, int]) -> None:
    """Odd sizes round-trip to their own shape through every entry point; a multiple is bit-identical to before."""
    f = deq.factor
    with torch.no_grad():
        for h, w in sizes:
            x, mask = images(2, h, w), hole(2, h, w)
            for m in (None, mask):
                out = deq.reconstruct(x, m)
                assert out.shape == x.shape, (h, w, m is not None)
                padded = deq.reconstruct(pad_image(x, f), None if m is None else pad_mask(m, f))
                assert torch.equal(out, padded[..., :h, :w])  # = reconstructing the padded image, cropped
            z = deq.encode(x)
            assert z.shape[-2:] == (math.ceil(h / f), math.ceil(w / f))
            z_q, indices = deq.quantize(z)
            plain = deq.reconstruct(x)
            assert torch.equal(deq.decode(z_q, size=(h, w)), plain)
            # diffusers' z_q is z + (e - z).detach(): equal to the looked-up codes e up to float rounding
            torch.testing.assert_close(deq.decode_indices(indices, size=x.shape[-2:]), plain, rtol=0, atol=1e-5)
            result = compare(deq, x, mask)
            assert result.vq.shape == result.fdm.shape == x.shape and result.psnr_fdm.shape == (2,)
        x, mask = images(2, *multiple), hole(2, *multiple)
        for m in (None, mask):
            assert torch.equal(deq.reconstruct(x, m), old_reconstruct(deq, x, m))
            assert torch.equal(deq.reconstruct(x, m, pad=False), old_reconstruct(deq, x, m))
            assert torch.equal(compare(deq, x, m).fdm, compare(deq, x, m, pad=False).fdm)


# --- fdm.padding ------------------------------------------------------------------------------------------------


def test_padding_is_a_no_op_for_multiples():
    x, mask = images(1, 8, 12), hole(1, 8, 12)
    assert pad_image(x, 4) is x and pad_mask(mask, 4) is mask and crop(x, (8, 12), 4) is x and crop(x, None, 4) is x
    assert [padded_size(n, 4) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]


def test_reflect_padding_with_replicate_for_short_sides():
    x = torch.arange(15.0).reshape(1, 1, 3, 5)
    padded = pad_image(x, 4)  # width 5 -> 8 (3 < 5: reflect), height 3 -> 4 (1 < 3: reflect)
    assert padded.shape == (1, 1, 4, 8)
    assert torch.equal(padded[..., :3, :5], x)
    assert torch.equal(padded[0, 0, :3, 5:], x[0, 0, :, [3, 2, 1]])  # mirrored, the last column not repeated
    assert torch.equal(padded[0, 0, 3, :5], x[0, 0, 1])
    short = torch.tensor([[[[1.0], [2.0]]]])  # 2 x 1: padding 2 and 3 is too much for reflect
    assert torch.equal(pad_image(short, 4)[0, 0], torch.tensor([[1.0] * 4, [2.0] * 4, [2.0] * 4, [2.0] * 4]))


def test_masks_are_padded_as_known_and_keep_their_dtype():
    for mask in (torch.ones(2, 1, 5, 3), torch.ones(2, 1, 5, 3, dtype=torch.bool)):
        padded = pad_mask(mask, 4)
        assert padded.shape == (2, 1, 8, 4) and padded.dtype == mask.dtype
        assert padded[..., :5, :3].all() and not padded[..., 5:, :].any() and not padded[..., 3:].any()


def test_crop_refuses_a_size_that_does_not_pad_to_the_image():
    image = torch.zeros(1, 3, 8, 8)
    assert crop(image, (5, 8), 4).shape == (1, 3, 5, 8)
    with pytest.raises(InputError, match=r"size 4x8 cannot be cropped from the decoded 8x8 image.*height 5 to 8"):
        crop(image, (4, 8), 4)


# --- the Dequantizer and compare on the toy model (factor 4) --------------------------------------------------


def test_toy_model_any_size(toy_model):
    check_any_size(dequantizer(toy_model), ODD_SIZES, (16, 24))


def test_pad_false_keeps_the_old_refusal(toy_model):
    deq = dequantizer(toy_model)
    x = torch.zeros(1, 3, 18, 16)
    for call in (lambda: deq.reconstruct(x, pad=False), lambda: deq.encode(x, pad=False),
                 lambda: compare(deq, x, pad=False), lambda: deq.prepare(x, pad=False)):
        with pytest.raises(InputError) as info:
            call()
        assert str(info.value) == OLD_MESSAGE


def test_masks_of_the_unpadded_size_work_for_decode_and_attach(toy_model):
    deq = dequantizer(toy_model)
    x, mask = images(1, 13, 6), hole(1, 13, 6)
    with torch.no_grad():
        z_q, _ = deq.quantize(deq.encode(x))  # (1, 8, 4, 2): the padded 16 x 8 image
        cells = latent_mask(pad_mask(mask, 4), 4)
        expected = deq.decode(z_q, cells)
        assert torch.equal(deq.decode(z_q, mask), expected)  # the 13 x 6 pixel mask, padded as known
        assert torch.equal(deq.decode(z_q, pad_mask(mask, 4)), expected)
        with deq.attached(mask):
            assert torch.equal(toy_model.decode(z_q), expected)
    with pytest.raises(InputError, match=r"height 13 to 16, width 5 to 8"):
        deq.decode(z_q, hole(1, 12, 6))


# --- the adapters: taming, PUT, diffusers ---------------------------------------------------------------------


def test_taming_any_size():
    pytest.importorskip("taming")
    from taming_tiny import random_model, vqgan_config

    check_any_size(dequantizer(random_model(vqgan_config())), [(17, 30), (2, 7)], (16, 24))


def test_put_any_size():
    from fdm.adapters.put import load_model

    model = load_model(DATA / "put_tiny_p_vqvae.safetensors", DATA / "put_tiny_transformer.safetensors", n_head=4)
    deq = dequantizer(model)  # factor 8; the guide of its decoder (known pixels) is padded with the image
    check_any_size(deq, [(37, 45), (5, 3)], (32, 48))
    x, mask = images(1, 37, 45), hole(1, 37, 45)
    with torch.no_grad():  # decode with the guide built from the prepared (padded) image, cropped back
        padded, padded_mask = deq.prepare(x, mask)
        z = deq.encode(x, mask)
        z_q = keep_known(z, deq.quantize(z)[0], latent_mask(padded_mask, 8))
        out = deq.decode(z_q, mask, size=x.shape[-2:], **deq.adapter.decode_guide(padded, padded_mask))
        assert torch.equal(deq.decode(z_q, mask, size=x.shape[-2:], image=x), out)  # the guide built from x
    assert out.shape == x.shape


def test_diffusers_any_size():
    pytest.importorskip("diffusers")
    from test_diffusers import build_vqmodel

    for kind in ("group", "spatial"):  # spatial: the MoVQ decoder reads the quantized map twice
        check_any_size(dequantizer(build_vqmodel(kind)), [(17, 30), (2, 7)], (16, 24))


# --- fdm eval --------------------------------------------------------------------------------------------------


def test_eval_with_a_crop_that_is_not_a_multiple_of_the_factor(tmp_path):
    pytest.importorskip("taming")
    from fdm.cli import main
    from fdm.demo.model import ASSETS

    shutil.copy(ASSETS / "chelsea.png", tmp_path / "chelsea.png")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["eval", str(tmp_path), "--crop", "130", "--views-per-image", "1", "--holes", "--json",
                     "--no-extras", "--no-progress"])  # the demo model's factor is 4
    assert code == 0
    report = json.loads(out.getvalue())
    assert report["crop"] == 130 and report["views"] == 1
    for metrics in report["settings"].values():
        assert metrics["psnr"]["vq"] > 15 and 0 < metrics["feature_ratio"] < 1.5
