"""Weight files that do not fit (issue 12, items 5 and 6): missing, unexpected and mis-shaped keys are named as the
FILE spells them, in every layout the library reads (PUT, the FDM authors' content_codec.* / generator.*, the
official fdm.mix.* / lip.mix.* FDM, taming, diffusers), with the layout the file was read as; integer tensors for
floating-point weights are refused instead of cast."""

from __future__ import annotations

import pytest
import torch
from test_put_checkpoints import _tiny
from torch import nn

import fdm
from fdm.adapters.put import fdm_authors_state_dict, load_model, put_state_dicts
from fdm.errors import CheckpointError, ConfigError
from fdm.io.weights import load_state_dict_strict, write_weights


@pytest.fixture(scope="module")
def put_model():
    return _tiny()


@pytest.fixture(scope="module")
def authors_sd(put_model):
    """A checkpoint in the FDM authors' layout: content_codec.* (explicit-ReLU indices), generator.*, fdm.mix.*."""
    return fdm_authors_state_dict(put_model, fdm.FDM(channels=8))


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as err:
        fn(*args, **kwargs)
    return str(err.value)


# --- load_state_dict_strict ----------------------------------------------------------------------------------


def test_integer_tensor_for_a_float_weight_is_refused_not_cast():
    module = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    state = module.state_dict()
    state["0.weight"] = torch.ones(3, 2, 1, 1, dtype=torch.int64)
    message = _error(load_state_dict_strict, module, state, source="test file")
    assert "0.weight: expected floating point (torch.float32), got torch.int64" in message
    assert "refused, not cast" in message
    state["0.weight"] = torch.ones(3, 2, 1, 1, dtype=torch.bool)
    assert "got torch.bool" in _error(load_state_dict_strict, module, state, source="test file")
    state["0.weight"] = torch.ones(3, 2, 1, 1, dtype=torch.complex64)
    assert "got torch.complex64" in _error(load_state_dict_strict, module, state, source="test file")


def test_entries_that_are_not_name_to_tensor_are_refused():
    module = nn.Sequential(nn.Conv2d(2, 3, 1))
    state = module.state_dict()
    message = _error(load_state_dict_strict, module, {**state, 7: torch.zeros(1), "0.bias": 3}, source="test file")
    assert "must map names to tensors; these entries do not: '0.bias': int, 7: Tensor" in message


def test_integer_buffers_and_other_float_dtypes_still_load():
    module = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    state = module.state_dict()
    assert state["1.num_batches_tracked"].dtype == torch.int64  # an integer buffer stays integer
    state["0.weight"] = torch.full((3, 2, 1, 1), 0.5, dtype=torch.float16)  # copied into float32
    load_state_dict_strict(module, state, source="test file")
    assert module[0].weight.dtype == torch.float32 and float(module[0].weight[0, 0].detach()) == 0.5


def test_file_key_and_layout_spell_every_kind_of_key():
    module = nn.Linear(2, 3)
    state = {"weight": torch.zeros(3, 5), "extra": torch.zeros(1)}  # bias missing, weight mis-shaped
    message = _error(load_state_dict_strict, module, state, source="test file", layout="toy",
                     file_key={"weight": "net.0.w", "bias": "net.0.b", "extra": "net.9.x"})
    assert ("missing keys ['net.0.b'], unexpected keys ['net.9.x'], wrong shapes ['net.0.w: expected (3, 2), got "
            "(3, 5)']") in message
    assert "keys read in the toy layout" in message
    assert "f.bias" in _error(load_state_dict_strict, module, state, source="x", file_key=lambda k: "f." + k)


def test_fdm_weight_file_with_integer_weights(tmp_path):
    module = fdm.FDM(channels=4, hidden_channels=4, num_blocks=1)
    module.save_pretrained(tmp_path)
    state = module.state_dict()
    state["head.bias"] = torch.zeros(4, dtype=torch.int32)
    write_weights(state, tmp_path / "model.safetensors")
    assert "head.bias: expected floating point (torch.float32), got torch.int32" in _error(fdm.FDM.from_pretrained,
                                                                                        tmp_path)


# --- PUT and the FDM authors' layout -------------------------------------------------------------------------


