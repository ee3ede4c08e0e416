"""taming-transformers adapters and loading: tiny models in the official layouts, and the released full-size
configs built on the meta device with their state-dict keys and shapes checked against the released layout."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import fdm
from fdm.adapters.taming import (
    GumbelVQAdapter,
    Net2NetTransformerAdapter,
    VQModelAdapter,
    build_model,
    load_model,
)
from fdm.errors import CheckpointError

pytest.importorskip("taming")
from taming_tiny import (  # noqa: E402
    class_config,
    gumbel_config,
    random_model,
    save_lightning_ckpt,
    semantic_config,
    unconditional_config,
    vqgan_config,
    write_config,
)


def _randomised_fdm(channels: int, mask_channels: int = 0) -> fdm.FDM:
    module = fdm.FDM(channels, mask_channels=mask_channels, hidden_channels=16, num_blocks=2)
    torch.nn.init.normal_(module.head.weight, std=0.1)  # a non-zero correction
    return module.eval()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def vqgan() -> torch.nn.Module:
    return random_model(vqgan_config())


@pytest.fixture(scope="module")
def transformer() -> torch.nn.Module:
    return random_model(unconditional_config())


# --- loading ---------------------------------------------------------------------------------------------


def test_demo_contract_yaml_and_safetensors(tmp_path, vqgan):
    """The package's demo VQGAN: model.yaml with an Identity loss + unprefixed safetensors."""
    config = vqgan_config()
    config["model"]["params"]["lossconfig"] = {"target": "torch.nn.Identity"}
    path = tmp_path / "vqgan.safetensors"
    save_file(vqgan.state_dict(), str(path))
    loaded = load_model(write_config(config, tmp_path / "vqgan.yaml"), path)
    assert type(loaded).__name__ == "VQModel" and not loaded.training
    assert _same_weights(loaded, vqgan)
    assert sorted(loaded.state_dict())[:3] == ["decoder.conv_in.bias", "decoder.conv_in.weight",
                                               "decoder.conv_out.bias"]


def test_standalone_ckpt_with_loss_keys_and_unknown_callback(tmp_path, vqgan):
    ckpt = save_lightning_ckpt(vqgan.state_dict(), tmp_path / "last.ckpt", loss_keys=True)
    with pytest.raises(pickle.UnpicklingError):  # weights_only refuses the pickled callback...
        torch.load(ckpt, weights_only=True)
    loaded = load_model(write_config(vqgan_config(), tmp_path / "model.yaml"), ckpt)  # ...we do not need it
    assert _same_weights(loaded, vqgan)
    assert "lightning_callbacks_not_installed" not in sys.modules
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(x)[0], vqgan(x)[0])


@pytest.mark.parametrize("make_config", [unconditional_config, class_config, semantic_config, gumbel_config])
def test_ckpt_round_trip(tmp_path, make_config):
    model = random_model(make_config())
    ckpt = save_lightning_ckpt(model.state_dict(), tmp_path / "last.ckpt")
    loaded = load_model(make_config(), ckpt)  # a dict config works too
    assert type(loaded) is type(model) and _same_weights(loaded, model)


