"""Tests of the transformers family (fdm.adapters.transformers): JanusVQVAE and Emu3VQVAE, tiny seeded models and the
released full-size configs (built on the meta device, nothing downloaded), against transformers' own code: detached
decode == the model's decode bit for bit, attached == explicit correction, loading (folders, whole Janus
checkpoints, a Hub cache, refusals), the feature cache, phase 2 and phase 3, ``fdm eval`` and the example."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hub_cache import hub_cache

import fdm
from fdm.adapters.transformers import Emu3VQAdapter, JanusVQAdapter, load_model
from fdm.errors import CheckpointError, InputError

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # image side of the tiny models (factor 4: 4 x 4 tokens)

JANUS = dict(embed_dim=4, num_embeddings=16, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 2],
             num_res_blocks=1, num_patches=SIZE // 4)
EMU3 = dict(codebook_size=16, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 2],
            num_res_blocks=1, attn_resolutions=[2], temporal_downsample_factor=2, hidden_size=64)


def smooth_images(n: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) smooth random images in [-1, 1]."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def build(kind: str) -> torch.nn.Module:
    """A tiny seeded tokenizer whose codebook is drawn from its own encoder features (so codes are used evenly)."""
    torch.manual_seed(0)
    if kind == "janus":
        model = transformers.JanusVQVAE(transformers.JanusVQVAEConfig(**JANUS)).eval()
    else:
        model = transformers.Emu3VQVAE(transformers.Emu3VQVAEConfig(**EMU3)).eval()
    z = fdm.find_adapter(model).encode(smooth_images(8, seed=1))
    feats = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    model.quantize.embedding.weight.copy_(feats[torch.randperm(len(feats))[: model.quantize.embedding.num_embeddings]])
    return model


def random_fdm(model: torch.nn.Module) -> fdm.FDM:
    """A small FDM for ``model`` (its fingerprint recorded) whose head is randomised: the correction is no identity."""
    module = fdm.FDM(4, hidden_channels=16, num_blocks=2, base_model_fingerprint=fdm.find_adapter(model).fingerprint())
    torch.nn.init.normal_(module.head.weight, std=0.1)
    return module.eval()


def own_decode(model, indices: torch.Tensor) -> torch.Tensor:
    """transformers' own decode of (B, h, w) code indices (Janus takes them flat, (B, h*w))."""
    return model.decode(indices.flatten(1) if isinstance(model, transformers.JanusVQVAE) else indices)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {kind: build(kind) for kind in ("janus", "emu3")}


@pytest.fixture(params=["janus", "emu3"])
def model(request, models):
    return models[request.param]


@pytest.fixture
def hole_mask() -> torch.Tensor:
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[0, :, 2:10, 4:14] = 1
    mask[1, :, 8:16, 0:6] = 1
    return mask


