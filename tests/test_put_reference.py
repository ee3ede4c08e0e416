"""PUT adapter against the reference: golden outputs of liuqk3/PUT's own code (tiny widths, seeded weights) and
the key names / shapes of the released PUT and FDM-authors models.

tests/data/put/ holds data produced by running the reference code (not part of this package): the weights in
PUT's file layouts, its outputs, and the released layouts. PUT's decoder there has its finest width set to 8
instead of the hard-coded 64 so the file stays small; every layer's behaviour is PUT's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdm.adapters.put import PUT, PVQVAE, UQTransformer, inpaint, load_model, put_to_fdm_layout

DATA = Path(__file__).parent / "data" / "put"


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(DATA / "put_tiny_golden.safetensors")


@pytest.fixture(scope="module")
def model() -> PUT:
    return load_model(DATA / "put_tiny_p_vqvae.safetensors", DATA / "put_tiny_transformer.safetensors", n_head=4)


def _inputs(golden):
    image = golden["image"] / 127.5 - 1  # PUT's normalisation of 0..255 images
    hole = 1 - golden["known_mask"]  # PUT: 1 = known; here 1 = hole
    return image, hole


def test_sizes_inferred_from_shapes(model):
    assert model.codec.config["encoder_out_channels"] == 24 and model.codec.config["embed_dim"] == 16
    assert model.codec.config["base_channels"] == 8 and model.codec.quantize.known_codes == 32
    assert model.transformer.config["n_layer"] == 2 and model.transformer.seq_len == 24


@torch.no_grad()
def test_encoder_and_quantizer_match_reference(model, golden):
    image, hole = _inputs(golden)
    codec = model.codec
    z = codec.encode(image)
    torch.testing.assert_close(z, golden["features_full"], rtol=0, atol=1e-5)
    assert torch.equal(codec.quantize.quantize(z)[1], golden["tokens_full"])
    z_m = codec.encode(image, hole)
    torch.testing.assert_close(z_m, golden["features_masked"], rtol=0, atol=1e-5)
    z_q, tokens = codec.quantize.quantize(z_m, codec.known_cells(hole, image))
    assert torch.equal(tokens, golden["tokens_masked"])  # known cells < 32 <= cells with holes
    assert (tokens[codec.known_cells(hole, image)] < 32).all() and (tokens[~codec.known_cells(hole, image)] >= 32).all()
    torch.testing.assert_close(z_q, golden["quant_masked"], rtol=0, atol=0)


@torch.no_grad()
def test_guided_decoder_matches_reference(model, golden):
    image, hole = _inputs(golden)
    codec = model.codec
    z_m = codec.encode(image, hole)
    z_q, _ = codec.quantize.quantize(z_m, codec.known_cells(hole, image))
    for z, key in ((z_q, "decoded_tokens"), (z_m, "decoded_continuous")):
        out = (codec.decode(z, image, hole) + 1) * 127.5  # PUT's post_process
        torch.testing.assert_close(out, golden[key], rtol=0, atol=1e-3)


@torch.no_grad()
def test_transformer_logits_match_reference(model, golden):
    image, hole = _inputs(golden)
    logits = model.transformer(model.transformer.embed(model.codec.encode(image, hole)))
    torch.testing.assert_close(logits, golden["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,top_k,cells,seed", [("greedy", 1, 1, 0), ("top5", 5, 1, 123), ("top5_2cells", 5, 2, 7)])
def test_sampler_reproduces_reference_draws(model, golden, name, top_k, cells, seed):
    """Same seed -> the same codes as PUT's sample_largest (same rule, same random-number use)."""
    image, hole = _inputs(golden)
    out = inpaint(model, image, hole, 1, top_k=top_k, cells_per_step=cells, generator=torch.Generator().manual_seed(seed),
                  paste_known=False, quantize_known=True, progress=False)
    assert torch.equal(out.indices[:, 0], golden[f"sample_{name}_tokens"])
    torch.testing.assert_close((out.images[:, 0] + 1) * 127.5, golden[f"sample_{name}_image"], rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def released() -> dict:
    return json.loads((DATA / "released_layout.json").read_text())


def _layout(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def test_full_size_matches_released_put_layout(released):
    with torch.device("meta"):
        codec, transformer = PVQVAE(), UQTransformer()
    assert _layout(codec) == released["put_p_vqvae"]
    assert _layout(transformer) == released["put_transformer"]
    assert sum(p.numel() for p in transformer.parameters()) == 111_252_992  # "111 M" in the paper


def test_full_size_matches_released_fdm_authors_layout(released):
    with torch.device("meta"):
        codec, transformer = PVQVAE(), UQTransformer()
    ours = {f"content_codec.{k}": list(v.shape) for k, v in put_to_fdm_layout(codec.state_dict()).items()}
    ours.update({f"generator.{k}": s for k, s in _layout(transformer).items()})
    theirs = {k: s for k, s in released["fdm_authors"].items() if not k.startswith("fdm.") and k != "temp"}
    assert ours == theirs
