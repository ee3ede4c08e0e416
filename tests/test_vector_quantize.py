"""The vector-quantize-pytorch family (fdm.adapters.vector_quantize): tiny seeded VQ autoencoders around the library's
own ``VectorQuantize`` and ``ResidualVQ``, checked against the library's forward (indices and quantized maps bit for
bit), FDM off = the model's own decode, attached = explicit, the feature cache, phase 2 and phase 3."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fdm
from fdm.errors import CheckpointError, ConfigError, InputError
from fdm.training import Phase2Config, Phase2Trainer, TensorViews
from fdm.training.feature_cache import FeatureCache
from fdm.training.phase3 import Phase3Config, Phase3Trainer

vqp = pytest.importorskip("vector_quantize_pytorch")
from fdm.adapters.vector_quantize import VectorQuantizeAdapter, VQAutoencoder, load_weights, save_weights  # noqa: E402

C = 8
#: name -> (quantizer class, keyword arguments): every layout, projections, cosine similarity, residual levels
QUANTIZERS = {
    "vq-map": (vqp.VectorQuantize, dict(accept_image_fmap=True)),
    "vq-map-codebook-dim": (vqp.VectorQuantize, dict(accept_image_fmap=True, codebook_dim=4)),
    "vq-channel-last": (vqp.VectorQuantize, dict(channel_last=True)),
    "vq-channel-first-cosine": (vqp.VectorQuantize, dict(channel_last=False, use_cosine_sim=True)),
    "vq-channel-last-codebook-dim-cosine": (vqp.VectorQuantize, dict(codebook_dim=4, use_cosine_sim=True)),
    "rvq": (vqp.ResidualVQ, dict(num_quantizers=3)),
    "rvq-codebook-dim": (vqp.ResidualVQ, dict(num_quantizers=2, codebook_dim=4)),
    "rvq-cosine": (vqp.ResidualVQ, dict(num_quantizers=2, use_cosine_sim=True)),
    "rvq-one-level": (vqp.ResidualVQ, dict(num_quantizers=1)),
}


def build(name: str, seed: int = 0) -> VQAutoencoder:
    """A factor-4 conv autoencoder with 1x1 projections around the quantizer ``name``, seeded, in eval mode; the
    codebooks are initialised by the library's k-means on a batch, so that cells use several codes."""
    torch.manual_seed(seed)
    cls, kwargs = QUANTIZERS[name]
    model = VQAutoencoder(
        nn.Sequential(nn.Conv2d(3, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, C, 4, stride=2, padding=1)),
        cls(dim=C, codebook_size=16, kmeans_init=True, kmeans_iters=4, **kwargs),
        nn.Sequential(nn.ConvTranspose2d(C, 16, 4, stride=2, padding=1), nn.ReLU(),
                      nn.ConvTranspose2d(16, 3, 4, stride=2, padding=1), nn.Tanh()),
        factor=4, pre_quant=nn.Conv2d(C, C, 1), post_quant=nn.Conv2d(C, C, 1),
    )
    model.train()
    with torch.no_grad():
        model(images(4, seed=seed))
    return model.eval()


def images(n: int, size: tuple[int, int] = (16, 24), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 6, generator=g) * 2 - 1, size=size, mode="bilinear")