def test_adapters_are_found_from_the_type_without_importing_transformers_at_import_fdm(model):
    adapter = fdm.find_adapter(model)
    assert type(adapter) is (JanusVQAdapter if isinstance(model, transformers.JanusVQVAE) else Emu3VQAdapter)
    assert (adapter.factor, adapter.channels) == (4, 4)
    assert adapter.codebook().shape == (16, 4)
    assert adapter.decoder_modules() == {"post_quant_conv": model.post_quant_conv, "decoder": model.decoder}
    deq = fdm.Dequantizer(model, random_fdm(model))  # no adapter named
    assert deq.reconstruct(smooth_images(1, size=20)).shape == (1, 3, 20, 20)  # padded to the factor, cropped back
    code = ("import sys, fdm, fdm.adapters.transformers, fdm.registry; fdm.registry.get_family('transformers'); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.stdout.strip() == "False"


@torch.no_grad()
def test_detached_decode_equals_the_models_own_decode(model):
    x = smooth_images(2)
    deq = fdm.Dequantizer(model, random_fdm(model))
    z_q, indices = deq.quantize(deq.encode(x))
    assert indices.shape == (2, 4, 4) and indices.unique().numel() >= 6  # the codebook is really used
    assert torch.equal(deq.adapter.decode(z_q), own_decode(model, indices))
    assert torch.equal(deq.adapter.decode(deq.adapter.lookup(indices)), own_decode(model, indices))
    if isinstance(model, transformers.JanusVQVAE):  # unit-norm codes: transformers' encode picks the same ones
        assert torch.equal(model.encode(x).image_tokens.reshape(2, 4, 4), indices)
        assert torch.equal(deq.reconstruct(x, use_fdm=False), model(x).decoded_pixel_values)
        assert torch.equal(z_q, model.quantize.get_codebook_entry(indices.flatten(1)))
    else:
        tokens = model.encode(x, image_sizes=torch.tensor([[SIZE, SIZE]] * 2)).image_tokens
        assert torch.equal(torch.stack(tokens), indices)
        assert torch.equal(deq.reconstruct(x, use_fdm=False), model.decode(torch.stack(tokens)))
    with pytest.raises(InputError, match=r"\(B, h, w\)"):
        deq.adapter.lookup(indices.flatten(1))


@torch.no_grad()
def test_janus_quantizes_like_deepseeks_release_with_normalised_features_and_codes(models):
    model = build("janus")
    model.quantize.embedding.weight.mul_(torch.linspace(0.2, 3, 16).unsqueeze(1))  # codes of unequal norms
    adapter = fdm.find_adapter(model)
    z = adapter.encode(smooth_images(4))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4, 4, 4))
    z_q, indices = adapter.quantize(z)
    cosine = z.permute(0, 2, 3, 1) @ F.normalize(model.quantize.embedding.weight, dim=-1).T  # (B, h, w, N)
    assert torch.equal(indices, cosine.argmax(-1))
    assert torch.equal(z_q, model.quantize.get_codebook_entry(indices.flatten(1)))  # what the decoder reads
    own = model.encode(smooth_images(4)).image_tokens.reshape(4, 4, 4)  # transformers: unnormalised search
    assert (own != indices).any()  # the difference docs/transformers.md describes


@torch.no_grad()
@pytest.mark.parametrize("masked", [False, True])
def test_attached_decode_equals_the_explicit_correction(model, masked, hole_mask):
    x = smooth_images(2)
    deq = fdm.Dequantizer(model, random_fdm(model))
    mask = hole_mask if masked else None
    z_q, indices = deq.quantize(deq.encode(x))
    plain = own_decode(model, indices)
    with deq.attached(mask):
        corrected = own_decode(model, indices)
    assert torch.equal(corrected, deq.decode_indices(indices, mask))
    assert torch.equal(corrected, deq.decode(z_q, mask))
    assert torch.equal(own_decode(model, indices), plain)  # detached: nothing left behind
    assert (corrected - plain).abs().max() > 1e-2


@torch.no_grad()
def test_emu3_corrects_the_spatial_norm_condition_too(models):
    model = models["emu3"]
    deq = fdm.Dequantizer(model, random_fdm(model))
    z_q, indices = deq.quantize(deq.encode(smooth_images(2)))
    z_dq = deq.correct(z_q)
    both = deq.adapter.decode(z_dq)
    input_only = deq.adapter.decode(z_dq, condition=z_q)
    assert torch.equal(deq.decode(z_q), both) and (both - input_only).abs().max() > 1e-3
    quant = z_q.unsqueeze(1)  # (B, T=1, C, h, w), as Emu3VQVAE.decode hands it to the decoder
    post = model.post_quant_conv(z_q.unsqueeze(2)).permute(0, 2, 1, 3, 4)
    with deq.attached():
        direct = model.decoder(post, quant_states=quant)  # called directly: the condition alone is corrected
        with pytest.raises(InputError, match="one latent frame"):
            model.decode(indices.unsqueeze(1).repeat(1, 2, 1, 1))  # a video is refused while attached
    expected = model.decoder(post, z_dq.unsqueeze(1))
    assert torch.equal(direct, expected)
    with pytest.raises(InputError, match="shape of z"):
        deq.adapter.decode(z_q, condition=z_q[:1])


