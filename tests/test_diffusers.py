"""Tests of the diffusers VQModel adapter (fdm.adapters.diffusers) on tiny VQModels built from configs: exact
agreement with diffusers' own decode paths, attach == explicit correction (also for aMUSEd-style
``lookup_from_codebook`` and MoVQ-style spatially normalised decoders), loading from folders and a Hub cache,
phase-2 training, and the example script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hub_cache import hub_cache

import fdm
from fdm.adapters.diffusers import DiffusersVQAdapter, load_model
from fdm.errors import CheckpointError, InputError
from fdm.evaluation.metrics import feature_error_ratio
from fdm.losses.qe import qe_loss

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]

_BASE = dict(
    down_block_types=("DownEncoderBlock2D",) * 3,  # factor 4
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 16, 32),
    layers_per_block=1,
    latent_channels=4,
    num_vq_embeddings=8,
    norm_num_groups=8,
)
CONFIGS = {
    "group": dict(_BASE, vq_embed_dim=6),  # code dimension differs from latent_channels
    "lookup": dict(_BASE, vq_embed_dim=6, lookup_from_codebook=True),  # aMUSEd
    "spatial": dict(_BASE, norm_type="spatial", block_out_channels=(32, 32, 32)),  # MoVQ (SpatialNorm: 32 groups)
}


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) smooth random images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def build_vqmodel(kind: str) -> torch.nn.Module:
    """A tiny VQModel whose codebook is drawn from its own encoder features (so codes are used evenly)."""
    torch.manual_seed(0)
    model = diffusers.VQModel(**CONFIGS[kind]).eval()
    with torch.no_grad():
        z = model.encode(smooth_images(8, seed=1)).latents  # (8, C, 8, 8)
        feats = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        pick = torch.randperm(feats.shape[0])[: model.config.num_vq_embeddings]
        model.quantize.embedding.weight.copy_(feats[pick])
    return model


def to_model_range(model, x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> the model's pixel range ([0, 1] for aMUSEd-style lookup_from_codebook models)."""
    return (x + 1) * 0.5 if model.config.lookup_from_codebook else x


def from_model_range(model, image: torch.Tensor) -> torch.Tensor:
    """The model's pixel range -> [-1, 1]."""
    return image * 2 - 1 if model.config.lookup_from_codebook else image


def random_fdm(channels: int, **config) -> fdm.FDM:
    """A small FDM whose head is randomised, so that the correction is not the identity."""
    module = fdm.FDM(channels, hidden_channels=16, num_blocks=2, **config)
    torch.nn.init.normal_(module.head.weight, std=0.05)
    torch.nn.init.normal_(module.head.bias, std=0.05)
    return module.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: one intra-op thread is faster than several (no synchronisation on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(CONFIGS))
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {k: build_vqmodel(k) for k in CONFIGS}


@pytest.fixture
def model(models, kind):
    return models[kind]


@pytest.fixture
def hole_mask() -> torch.Tensor:
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 4:20, 8:28] = 1
    mask[1, :, 16:32, 0:12] = 1
    return mask


def test_adapter_is_found_and_describes_the_model(model):
    adapter = fdm.find_adapter(model)
    assert type(adapter) is DiffusersVQAdapter
    x = smooth_images(2)
    z = adapter.encode(x)
    assert z.shape == (2, adapter.channels, 32 // adapter.factor, 32 // adapter.factor)
    assert adapter.factor == 4
    assert adapter.channels == (model.config.vq_embed_dim or model.config.latent_channels)
    assert adapter.codebook().shape == (model.config.num_vq_embeddings, adapter.channels)
    assert adapter.spatial_norm == (model.config.norm_type == "spatial")
    assert adapter.decoder_modules() == {"post_quant_conv": model.post_quant_conv, "decoder": model.decoder}
    assert adapter.image_range == ((0.0, 1.0) if model.config.lookup_from_codebook else (-1.0, 1.0))


@torch.no_grad()
def test_image_range_can_be_given(models):
    model = models["group"]
    x = smooth_images(1)
    adapter = DiffusersVQAdapter(model, image_range=(0, 1))  # a VQModel trained on [0, 1] images
    deq = fdm.Dequantizer(model, random_fdm(adapter.channels), adapter=adapter)
    assert torch.equal(deq.reconstruct(x, use_fdm=False), model((x + 1) * 0.5).sample * 2 - 1)
    with pytest.raises(ValueError, match="high > low"):
        DiffusersVQAdapter(model, image_range=(1, 1))


def test_other_models_do_not_match(toy_model):
    assert not DiffusersVQAdapter.matches(toy_model)
    assert not DiffusersVQAdapter.matches(diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8))


