"""The latent pipeline is written once (fdm.pipeline): fdm eval's compare decodes exactly what
Dequantizer.reconstruct decodes, with and without holes, on every family, PUT included with a codebook on which its
masked-image features and its whole-image features pick different codes in the holes (the oracle of the docs: the
whole image's nearest codes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fdm
from fdm.evaluation.comparison import compare
from fdm.masks import latent_mask
from fdm.pipeline import encode_latents

DATA = Path(__file__).parent / "data" / "put"


def random_fdm(channels: int) -> fdm.FDM:
    """An FDM that is not the identity (a fresh one would hide a mistake on the corrected map)."""
    module = fdm.FDM(channels, hidden_channels=16, num_blocks=2)
    torch.nn.init.normal_(module.head.weight, std=0.1)
    module.base_model_fingerprint = "not-checked"
    return module.eval()


def images_and_hole(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    hole = torch.zeros(2, 1, h, w)
    hole[0, :, : h // 2, : w // 2] = 1
    hole[1, :, h // 4:, w // 3:] = 1
    return x, hole


def check_compare_is_reconstruct(model: torch.nn.Module, h: int, w: int) -> None:
    deq = fdm.Dequantizer(model, random_fdm(fdm.find_adapter(model).channels), check_fingerprint=False)
    x, hole = images_and_hole(h, w)
    with torch.no_grad():
        for mask in (None, hole):
            result = compare(deq, x, mask)
            assert torch.equal(result.fdm, deq.reconstruct(x, mask).float().clamp(-1, 1))
            assert torch.equal(result.vq, deq.reconstruct(x, mask, use_fdm=False).float().clamp(-1, 1))
            assert not torch.equal(result.fdm, result.vq)  # FDM changed something: the check above can fail


def test_latents_keep_the_known_features_and_quantize_the_whole_image(toy_model):
    adapter = fdm.find_adapter(toy_model)
    x, hole = images_and_hole(16, 24)
    lat = encode_latents(adapter, x, hole)
    z_q, indices = adapter.quantize(adapter.encode(x))
    cells = latent_mask(hole, adapter.factor)
    assert torch.equal(lat.z, adapter.encode(x)) and torch.equal(lat.z_q, z_q) and torch.equal(lat.indices, indices)
    assert torch.equal(lat.z_in, torch.where(cells.bool(), z_q, lat.known))
    assert torch.equal(lat.continuous, torch.where(cells.bool(), lat.z, lat.known))
    plain = encode_latents(adapter, x)
    assert plain.cells is None and plain.known is None and plain.z_in is plain.z_q and plain.guide == {}


def test_toy_model(toy_model):
    check_compare_is_reconstruct(toy_model, 16, 24)


def test_taming():
    pytest.importorskip("taming")
    from taming_tiny import random_model, vqgan_config

    check_compare_is_reconstruct(random_model(vqgan_config()), 16, 24)


def test_put_with_an_informative_codebook():
    from fdm.adapters.put import load_model

    model = load_model(DATA / "put_tiny_p_vqvae.safetensors", DATA / "put_tiny_transformer.safetensors", n_head=4)
    codec, adapter = model.codec, fdm.find_adapter(model)
    x, hole = images_and_hole(32, 48)
    with torch.no_grad():  # the codes PUT quantizes with: whole-image features of these images, one per cell
        z = adapter.encode(x).permute(0, 2, 3, 1).reshape(-1, adapter.channels)
        codes = codec.quantize.known_codes
        codec.quantize.embedding[:codes] = z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[:codes]]
        lat = encode_latents(adapter, x, hole)
        in_holes = lat.cells[:, 0].bool()
        masked_codes = adapter.quantize(lat.known)[1]  # what an oracle on the masked image's features would pick
    assert (masked_codes != lat.indices)[in_holes].any()  # the two oracles differ on this model
    check_compare_is_reconstruct(model, 32, 48)


def test_diffusers():
    pytest.importorskip("diffusers")
    from test_diffusers import build_vqmodel

    for kind in ("group", "spatial"):
        check_compare_is_reconstruct(build_vqmodel(kind), 16, 24)


def test_transformers():
    pytest.importorskip("transformers")
    from test_transformers import build

    for kind in ("janus", "emu3"):
        check_compare_is_reconstruct(build(kind), 16, 24)


def test_vector_quantize():
    pytest.importorskip("vector_quantize_pytorch")
    from test_vector_quantize import build

    for name in ("vq-map", "rvq"):
        check_compare_is_reconstruct(build(name), 16, 24)