def test_released_configs_have_the_shapes_the_adapters_rely_on():
    """The defaults of JanusVQVAEConfig / Emu3VQVAEConfig are the released tokenizers' sizes (Janus: 16384 codes of
    8, f16; Emu3: 32768 codes of 4, f8); built on the meta device, run through the adapter for shapes only."""
    with torch.device("meta"):
        janus = transformers.JanusVQVAE(transformers.JanusVQVAEConfig()).eval()
        emu3 = transformers.Emu3VQVAE(transformers.Emu3VQVAEConfig()).eval()
    expected = {
        janus: ((16, 8, 16384), {"quantize.embedding.weight": (16384, 8), "quant_conv.weight": (8, 256, 1, 1),
                                 "post_quant_conv.weight": (256, 8, 1, 1), "decoder.conv_in.weight": (512, 256, 3, 3)}),
        emu3: ((8, 4, 32768), {"quantize.embedding.weight": (32768, 4), "quant_conv.conv.weight": (4, 4, 3, 1, 1),
                               "post_quant_conv.conv.weight": (4, 4, 3, 1, 1),
                               "decoder.conv_in.weight": (1024, 4, 3, 3),
                               "decoder.norm_out.conv_y.weight": (256, 4, 1, 1)}),
    }
    for model, ((factor, channels, codes), shapes) in expected.items():
        adapter = fdm.find_adapter(model)
        assert (adapter.factor, adapter.channels, len(adapter.codebook())) == (factor, channels, codes)
        state = model.state_dict()
        assert {k: tuple(state[k].shape) for k in shapes} == shapes
        x = torch.empty(1, 3, 2 * factor, 3 * factor, device="meta")
        z_q, indices = adapter.quantize(adapter.encode(x))
        assert z_q.shape == (1, channels, 2, 3) and indices.shape == (1, 2, 3)
        assert adapter.decode(z_q).shape == (1, 3, 2 * factor, 3 * factor)
    assert emu3.config.temporal_downsample_factor == 4 and janus.config.num_patches == 32


def test_feature_cache_gives_the_quantizers_features(model, tmp_path):
    from fdm.training import FeatureCache, TensorViews

    views = TensorViews(smooth_images(5))
    adapter = fdm.find_adapter(model)
    with torch.no_grad():
        z = adapter.encode(views.images)
        z_q, _ = adapter.quantize(z)
    cache = FeatureCache(adapter, views, mode="disk", cache_dir=tmp_path, dtype="float32", batch_size=5,
                         progress=False)
    cache.prepare()
    got_z, got_z_q = cache.get(list(range(5)))
    assert torch.equal(got_z, z) and torch.equal(got_z_q, z_q)


def test_phase2_then_phase3_run_on_each_tokenizer(model, tmp_path):
    from fdm.training import Phase2Config, TensorViews, train_phase2
    from fdm.training.phase3 import Phase3Config, Phase3Trainer

    views = TensorViews(smooth_images(4, seed=2))
    adapter = fdm.find_adapter(model)
    start = fdm.FDM(adapter.channels, hidden_channels=16, num_blocks=2)
    p2 = Phase2Config(steps=3, batch_size=2, warmup_steps=1, progress=False, checkpoint_every=0, log_every=100,
                      output_dir=str(tmp_path / "p2"), base_model="tiny")
    phase2 = train_phase2(model, views, p2, fdm_module=start)
    assert phase2.base_model_fingerprint == adapter.fingerprint()
    p3 = Phase3Config(steps=2, batch_size=2, warmup_steps=1, drop_vgg_terms=True, disc_channels=8,
                      start_steps={"adversarial": 100}, log_every=0, val_every=0, checkpoint_every=0,
                      progress=False, output_dir=str(tmp_path / "p3"))
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    trainer = Phase3Trainer(model, phase2, views, p3)
    tuned = trainer.train()
    assert tuned.finetuned_decoder and all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in before.items())
    # batch-norm layers (Emu3's temporal blocks) keep the base model's running statistics
    tuned_state = trainer.generator.decoder.state_dict()
    stats = [k for k in tuned_state if k.endswith(("running_mean", "running_var"))]
    assert stats or type(model).__name__ == "JanusVQVAE"  # Emu3's decoder has batch norms
    assert all(torch.equal(tuned_state[k], before[k.split(".", 1)[1]]) for k in stats if k.split(".", 1)[0] == "decoder")
    deq = fdm.Dequantizer(model, fdm.FDM.from_pretrained(tmp_path / "p3" / "fdm"))  # the tuned decoder, on a copy
    with torch.no_grad():
        assert torch.isfinite(deq.reconstruct(smooth_images(1))).all()
        changed = any(not torch.equal(v, deq.model.decoder.state_dict()[k]) for k, v in before.items())
    assert changed