def test_put_layout_keys(put_model):
    codec, _ = put_state_dicts(put_model)
    broken = dict(codec)
    del broken["encoder.res_layers.1.layers.3.bias"]
    broken["decoder.post_layers.1.bias"] = torch.zeros(5)
    broken["quantize.extra"] = torch.zeros(1)
    message = _error(load_model, {"model": broken})
    assert "missing keys ['encoder.res_layers.1.layers.3.bias']" in message
    assert "unexpected keys ['quantize.extra']" in message
    assert "'decoder.post_layers.1.bias: expected (3,), got (5,)'" in message
    assert "keys read in the PUT P-VQVAE layout" in message


def test_fdm_authors_layout_codec_keys_as_the_file_spells_them(authors_sd, tmp_path):
    broken = dict(authors_sd)
    del broken["content_codec.encoder.res_layers.1.layers.2.bias"]  # PUT's (internal) name: ...layers.3.bias
    broken["content_codec.decoder.post_layers.0.bias"] = torch.zeros(5)  # PUT's name: decoder.post_layers.1.bias
    path = tmp_path / "fdm_tuning.pth"
    torch.save({"model": broken}, path)
    message = _error(load_model, path, n_head=2)
    assert "missing keys ['content_codec.encoder.res_layers.1.layers.2.bias']" in message
    assert "'content_codec.decoder.post_layers.0.bias: expected (3,), got (5,)'" in message
    assert "FDM authors' (hyudsl/FDM) content_codec.*" in message and str(path) in message
    assert "layers.3" not in message and "post_layers.1" not in message and "PUT P-VQVAE" not in message


def test_fdm_authors_layout_keys_needed_to_infer_the_sizes(authors_sd):
    broken = dict(authors_sd)
    del broken["content_codec.encoder.post_layers.0.weight"]
    message = _error(load_model, {"model": broken}, n_head=2)
    assert "lack 'content_codec.encoder.post_layers.0.weight'" in message


def test_missing_residual_block_key_is_named_not_a_smaller_model(authors_sd):
    broken = dict(authors_sd)
    del broken["content_codec.encoder.res_layers.0.layers.0.weight"]  # the key block counting looks at
    broken.pop("content_codec.encoder.res_layers.0.layers.0.bias")
    message = _error(load_model, {"model": broken}, n_head=2)
    assert "content_codec.encoder.res_layers.0.layers.0.weight" in message


def test_generator_and_put_transformer_file_keys(put_model, authors_sd):
    broken = dict(authors_sd)
    del broken["generator.blocks.0.ln1.bias"]
    message = _error(load_model, {"model": broken}, n_head=2)
    assert "missing keys ['generator.blocks.0.ln1.bias']" in message and "UQTransformer" in message
    assert "FDM authors' (hyudsl/FDM) generator.*" in message
    _, transformer_file = put_state_dicts(put_model)  # PUT transformer file: unprefixed sampler, content_codec.*
    broken = dict(transformer_file)
    del broken["content_codec.quant_conv.bias"]
    broken["blocks.0.ln1.weight"] = broken["blocks.0.ln1.weight"].long()
    message = _error(load_model, {"model": broken}, n_head=2)
    assert "missing keys ['content_codec.quant_conv.bias']" in message
    assert "PUT transformer-file content_codec.*" in message
    del broken["blocks.0.ln1.weight"]
    broken["content_codec.quant_conv.bias"] = transformer_file["content_codec.quant_conv.bias"]
    broken["blocks.0.ln1.weight"] = transformer_file["blocks.0.ln1.weight"].long()
    message = _error(load_model, {"model": broken}, n_head=2)
    assert "blocks.0.ln1.weight: expected floating point (torch.float32), got torch.int64" in message


# --- official FDM weights ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["fdm.", "lip."])
def test_official_fdm_keys_as_the_file_spells_them(authors_sd, prefix):
    official = {k.replace("fdm.", prefix, 1): v for k, v in authors_sd.items() if k.startswith("fdm.")}
    broken = dict(official)
    del broken[f"{prefix}mix.4.conv.2.weight"]  # fdm.FDM's name: blocks.2.expand.weight
    message = _error(fdm.FDM.from_official_checkpoint, {"model": broken})
    assert f"missing keys ['{prefix}mix.4.conv.2.weight']" in message
    assert f"official FDM {prefix}mix.*" in message and "blocks.2" not in message
    broken = dict(official)
    broken[f"{prefix}mix.5.conv.0.bias"] = torch.zeros(3)
    message = _error(fdm.FDM.from_official_checkpoint, {"model": broken})
    assert f"'{prefix}mix.5.conv.0.bias: expected (4,), got (3,)'" in message
    broken = dict(official, **{f"{prefix}mix.11.weight": torch.zeros(1)})
    assert f"{prefix}mix.11.weight" in _error(fdm.FDM.from_official_checkpoint, {"model": broken})