def library_forward(model: VQAutoencoder, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantizer's own forward on ``z`` (B, C, h, w), reshaped as the user's code would for its layout."""
    b, c, h, w = z.shape
    first = model.levels[0]
    if first.accept_image_fmap:
        return model.quantizer(z)[:2]
    if first.channel_last:
        z_q, indices, _ = model.quantizer(z.permute(0, 2, 3, 1).reshape(b, h * w, c))
        return z_q.reshape(b, h, w, c).permute(0, 3, 1, 2), indices.reshape(b, h, w, *indices.shape[2:])
    z_q, indices, _ = model.quantizer(z.reshape(b, c, h * w))
    return z_q.reshape(b, c, h, w), indices.reshape(b, h, w)


def random_fdm() -> fdm.FDM:
    module = fdm.FDM(C, hidden_channels=16, num_blocks=2)
    torch.nn.init.normal_(module.head.weight, std=0.1)  # not the identity
    module.base_model_fingerprint = "not-checked"
    return module.eval()


@pytest.mark.parametrize("name", QUANTIZERS)
def test_quantize_and_lookup_are_the_library_forward_bit_for_bit(name):
    model = build(name)
    adapter = fdm.find_adapter(model)
    assert isinstance(adapter, VectorQuantizeAdapter) and adapter.factor == 4 and adapter.channels == C
    with torch.no_grad():
        z = adapter.encode(images(2))
        z_q, indices = adapter.quantize(z)
        lib_z_q, lib_indices = library_forward(model, z)
    levels = QUANTIZERS[name][1].get("num_quantizers", 1)
    assert adapter.code_levels == levels and adapter.codebook().shape == (16 * levels, C)
    assert torch.equal(z_q, lib_z_q)
    assert torch.equal(indices, lib_indices.squeeze(-1) if name == "rvq-one-level" else lib_indices)
    assert indices.unique().numel() > 1  # cells use several codes: the check can fail
    assert torch.equal(adapter.lookup(indices), z_q)
    assert not torch.equal(z, z_q)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_fdm_off_decodes_as_the_model_and_attached_equals_explicit(name):
    model = build(name)
    x = images(2)
    with torch.no_grad():
        own, own_indices, _ = model(x)
        deq = fdm.Dequantizer(model, random_fdm(), check_fingerprint=False)
        assert torch.equal(deq.reconstruct(x, use_fdm=False), own.clamp(-1, 1))
        identity = fdm.FDM(C, hidden_channels=16, num_blocks=2, base_model_fingerprint="not-checked")  # exact identity
        identity = fdm.Dequantizer(model, identity, check_fingerprint=False)
        indices = deq.quantize(deq.encode(x))[1]
        assert torch.equal(identity.decode_indices(indices), model.decode_indices(own_indices))
        explicit = deq.reconstruct(x)
        explicit_codes = deq.decode_indices(indices)
        assert not torch.equal(explicit, own.clamp(-1, 1))  # the FDM changes the image
        with deq.attached():
            assert torch.equal(model(x)[0], explicit)
            assert torch.equal(model.decode_indices(own_indices), explicit_codes)
        assert torch.equal(model(x)[0], own)  # detached again


def test_feature_cache_stores_the_residual_levels_and_looks_z_q_up(tmp_path):
    model = build("rvq")
    adapter = fdm.find_adapter(model)
    views = TensorViews(images(6, size=(16, 16)))
    with torch.no_grad():
        z = adapter.encode(views.images)
        z_q, indices = adapter.quantize(z)
    for mode in ("memory", "disk"):
        cache = FeatureCache(adapter, views, mode=mode, cache_dir=tmp_path, dtype="float32", batch_size=4,
                             progress=False)
        cache.prepare()
        got_z, got_z_q = cache.get(list(range(6)))
        assert torch.equal(got_z, z) and torch.equal(got_z_q, z_q)
    stored = next(tmp_path.rglob("indices.npy"))
    import numpy as np

    assert torch.equal(torch.from_numpy(np.load(stored).astype(np.int64)), indices)  # (n, h, w, levels)


@pytest.mark.parametrize("name", ["vq-map", "rvq"])
def test_phase2_and_phase3_train_on_it(tmp_path, name):
    model = build(name)
    views = TensorViews(images(8, size=(16, 16)))
    phase2 = Phase2Config(steps=4, batch_size=4, lr=2e-3, warmup_steps=1, progress=False, checkpoint_every=0,
                          log_every=2, output_dir=str(tmp_path / "phase2"))
    trained = Phase2Trainer(model, views, phase2, fdm_module=fdm.FDM(C, hidden_channels=16, num_blocks=2)).train()
    adapter = fdm.find_adapter(model)
    assert trained.base_model_fingerprint == adapter.fingerprint()
    assert any(p.abs().sum() > 0 for p in trained.head.parameters())  # the zero-initialised head was trained
    phase3 = Phase3Config(steps=3, batch_size=2, warmup_steps=1, drop_vgg_terms=True, weights={"adversarial": 0.0},
                          log_every=0, val_every=0, checkpoint_every=0, progress=False,
                          output_dir=str(tmp_path / "phase3"))
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    tuned = Phase3Trainer(model, trained, views, phase3).train()
    with torch.no_grad():
        image = fdm.Dequantizer(model, tuned).reconstruct(images(1, size=(16, 16)))
    assert torch.isfinite(image).all() and image.shape == (1, 3, 16, 16)
    tuned_decoder = {k.removeprefix("decoder."): v for k, v in tuned.decoder_state.items() if k.startswith("decoder.")}
    assert tuned.finetuned_decoder and tuned_decoder.keys() == decoder_before.keys()
    assert any(not torch.equal(v, decoder_before[k]) for k, v in tuned_decoder.items())  # the decoder was trained


def test_weights_round_trip_through_safetensors(tmp_path):
    model = build("rvq-codebook-dim")
    path = save_weights(model, tmp_path / "vq.safetensors")
    other = load_weights(build("rvq-codebook-dim", seed=1), path)
    assert fdm.find_adapter(other).fingerprint() == fdm.find_adapter(model).fingerprint()
    x = images(1)
    with torch.no_grad():
        assert torch.equal(other(x)[0], model(x)[0])
    with pytest.raises(CheckpointError, match="missing keys"):
        load_weights(build("rvq"), path)
    shared = VQAutoencoder(nn.Conv2d(3, C, 4, stride=4), vqp.ResidualVQ(dim=C, num_quantizers=2, codebook_size=8,
                           shared_codebook=True), nn.ConvTranspose2d(C, 3, 4, stride=4), factor=4)
    load_weights(shared, save_weights(shared, tmp_path / "shared.safetensors"))  # one codebook under two names


def test_bad_parts_and_indices_are_refused():
    encoder, decoder = nn.Conv2d(3, C, 4, stride=4), nn.ConvTranspose2d(C, 3, 4, stride=4)
    with pytest.raises(TypeError, match="VectorQuantize or ResidualVQ.*got torch.nn.modules.linear.Linear"):
        VQAutoencoder(encoder, nn.Linear(C, C), decoder, factor=4)
    with pytest.raises(ConfigError, match="heads > 1"):
        VQAutoencoder(encoder, vqp.VectorQuantize(dim=C, codebook_size=8, heads=2), decoder, factor=4)
    with pytest.raises(ConfigError, match="channel-last sequences only"):
        VQAutoencoder(encoder, vqp.ResidualVQ(dim=C, num_quantizers=2, codebook_size=8, accept_image_fmap=True),
                      decoder, factor=4)
    with pytest.raises(ConfigError, match="factor must be a positive integer"):
        VQAutoencoder(encoder, vqp.VectorQuantize(dim=C, codebook_size=8), decoder, factor=0)
    fresh = VQAutoencoder(encoder, vqp.VectorQuantize(dim=C, codebook_size=8, kmeans_init=True), decoder, factor=4)
    with pytest.raises(ConfigError, match="never initialised"):
        fdm.find_adapter(fresh)
    model = build("rvq")
    with pytest.raises(InputError, match=r"shape \(B, h, w, 3\)"):
        model.lookup(torch.zeros(1, 4, 6, dtype=torch.long))
    with pytest.raises(InputError, match=r"\[0, codebook size\) of their level"):
        model.decode_indices(torch.full((1, 4, 6, 3), 16))
    deq = fdm.Dequantizer(model, random_fdm(), check_fingerprint=False)
    with pytest.raises(InputError, match=r"shape \(B, h, w, 3\)"):
        deq.decode_indices(torch.zeros(1, 4, 6, dtype=torch.long))