def test_load_model_reads_folders_whole_checkpoints_and_a_hub_cache(models, tmp_path):
    x = smooth_images(1)
    for kind, model in models.items():
        model.save_pretrained(tmp_path / kind)
        loaded = load_model(tmp_path / kind)
        assert type(loaded) is type(model) and not loaded.training
        with torch.no_grad():
            assert torch.equal(fdm.Dequantizer(loaded, random_fdm(model)).reconstruct(x, use_fdm=False),
                               fdm.Dequantizer(model, random_fdm(model)).reconstruct(x, use_fdm=False))

    whole = tiny_janus_model(models["janus"])  # a real JanusForConditionalGeneration, saved in two shards
    deq = fdm.Dequantizer(whole.model.vqmodel, random_fdm(models["janus"]))
    with torch.no_grad():
        tokens = deq.quantize(deq.encode(x))[1]
        with deq.attached():  # Janus's image generation ends in decode_image_tokens: FDM applies, code unchanged
            generated = whole.decode_image_tokens(tokens.flatten(1))  # (B, H, W, 3)
        assert torch.equal(generated, deq.decode_indices(tokens).permute(0, 2, 3, 1))
    whole.save_pretrained(tmp_path / "janus-pro", max_shard_size="1MB")
    assert (tmp_path / "janus-pro" / "model.safetensors.index.json").is_file()
    files = {p.name: p for p in (tmp_path / "janus-pro").iterdir()}
    cache = hub_cache(tmp_path / "cache", "someone/tiny-janus-pro", files)
    for source, kwargs in [(tmp_path / "janus-pro", {}),
                           ("someone/tiny-janus-pro", {"cache_dir": cache, "local_files_only": True})]:
        tokenizer = load_model(source, **kwargs)
        assert type(tokenizer) is transformers.JanusVQVAE
        assert all(torch.equal(v, models["janus"].state_dict()[k]) for k, v in tokenizer.state_dict().items())