def test_missing_and_unexpected_keys_are_named(tmp_path, transformer):
    state = transformer.state_dict()
    del state["transformer.blocks.1.attn.proj.weight"]
    state["transformer.extra.weight"] = torch.zeros(1)
    ckpt = save_lightning_ckpt(state, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match=r"transformer\.blocks\.1\.attn\.proj\.weight.*transformer\.extra"):
        load_model(unconditional_config(), ckpt)
    wrong = transformer.state_dict()
    wrong["transformer.head.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"transformer\.head\.weight: expected \(16, 32\), got \(3, 3\)"):
        load_model(unconditional_config(), save_lightning_ckpt(wrong, tmp_path / "wrong.ckpt"))


def test_vqgan_config_with_transformer_checkpoint_takes_first_stage(tmp_path, transformer):
    ckpt = save_lightning_ckpt(transformer.state_dict(), tmp_path / "transformer.ckpt")
    loaded = load_model(vqgan_config(), ckpt)
    assert _same_weights(loaded, transformer.first_stage_model)


def test_bad_config_and_missing_file(tmp_path, vqgan):
    ckpt = save_lightning_ckpt(vqgan.state_dict(), tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="target"):
        load_model({"model": {"params": {}}}, ckpt)
    with pytest.raises(FileNotFoundError, match="^file not found: .*nope.yaml$"):
        load_model(tmp_path / "nope.yaml", ckpt)


def test_sizes_out_of_bounds_are_refused_before_anything_is_built():
    """A crafted config cannot make taming build millions of modules (even on the meta device): every size is
    bounded (fdm.adapters.taming.compat.SIZE_LIMITS, fdm.config_io.check_sizes), checked before taming builds anything; every shipped
    tiny config and the released layouts stay within."""
    from fdm.errors import ConfigError

    for make in (vqgan_config, gumbel_config, unconditional_config, class_config, semantic_config):
        build_model(make(), device="meta")  # within the bounds
    crafted = [("ddconfig", "num_res_blocks", 10**6, r"model.params.ddconfig.num_res_blocks must be an integer "
                                                      r"from 0 to 64; got 1000000"),
               ("ddconfig", "ch_mult", [1] * 1000, r"ddconfig.ch_mult must be a list of at most 16 entries"),
               ("ddconfig", "ch", True, r"ddconfig.ch must be an integer"),
               (None, "n_embed", -1, r"model.params.n_embed must be an integer from 0 to 1048576; got -1")]
    for section, key, value, message in crafted:
        config = vqgan_config()
        params = config["model"]["params"]
        (params[section] if section else params)[key] = value
        with pytest.raises(ConfigError, match=message):
            build_model(config, device="meta")


def test_hub_download_from_prepared_cache(tmp_path, monkeypatch, vqgan):
    """Hub references go through huggingface_hub.hf_hub_download for real (offline, from its cache)."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-vqgan"
    snapshot = repo / "snapshots" / commit
    (snapshot / "configs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    write_config(vqgan_config(), snapshot / "configs" / "model.yaml")
    save_lightning_ckpt(vqgan.state_dict(), snapshot / "last.ckpt", loss_keys=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = load_model("hf://someone/tiny-vqgan/configs/model.yaml", "hf://someone/tiny-vqgan/last.ckpt")
    assert _same_weights(loaded, vqgan)
    loaded = load_model("configs/model.yaml", "last.ckpt", repo_id="someone/tiny-vqgan")
    assert _same_weights(loaded, vqgan)
    with pytest.raises(FileNotFoundError, match="someone/tiny-vqgan"):
        load_model("configs/model.yaml", "missing.ckpt", repo_id="someone/tiny-vqgan")


@pytest.mark.slow  # a fresh interpreter imports torch and pytorch-lightning
@pytest.mark.parametrize("transformers", ["absent", "installed"])
def test_no_torchvision_transformers_or_network_needed(tmp_path, vqgan, transformers):
    """A fresh interpreter with sockets disabled, transformers absent or installed, loads and samples; taming's
    training script and losses (torchvision, LPIPS download) are never imported, and sys.modules and an installed
    transformers are left as they were."""
    if transformers == "installed":
        pytest.importorskip("transformers")
    model = random_model(unconditional_config())
    ckpt = save_lightning_ckpt(model.state_dict(), tmp_path / "last.ckpt")
    config = write_config(unconditional_config(), tmp_path / "project.yaml")
    block = ('import pytorch_lightning  # imports transformers (via torchmetrics) where it is installed, as taming '
             'would\nsys.modules["transformers"] = None  # then not installed') if transformers == "absent" else ""
    after = ('assert sys.modules["transformers"] is None, "sys.modules was not restored"' if transformers == "absent"
             else 'assert not hasattr(sys.modules["transformers"], "top_k_top_p_filtering"), "transformers was changed"')
    script = textwrap.dedent(f"""
        import socket, sys
        {{block}}
        def refuse(*args, **kwargs):
            raise RuntimeError("network access")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import torch
        from fdm.adapters.taming import load_model
        from fdm.adapters.taming.sampling import decode_indices, sample_unconditional
        model = load_model({str(config)!r}, {str(ckpt)!r})
        images = decode_indices(model, sample_unconditional(model, 2, seed=0, progress=False))
        assert images.shape == (2, 3, 32, 32)
        import taming.modules.transformer.mingpt as mingpt
        assert mingpt.top_k_top_p_filtering.__module__ == "fdm.adapters.taming.compat"
        {{after}}
        loaded = sorted(m for m in sys.modules if m in ("main", "taming.main") or m.startswith("taming.modules.losses"))
        assert not loaded, loaded
        print("ok")
    """).replace("{block}", block).replace("{after}", after)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# --- adapters ------------------------------------------------------------------------------------------------


def test_adapter_matching():
    vq, gumbel = random_model(vqgan_config()), random_model(gumbel_config())
    assert type(fdm.find_adapter(vq)) is VQModelAdapter
    assert type(fdm.find_adapter(gumbel)) is GumbelVQAdapter
    assert type(fdm.find_adapter(random_model(semantic_config()).cond_stage_model)) is VQModelAdapter
    assert not VQModelAdapter.matches(torch.nn.Conv2d(1, 1, 1))


@pytest.mark.parametrize("sane_index_shape", [False, True])
def test_vqmodel_adapter_matches_taming(vqgan, sane_index_shape):
    vqgan.quantize.sane_index_shape = sane_index_shape
    adapter = VQModelAdapter(vqgan)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        z = adapter.encode(x)
        z_q, indices = adapter.quantize(z)
        quant, _, (_, _, taming_indices) = vqgan.encode(x)
    vqgan.quantize.sane_index_shape = False
    assert adapter.factor == 4 and adapter.channels == 8 and z.shape == (2, 8, 8, 12)
    assert torch.equal(z, vqgan.quant_conv(vqgan.encoder(x)))
    assert indices.shape == (2, 8, 12) and torch.equal(indices.flatten(), taming_indices.flatten())
    assert torch.equal(z_q, vqgan.quantize.embedding.weight[indices].permute(0, 3, 1, 2))
    torch.testing.assert_close(z_q, quant)  # taming's straight-through value, up to rounding
    assert torch.equal(adapter.decode(z_q), vqgan.decode(z_q))


def test_attached_fdm_equals_explicit_correction_and_detach_restores(vqgan):
    fdm_module = _randomised_fdm(8)
    deq = fdm.Dequantizer(vqgan, fdm_module)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z_q, _ = deq.quantize(deq.encode(x))
        z_dq = fdm_module(z_q)
        assert not torch.allclose(z_dq, z_q)
        reference = vqgan.decode(z_q)
        explicit = vqgan.decode(z_dq)
        with deq.attached():
            hooked = vqgan.decode(z_q)
        after = vqgan.decode(z_q)
    assert torch.equal(hooked, explicit) and torch.equal(deq.decode(z_q), explicit)
    assert torch.equal(after, reference) and not torch.allclose(explicit, reference)
    assert torch.equal(deq.reconstruct(x, use_fdm=False), reference)


def test_transformer_decode_to_img_with_and_without_fdm(transformer):
    adapter = fdm.find_adapter(transformer)
    assert isinstance(adapter, Net2NetTransformerAdapter)
    assert adapter.fingerprint() == VQModelAdapter(transformer.first_stage_model).fingerprint()
    fdm_module = _randomised_fdm(8)
    deq = fdm.Dequantizer(transformer, fdm_module)
    indices = torch.randint(0, 16, (2, 8, 8))
    zshape = (2, 8, 8, 8)
    with torch.no_grad():
        reference = transformer.decode_to_img(indices.reshape(2, -1), zshape)
        explicit = transformer.first_stage_model.decode(fdm_module(adapter.lookup(indices)))
        with deq.attached():
            hooked = transformer.decode_to_img(indices.reshape(2, -1), zshape)
        after = transformer.decode_to_img(indices.reshape(2, -1), zshape)
    assert torch.equal(hooked, explicit) and torch.equal(deq.decode_indices(indices), explicit)
    assert torch.equal(after, reference) and torch.equal(adapter.decode(adapter.lookup(indices)), reference)


def test_gumbel_ideal_feature_is_expected_code():
    model = random_model(gumbel_config())
    adapter = fdm.find_adapter(model)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        logits = model.quantize.proj(model.quant_conv(model.encoder(x)))  # (1, 16, 8, 8)
        z = adapter.encode(x)
        z_q, indices = adapter.quantize(z)
        # sharpen the distribution: the nearest code to the expected code becomes the most probable one
        model.quantize.proj.weight.mul_(1e3)
        model.quantize.proj.bias.mul_(1e3)
        sharp_logits = model.quantize.proj(model.quant_conv(model.encoder(x)))
        _, sharp_indices = adapter.quantize(adapter.encode(x))
    expected = (logits.softmax(1)[:, :, None] * model.quantize.embed.weight[None, :, :, None, None]).sum(1)
    torch.testing.assert_close(z, expected)
    codebook = model.quantize.embed.weight
    nearest = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 8), codebook).argmin(1).reshape(1, 8, 8)
    assert torch.equal(indices, nearest)
    assert torch.equal(z_q, model.quantize.get_codebook_entry(indices.flatten(), (1, 8, 8, 8)))
    assert torch.equal(sharp_indices, sharp_logits.argmax(1))
    deq = fdm.Dequantizer(model, _randomised_fdm(8))
    with torch.no_grad(), deq.attached():
        hooked = model.decode(z_q)
    assert torch.equal(hooked, model.decode(deq.fdm(z_q)))


# --- released full-size layouts (meta device: no memory, no weights) -------------------------------------


F16 = {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "z_channels": 256,
       "resolution": 256}


def released_vqgan_layout(n_embed: int, embed_dim: int = 256, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Key -> shape of a released f16 VQGAN, written from the architecture (Esser et al., taming's model.py)."""
    ch, mult, blocks, z = F16["ch"], F16["ch_mult"], F16["num_res_blocks"], F16["z_channels"]
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (c,), (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def mid(name, c):
        resblock(f"{name}.mid.block_1", c, c), attn(f"{name}.mid.attn_1", c), resblock(f"{name}.mid.block_2", c, c)

    conv("encoder.conv_in", 3, ch, 3)
    res, cin = F16["resolution"], ch
    for level, m in enumerate(mult):
        for b in range(blocks):
            resblock(f"encoder.down.{level}.block.{b}", cin, ch * m)
            cin = ch * m
            if res in F16["attn_resolutions"]:
                attn(f"encoder.down.{level}.attn.{b}", cin)
        if level < len(mult) - 1:
            conv(f"encoder.down.{level}.downsample.conv", cin, cin, 3)
            res //= 2
    mid("encoder", cin), norm("encoder.norm_out", cin), conv("encoder.conv_out", cin, z, 3)
    conv("quant_conv", z, embed_dim, 1)
    keys["quantize.embedding.weight"] = (n_embed, embed_dim)
    conv("post_quant_conv", embed_dim, z, 1)
    cin = ch * mult[-1]
    conv("decoder.conv_in", z, cin, 3), mid("decoder", cin)
    for level in reversed(range(len(mult))):
        for b in range(blocks + 1):
            resblock(f"decoder.up.{level}.block.{b}", cin, ch * mult[level])
            cin = ch * mult[level]
            if res in F16["attn_resolutions"]:
                attn(f"decoder.up.{level}.attn.{b}", cin)
        if level > 0:
            conv(f"decoder.up.{level}.upsample.conv", cin, cin, 3)
            res *= 2
    norm("decoder.norm_out", cin), conv("decoder.conv_out", cin, 3, 3)
    return {prefix + k: v for k, v in keys.items()}


def released_gpt_layout(vocab: int, block: int, layers: int, width: int) -> dict[str, tuple[int, ...]]:
    keys = {"transformer.tok_emb.weight": (vocab, width), "transformer.pos_emb": (1, block, width),
            "transformer.ln_f.weight": (width,), "transformer.ln_f.bias": (width,),
            "transformer.head.weight": (vocab, width)}
    for n in range(layers):
        p = f"transformer.blocks.{n}"
        for ln in ("ln1", "ln2"):
            keys[f"{p}.{ln}.weight"] = keys[f"{p}.{ln}.bias"] = (width,)
        for lin in ("key", "query", "value", "proj"):
            keys[f"{p}.attn.{lin}.weight"], keys[f"{p}.attn.{lin}.bias"] = (width, width), (width,)
        keys[f"{p}.attn.mask"] = (1, 1, block, block)
        keys[f"{p}.mlp.0.weight"], keys[f"{p}.mlp.0.bias"] = (4 * width, width), (4 * width,)
        keys[f"{p}.mlp.2.weight"], keys[f"{p}.mlp.2.bias"] = (width, 4 * width), (width,)
    return keys


def _f16_config(n_embed: int) -> dict:
    ddconfig = {"double_z": False, "in_channels": 3, "out_ch": 3, "dropout": 0.0, **F16}
    return {"target": "taming.models.vqgan.VQModel",
            "params": {"embed_dim": 256, "n_embed": n_embed, "ddconfig": ddconfig,
                       "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("n_embed", [1024, 16384])
def test_released_f16_vqgan_layout(n_embed):
    model = build_model({"model": _f16_config(n_embed)}, device="meta")
    assert _shapes(model) == released_vqgan_layout(n_embed)
    adapter = fdm.find_adapter(model)
    assert (adapter.factor, adapter.channels) == (16, 256)
    assert _shapes(model)["encoder.down.4.attn.1.q.weight"] == (512, 512, 1, 1)


def test_released_ffhq_transformer_layout():
    config = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "cond_stage_config": "__is_unconditional__", "first_stage_key": "image",
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": {
            "vocab_size": 1024, "block_size": 256, "n_layer": 24, "n_head": 16, "n_embd": 1664}},
        "first_stage_config": {**_f16_config(1024), "params": {**_f16_config(1024)["params"],
                                                               "ckpt_path": "logs/vqgan/last.ckpt"}}}}}
    model = build_model(config, device="meta")
    expected = {**released_vqgan_layout(1024, prefix="first_stage_model."), **released_gpt_layout(1024, 256, 24, 1664)}
    assert _shapes(model) == expected
    assert len(expected) == 2 + 3 + 24 * 17 + len(released_vqgan_layout(1024))
    gpt_params = sum(p.numel() for p in model.transformer.parameters())
    assert 790e6 < gpt_params < 810e6  # the released FFHQ transformer has about 801 M parameters
    assert isinstance(fdm.find_adapter(model), Net2NetTransformerAdapter)