@torch.no_grad()
def test_quantize_and_lookup_agree_with_diffusers(model):
    adapter = fdm.find_adapter(model)
    z = adapter.encode(smooth_images(2))
    z_q, indices = adapter.quantize(z)
    assert indices.shape == (2, 8, 8) and indices.dtype == torch.long
    assert indices.unique().numel() >= model.config.num_vq_embeddings // 2  # the codebook is really used
    expected = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), adapter.codebook()).argmin(1)
    assert torch.equal(indices.reshape(-1), expected)
    assert torch.equal(z_q, model.quantize(z)[0])  # diffusers' own quantizer output
    codes = adapter.lookup(indices)
    assert torch.equal(codes, adapter.codebook()[indices].permute(0, 3, 1, 2))
    torch.testing.assert_close(z_q, codes)  # equal up to the straight-through rounding
    with pytest.raises(InputError, match=r"\(B, h, w\)"):
        adapter.lookup(indices.reshape(-1))


@torch.no_grad()
def test_detached_decode_equals_diffusers_decode(model):
    x = smooth_images(2)
    reference = from_model_range(model, model(to_model_range(model, x)).sample)  # all inside diffusers
    deq = fdm.Dequantizer(model, random_fdm(fdm.find_adapter(model).channels))
    assert torch.equal(deq.reconstruct(x, use_fdm=False), reference)
    z_q, indices = deq.quantize(deq.encode(x))
    deq.attach()
    deq.detach()
    assert torch.equal(from_model_range(model, model(to_model_range(model, x)).sample), reference)  # no leftovers
    b, h, w = indices.shape
    if model.config.lookup_from_codebook:  # aMUSEd decodes code indices
        own = model.decode(indices.reshape(-1), force_not_quantize=True, shape=(b, h, w, deq.adapter.channels)).sample
    else:  # VQ-Diffusion looks the codes up itself
        codes = model.quantize.get_codebook_entry(indices.reshape(-1), (b, h, w, deq.adapter.channels))
        own = model.decode(codes, force_not_quantize=True).sample
    assert torch.equal(deq.adapter.decode(deq.adapter.lookup(indices)), from_model_range(model, own))


@torch.no_grad()
@pytest.mark.parametrize("masked", [False, True])
def test_attached_equals_explicit_correction(model, masked, hole_mask):
    x = smooth_images(2)
    deq = fdm.Dequantizer(model, random_fdm(fdm.find_adapter(model).channels))
    mask = hole_mask if masked else None
    z = deq.encode(x)
    z_q, indices = deq.quantize(z)
    b, h, w = indices.shape
    shape = (b, h, w, deq.adapter.channels)
    plain = model.decode(z).sample
    with deq.attached(mask):
        own_quantize = model.decode(z).sample  # latent diffusion: quantization inside decode
        if model.config.lookup_from_codebook:  # aMUSEd
            own_codes = model.decode(indices.reshape(-1), force_not_quantize=True, shape=shape).sample
        else:  # VQ-Diffusion
            codes = model.quantize.get_codebook_entry(indices.reshape(-1), shape)
            own_codes = model.decode(codes, force_not_quantize=True).sample
    assert torch.equal(from_model_range(model, own_quantize), deq.decode(z_q, mask))
    assert torch.equal(from_model_range(model, own_codes), deq.decode_indices(indices, mask))
    assert (own_quantize - plain).abs().max() > 1e-2  # FDM really changed the output


@torch.no_grad()
def test_spatial_norm_decoder_receives_the_corrected_map(models):
    model = models["spatial"]
    deq = fdm.Dequantizer(model, random_fdm(fdm.find_adapter(model).channels))
    z_q, _ = deq.quantize(deq.encode(smooth_images(2)))
    z_dq = deq.correct(z_q)
    both = model.decoder(model.post_quant_conv(z_dq), z_dq)
    only_conv = model.decoder(model.post_quant_conv(z_dq), z_q)
    assert torch.equal(deq.decode(z_q), both)
    with deq.attached():
        assert torch.equal(model.decode(z_q, force_not_quantize=True).sample, both)
        # called directly (keyword latent_embeds, no post_quant_conv call first), the condition is corrected too
        assert torch.equal(model.decoder(model.post_quant_conv(z_q), latent_embeds=z_q), both)
    assert (both - only_conv).abs().max() > 1e-3


