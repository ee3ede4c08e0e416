"""PUT checkpoint loading: PUT and FDM-authors formats, layout round trips, strict checks, Hub ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fdm
from fdm.adapters.put import (
    PUT,
    PVQVAE,
    UQTransformer,
    fdm_authors_state_dict,
    fdm_to_put_layout,
    load_model,
    put_state_dicts,
    put_to_fdm_layout,
    split_checkpoint,
)
from fdm.errors import CheckpointError

DATA = Path(__file__).parent / "data" / "put"


def _tiny() -> PUT:
    codec = PVQVAE(encoder_channels=16, encoder_out_channels=16, encoder_blocks=2, encoder_block_channels=8,
                   num_codes=32, embed_dim=8, known_codes=16, decoder_in_channels=8, decoder_channels=16,
                   decoder_blocks=2, decoder_block_channels=8, base_channels=4)
    return PUT(codec, UQTransformer(embed_dim=8, n_embd=16, n_layer=1, n_head=2, num_codes=16, seq_len=16)).eval()


def _equal_models(a: PUT, b: PUT) -> None:
    for x, y in ((a.codec, b.codec), (a.transformer, b.transformer)):
        sa, sb = x.state_dict(), y.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_layout_remaps_are_inverse_and_only_touch_shifted_layers():
    sd = _tiny().codec.state_dict()
    fdm_layout = put_to_fdm_layout(sd)
    assert fdm_to_put_layout(fdm_layout).keys() == sd.keys()
    changed = sorted(set(fdm_layout) - set(sd))
    assert "encoder.res_layers.1.layers.2.weight" in changed and "decoder.post_layers.0.bias" in changed
    assert all(".layers." in k or ".conv." in k or "post_layers" in k for k in changed)
    assert "decoder.encoder.layers.0.weight" in fdm_layout  # the guide branch keeps its indices


def test_put_files_round_trip(tmp_path):
    model = _tiny()
    codec_sd, transformer_sd = put_state_dicts(model)
    torch.save({"model": {**codec_sd, "loss.discriminator.weight": torch.ones(1)}}, tmp_path / "p_vqvae.pth")
    torch.save({"model": transformer_sd}, tmp_path / "transformer.pth")
    _equal_models(load_model(tmp_path / "p_vqvae.pth", tmp_path / "transformer.pth", n_head=2), model)
    # a PUT transformer file alone carries its codec as content_codec.*
    _equal_models(load_model(tmp_path / "transformer.pth", n_head=2), model)


def test_fdm_authors_checkpoint_round_trip(tmp_path):
    model = _tiny()
    fdm_module = fdm.FDM(channels=8)
    torch.nn.init.normal_(fdm_module.head.weight)
    sd = fdm_authors_state_dict(model, fdm_module)
    assert "content_codec.encoder.res_layers.0.layers.0.weight" in sd and "fdm.mix.10.weight" in sd
    sd.update({"temp": torch.zeros(1), "loss.discriminator.conv.weight": torch.zeros(2)})  # training-only
    path = tmp_path / "fdm_tuning.pth"
    torch.save({"model": sd}, path)
    _equal_models(load_model(path, n_head=2), model)
    loaded = fdm.FDM.from_official_checkpoint(path)
    z = torch.randn(1, 8, 4, 4)
    m = torch.ones(1, 1, 4, 4)
    torch.testing.assert_close(loaded(z, m), fdm_module(z, m))
    parts = split_checkpoint(path)
    assert set(parts["fdm"]) == {k for k in sd if k.startswith("fdm.")}


def test_fdm_authors_format_needs_the_papers_fdm_shape():
    with pytest.raises(ValueError, match="8 blocks"):
        fdm_authors_state_dict(_tiny(), fdm.FDM(channels=8, num_blocks=2))


def test_fdm_convert_script_leftovers_and_lip_prefix_accepted(tmp_path):
    model = _tiny()
    sd = fdm_authors_state_dict(model, fdm.FDM(channels=8))
    sd = {k.replace("fdm.mix.", "lip.mix."): v for k, v in sd.items()}
    sd["content_codec.encoder._post_layers.0.weight"] = torch.zeros(16, 16)  # convert_from_put.py copy
    parts = split_checkpoint({"model": sd})
    assert all(k.startswith("lip.mix.") for k in parts["fdm"])
    _equal_models(load_model({"model": sd}, n_head=2), model)


def test_layout_outputs_agree():
    """The same weights in the FDM layout, mapped back, compute the same function."""
    model = _tiny()
    again = load_model({"model": fdm_authors_state_dict(model)}, n_head=2)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    hole = torch.zeros(1, 1, 32, 32)
    hole[..., 4:20, 6:30] = 1
    with torch.no_grad():
        torch.testing.assert_close(again.codec.reconstruct(x, hole), model.codec.reconstruct(x, hole), rtol=0, atol=0)


def test_strict_checks_name_missing_and_misshaped_keys(tmp_path):
    codec_sd, _ = put_state_dicts(_tiny())
    broken = dict(codec_sd)
    del broken["decoder.up_layers.1.deconv.bias"]
    with pytest.raises(CheckpointError, match="decoder.up_layers.1.deconv.bias"):
        load_model({"model": broken})
    broken = dict(codec_sd)
    broken["quant_conv.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="quant_conv.bias"):
        load_model({"model": broken})
    with pytest.raises(CheckpointError, match="neither"):
        load_model({"model": {**codec_sd, "ema.decay": torch.zeros(1)}})
    with pytest.raises(CheckpointError, match="No P-VQVAE"):
        load_model({"model": {"generator.pos_emb": torch.zeros(1, 4, 2)}})


def test_mismatched_transformer_pair_refused():
    a, b = _tiny(), _tiny()
    codec_sd, _ = put_state_dicts(a)
    _, transformer_sd = put_state_dicts(b)  # trained with b's codebook
    with pytest.raises(CheckpointError, match="not a pair"):
        load_model({"model": codec_sd}, {"model": transformer_sd}, n_head=2)


def test_missing_file_and_bad_repo_id():
    with pytest.raises(FileNotFoundError, match="not found"):  # fdm.io.hub.resolve_file, shared by every loader
        load_model("/nonexistent/p_vqvae.pth")
    with pytest.raises(FileNotFoundError, match="^file not found: justaname.pth$"):  # not tried on the Hub
        load_model("justaname.pth")


def test_hub_id_from_prepared_cache(tmp_path):
    """'hf://owner/repo/file' goes through huggingface_hub.hf_hub_download (offline: a prepared cache)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--put-places"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit / "ckpt"
    snapshot.mkdir(parents=True)
    (snapshot / "p_vqvae.safetensors").write_bytes((DATA / "put_tiny_p_vqvae.safetensors").read_bytes())
    model = load_model("hf://someone/put-places/ckpt/p_vqvae.safetensors", cache_dir=tmp_path, local_files_only=True)
    assert model.transformer is None and model.codec.quantize.num_codes == 64