def test_load_model_reads_an_emu3_checkpoint_in_the_hub_layout(models, tmp_path):
    """Emu3's Hub checkpoints keep the tokenizer under ``vqmodel.`` beside ``text_model.`` (the layout transformers'
    conversion mapping renames on load); the config's ``vq_config`` describes it."""
    from safetensors.torch import save_file

    model = models["emu3"]
    folder = tmp_path / "emu3-chat"
    folder.mkdir()
    tensors = {f"vqmodel.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["text_model.model.embed_tokens.weight"] = torch.zeros(8, 4)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "emu3", "vq_config": model.config.to_dict()}))
    loaded = load_model(folder)
    assert type(loaded) is transformers.Emu3VQVAE
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    del tensors["vqmodel.decoder.conv_out.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="vqmodel.decoder.conv_out.bias"):
        load_model(folder)


@torch.no_grad()
def tiny_janus_model(vqmodel) -> torch.nn.Module:
    """A tiny JanusForConditionalGeneration around ``vqmodel``'s config and weights."""
    config = transformers.JanusConfig(
        text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 64},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": SIZE, "patch_size": 4, "projection_dim": 32},
        vq_config={**JANUS, "projection_dim": 32, "image_token_embed_dim": 32})
    whole = transformers.JanusForConditionalGeneration(config).eval()
    whole.model.vqmodel.load_state_dict(vqmodel.state_dict())
    return whole


def test_load_model_refusals_are_one_clear_line(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found: .*nowhere"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model of type 'llama'; expected a JanusVQVAE / Emu3VQVAE"):
        load_model(tmp_path / "other")
    models["janus"].save_pretrained(tmp_path / "pickled")  # the same tokenizer with pickled weights only
    (tmp_path / "pickled" / "model.safetensors").unlink()
    torch.save(models["janus"].state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors weights expected"):
        load_model(tmp_path / "pickled")
    models["emu3"].save_pretrained(tmp_path / "big")
    config = json.loads((tmp_path / "big" / "config.json").read_text())
    (tmp_path / "big" / "config.json").write_text(json.dumps({**config, "num_res_blocks": 10**6}))
    with pytest.raises(fdm.errors.ConfigError, match="num_res_blocks"):
        load_model(tmp_path / "big")
    with pytest.raises(CheckpointError, match="holds no config.json; expected the layout JanusVQVAE / Emu3VQVAE"):
        load_model(tmp_path / "other" / "..")  # a folder without config.json
    with pytest.raises(fdm.errors.HubError):
        load_model("someone/not-cached", cache_dir=tmp_path / "empty", local_files_only=True)


def test_missing_transformers_names_the_extra(monkeypatch, models, tmp_path):
    models["janus"].save_pretrained(tmp_path / "janus")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install "\.\[transformers\]"'):
        load_model(tmp_path / "janus")


def test_fdm_eval_on_a_saved_tokenizer(models, tmp_path):
    from PIL import Image

    from fdm.cli import main

    models["janus"].save_pretrained(tmp_path / "janus")
    random_fdm(models["janus"]).save_pretrained(tmp_path / "fdm")
    (tmp_path / "photos").mkdir()
    for i in range(2):
        pixels = ((smooth_images(1, size=40, seed=i)[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp_path / "photos" / f"{i}.png")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["eval", str(tmp_path / "photos"), "--model", "transformers", "--checkpoint",
                     str(tmp_path / "janus"), "--fdm", str(tmp_path / "fdm"), "--device", "cpu", "--json",
                     "--no-extras", "--no-progress", "--crop", "32", "--views-per-image", "1", "--holes"])
    assert code == 0, err.getvalue()
    report = json.loads(out.getvalue())
    assert report["views"] == 2 and report["model"] == "transformers"
    assert set(report["settings"]["reconstruction"]["psnr"]) == {"vq", "fdm"}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err := io.StringIO()):
        code = main(["eval", str(tmp_path / "photos"), "--model", "transformers", "--checkpoint",
                     str(tmp_path / "missing"), "--fdm", str(tmp_path / "fdm"), "--no-progress"])
    assert code == 2 and err.getvalue().strip().count("\n") == 0 and "missing" in err.getvalue()


def test_example_script(models, tmp_path):
    from PIL import Image

    models["janus"].save_pretrained(tmp_path / "janus")
    random_fdm(models["janus"]).save_pretrained(tmp_path / "fdm")
    pixels = ((smooth_images(1, size=24)[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(tmp_path / "photo.png")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import janus_tokenizer
    finally:
        sys.path.remove(str(ROOT / "examples"))
    metrics = janus_tokenizer.main(["--checkpoint", str(tmp_path / "janus"), "--fdm", str(tmp_path / "fdm"),
                                    "--out", str(tmp_path / "out"), "--size", "16", "--device", "cpu",
                                    str(tmp_path / "photo.png")])
    for name in ("photo_vq.png", "photo_fdm.png"):
        with Image.open(tmp_path / "out" / name) as image:
            assert image.size == (16, 16)
    assert set(metrics["photo.png"]) == {"psnr_vq", "psnr_fdm"}
    assert metrics["photo.png"]["psnr_vq"] != metrics["photo.png"]["psnr_fdm"]