# --- taming and diffusers ------------------------------------------------------------------------------------


def test_taming_keys_and_first_stage_prefix(tmp_path):
    pytest.importorskip("taming")
    from fdm.adapters.taming import load_model as load_taming
    from taming_tiny import random_model, save_lightning_ckpt, unconditional_config, vqgan_config

    vqgan_sd = random_model(vqgan_config()).state_dict()
    del vqgan_sd["decoder.conv_out.bias"]
    ckpt = save_lightning_ckpt(vqgan_sd, tmp_path / "vqgan.ckpt")
    message = _error(load_taming, vqgan_config(), ckpt)
    assert "missing keys ['decoder.conv_out.bias']" in message and "keys read in the taming layout" in message

    transformer_sd = random_model(unconditional_config()).state_dict()
    del transformer_sd["first_stage_model.decoder.conv_out.bias"]
    transformer_sd["first_stage_model.quant_conv.bias"] = torch.zeros(3)
    ckpt = save_lightning_ckpt(transformer_sd, tmp_path / "transformer.ckpt")
    message = _error(load_taming, vqgan_config(), ckpt)  # a VQGAN config with a transformer checkpoint
    assert "missing keys ['first_stage_model.decoder.conv_out.bias']" in message
    assert "'first_stage_model.quant_conv.bias: expected (8,), got (3,)'" in message
    assert "taming transformer-checkpoint first_stage_model.*" in message


def test_taming_yaml_that_does_not_parse(tmp_path):
    pytest.importorskip("taming")
    from fdm.adapters.taming.loading import load_config

    path = tmp_path / "model.yaml"
    path.write_text("model:\n  target: taming.models.vqgan.VQModel\n  params: {embed_dim: 8,\n")
    with pytest.raises(ConfigError, match=r"model.yaml is not valid YAML: line 4") as err:
        load_config(path)
    assert str(path) in str(err.value)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="holds list, not a mapping"):
        load_config(path)


@pytest.fixture
def diffusers_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.VQModel(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                              block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, num_vq_embeddings=8,
                              norm_num_groups=4, vq_embed_dim=4)
    model.save_pretrained(tmp_path / "vq")
    return tmp_path / "vq"


def test_diffusers_missing_unexpected_and_misshaped_keys(diffusers_folder):
    from safetensors.torch import load_file, save_file

    from fdm.adapters.diffusers import load_model as load_diffusers

    weights = diffusers_folder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["decoder.conv_out.bias"]  # diffusers alone fills it with random values and only warns
    state["decoder.extra.weight"] = torch.zeros(2)
    state["quant_conv.bias"] = torch.zeros(3)
    save_file(state, weights)
    message = _error(load_diffusers, diffusers_folder)
    assert "missing keys ['decoder.conv_out.bias']" in message
    assert "unexpected keys ['decoder.extra.weight']" in message
    assert "'quant_conv.bias: expected (4,), got (3,)'" in message
    assert "diffusers VQModel layout" in message and str(diffusers_folder) in message


def test_diffusers_config_that_does_not_parse(diffusers_folder):
    from fdm.adapters.diffusers import load_model as load_diffusers

    (diffusers_folder / "config.json").write_text('{\n  "act_fn": "silu",\n  "block_out_channels": [8, 8\n}\n')
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON: line 4 column 1"):
        load_diffusers(diffusers_folder)


def test_a_block_index_beyond_the_file_is_refused_before_building(put_model):
    """A crafted key must not make a model of a billion blocks: a block index larger than the file's tensor count
    is refused when the sizes are read from the shapes."""
    codec_file, transformer_file = put_state_dicts(put_model)
    crafted = dict(transformer_file)
    crafted["blocks.1000000000.ln1.weight"] = transformer_file["blocks.0.ln1.weight"]
    message = _error(load_model, {"model": crafted}, n_head=2)
    assert "name block 1000000000 (blocks.1000000000.ln1.weight)" in message and "corrupted or crafted" in message
    crafted = dict(codec_file)
    crafted["encoder.res_layers.99999.layers.1.weight"] = codec_file["encoder.res_layers.0.layers.1.weight"]
    assert "name block 99999" in _error(load_model, crafted)