@torch.no_grad()
def test_latent_diffusion_pipeline_is_corrected_unchanged(models):
    """A real diffusers pipeline (LDMPipeline: ``vqvae.decode(latents)``) decodes through FDM while attached."""
    model = models["group"]
    channels = fdm.find_adapter(model).channels
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels,
                                 block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    pipe = diffusers.LDMPipeline(vqvae=model, unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=50))
    pipe.set_progress_bar_config(disable=True)
    deq = fdm.Dequantizer(model, random_fdm(channels))
    seen = []
    handle = model.quantize.register_forward_pre_hook(lambda module, args: seen.append(args[0]))

    def run():
        out = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np")
        return torch.from_numpy(out.images)  # (B, H, W, 3) in [0, 1]

    plain = run()
    with deq.attached():
        corrected = run()
    again = run()
    handle.remove()
    assert torch.equal(plain, again)
    assert torch.equal(seen[0], seen[1])  # same latents reached the VQModel both times
    explicit = deq.decode(deq.quantize(seen[1])[0])
    expected = (explicit / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert torch.equal(corrected, expected)
    assert (corrected - plain).abs().max() > 1e-3


def test_save_load_round_trip(models, tmp_path):
    model = models["group"]
    model.save_pretrained(tmp_path / "vq")
    adapter = fdm.find_adapter(model)
    module = random_fdm(adapter.channels, base_model="tiny-vq", base_model_fingerprint=adapter.fingerprint())
    module.save_pretrained(tmp_path / "fdm")

    loaded = load_model(tmp_path / "vq")
    assert not loaded.training
    loaded_fdm = fdm.FDM.from_pretrained(tmp_path / "fdm")
    assert loaded_fdm.base_model_fingerprint == adapter.fingerprint()
    x = smooth_images(2)
    with torch.no_grad():
        expected = fdm.Dequantizer(model, module).reconstruct(x)
        got = fdm.Dequantizer(loaded, loaded_fdm).reconstruct(x)  # fingerprint checked
    assert torch.equal(got, expected)

    with torch.no_grad():
        loaded.quantize.embedding.weight[0] += 1e-3  # another codebook
    with pytest.raises(fdm.FingerprintMismatchError, match="fingerprint"):
        fdm.Dequantizer(loaded, loaded_fdm)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")  # raised inside diffusers
def test_config_sizes_out_of_bounds_are_refused_before_building(models, tmp_path):
    """A crafted config.json cannot make diffusers build millions of blocks: its sizes are bounded
    (fdm.adapters.diffusers.SIZE_LIMITS), checked before the model is built."""
    from fdm.errors import ConfigError

    models["group"].save_pretrained(tmp_path / "vq")
    config_file = tmp_path / "vq" / "config.json"
    config = json.loads(config_file.read_text())
    for key, value, message in [("layers_per_block", 10**6, r"layers_per_block must be an integer from 0 to 64"),
                                ("down_block_types", ["DownEncoderBlock2D"] * 1000,
                                 r"down_block_types must be a list of at most 16 entries"),
                                ("block_out_channels", [32, -1], r"block_out_channels\[1\] must be an integer")]:
        config_file.write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConfigError, match=message):
            load_model(tmp_path / "vq")
    config_file.write_text(json.dumps(config))
    assert isinstance(load_model(tmp_path / "vq"), type(models["group"]))  # the saved sizes pass


def test_load_model_from_hub_repo_and_pipeline_folders(models, tmp_path):
    model = models["lookup"]
    pipeline = tmp_path / "pipeline"
    model.save_pretrained(pipeline / "vqvae")
    (pipeline / "model_index.json").write_text(json.dumps(
        {"_class_name": "AmusedPipeline", "vqvae": ["diffusers", "VQModel"], "scheduler": ["diffusers", "AmusedScheduler"]}
    ))
    files = {f"vqvae/{p.name}": p for p in (pipeline / "vqvae").iterdir()}
    cache = hub_cache(tmp_path / "cache", "someone/tiny-amused", files)

    x = smooth_images(1)
    with torch.no_grad():
        expected = model(x).sample
        for loaded in (
            load_model(pipeline),  # component found through model_index.json
            load_model("hf://someone/tiny-amused/vqvae", cache_dir=cache, local_files_only=True),
            load_model("someone/tiny-amused", subfolder="vqvae", cache_dir=cache, local_files_only=True),
        ):
            assert loaded.config.lookup_from_codebook and not loaded.training
            assert torch.equal(loaded(x).sample, expected)

    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(CheckpointError, match="exactly one VQModel"):
        load_model(pipeline)


def test_missing_diffusers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r'pip install "\.\[diffusers\]"'):
        load_model("owner/anything")


def test_phase2_on_a_loaded_vqmodel_lowers_the_qe_loss(models, tmp_path):
    from fdm.training import Phase2Config, TensorViews, train_phase2

    models["group"].save_pretrained(tmp_path / "vq")
    model = load_model(tmp_path / "vq")
    adapter = fdm.find_adapter(model)
    start = fdm.FDM(adapter.channels, hidden_channels=32, num_blocks=2)
    torch.nn.init.normal_(start.head.weight, std=1e-3)  # not exactly zero: the trunk gets gradients at once

    x_val = smooth_images(4, seed=7)
    val_holes = torch.stack([fdm.random_irregular_mask(32, 32, generator=torch.Generator().manual_seed(i))
                             for i in range(4)])
    cells = fdm.latent_mask(val_holes, adapter.factor)

    @torch.no_grad()
    def val_qe(module):
        z = adapter.encode(x_val)
        z_q, _ = adapter.quantize(z)
        x_in = torch.where(cells.bool(), z_q, z)
        return qe_loss(module(x_in, cells), z, cells).item()

    before = val_qe(start)
    config = Phase2Config(steps=60, batch_size=8, lr=3e-3, warmup_steps=5, progress=False, checkpoint_every=0,
                          log_every=20, output_dir=str(tmp_path / "fdm"), base_model="tiny-vq")
    trained = train_phase2(model, TensorViews(smooth_images(32, seed=2)), config, fdm_module=start)
    after = val_qe(trained)
    assert after < 0.9 * before, (before, after)

    reloaded = fdm.FDM.from_pretrained(tmp_path / "fdm")
    deq = fdm.Dequantizer(model, reloaded)  # fingerprint recorded by the trainer matches the loaded model
    assert val_qe(reloaded) == pytest.approx(after)
    with torch.no_grad():
        z = adapter.encode(x_val)
        z_q, _ = adapter.quantize(z)
        assert feature_error_ratio(z, z_q, deq.correct(z_q, val_holes), cells) < 1


def test_example_script(models, tmp_path):
    from PIL import Image

    models["spatial"].save_pretrained(tmp_path / "vq")
    adapter = fdm.find_adapter(models["spatial"])
    random_fdm(adapter.channels, base_model_fingerprint=adapter.fingerprint()).save_pretrained(tmp_path / "fdm")
    pixels = ((smooth_images(1, size=40)[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    hole = torch.zeros(32, 32, dtype=torch.uint8)
    hole[8:24, 8:24] = 255
    Image.fromarray(hole.numpy()).save(tmp_path / "mask.png")

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import diffusers_vqmodel
    finally:
        sys.path.remove(str(ROOT / "examples"))
    out = tmp_path / "side_by_side.png"
    metrics = diffusers_vqmodel.main(["--vqmodel", str(tmp_path / "vq"), "--fdm", str(tmp_path / "fdm"),
                                      "--image", str(tmp_path / "photo.png"), "--out", str(out), "--size", "32",
                                      "--mask", str(tmp_path / "mask.png"), "--device", "cpu"])
    with Image.open(out) as grid:
        assert grid.width == 3 * 32 + 4 * 4 and grid.height > 32 + 2 * 4  # three titled panels, 4-pixel padding
    assert set(metrics) == {"psnr_vq", "psnr_fdm", "ssim_vq", "ssim_fdm"}
    assert metrics["psnr_vq"] != metrics["psnr_fdm"]
