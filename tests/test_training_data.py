"""Training data, feature cache, schedule and checkpoint helpers of fdm.training (phase 2 of FDM, WACV 2025)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

import fdm
from fdm.errors import CheckpointError, InputError
from fdm.training import (
    FeatureCache,
    ImageFolderViews,
    TensorViews,
    WarmupCosineLR,
    encode_views,
    latest_checkpoint,
    load_checkpoint,
    paper_optimizer,
    save_checkpoint,
)
from fdm.training.checkpointing import _capture_rng_state, _restore_rng_state
from toy_vq import ToyVQ


def write_images(folder, sizes, seed=0):
    """Smooth random colour images (gradients plus a little noise) of the given (h, w) sizes as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        channels = [np.sin(rng.uniform(1, 6) * xx + rng.uniform(1, 6) * yy + rng.uniform(0, 6)) for _ in range(3)]
        image = (np.stack(channels, -1) * 0.45 + 0.5 + rng.normal(0, 0.03, (h, w, 3))).clip(0, 1)
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"img_{i:02d}.png")
    return folder


@pytest.fixture
def image_dir(tmp_path):
    return write_images(tmp_path / "images", [(40, 56), (64, 48), (20, 20)])


# --- views -------------------------------------------------------------------------------------------------


def test_views_shape_range_and_determinism(image_dir):
    views = ImageFolderViews(image_dir, crop_size=16, views_per_image=3, seed=5)
    assert len(views) == 9
    for i in range(len(views)):
        v = views[i]
        assert v.shape == (3, 16, 16) and v.dtype == torch.float32
        assert v.min() >= -1 and v.max() <= 1
    again = ImageFolderViews(image_dir, crop_size=16, views_per_image=3, seed=5)
    assert all(torch.equal(views[i], again[i]) for i in range(len(views)))
    assert views.fingerprint() == again.fingerprint()
    other = ImageFolderViews(image_dir, crop_size=16, views_per_image=3, seed=6)
    assert not all(torch.equal(views[i], other[i]) for i in range(len(views)))
    assert other.fingerprint() != views.fingerprint()
    # views of one image differ from each other (random crop position / scale / flip)
    assert not torch.equal(views[0], views[1]) or not torch.equal(views[1], views[2])


def test_views_match_a_manual_crop(image_dir):
    """With scale 1 and no flip, a view is the bicubic resize of the shorter side to S, then a crop."""
    views = ImageFolderViews(image_dir, crop_size=16, scale_range=(1.0, 1.0), flip=False, seed=0)
    img = Image.open(views.files[1]).convert("RGB")  # 48 wide, 64 high -> 16 x 21
    resized = np.asarray(img.resize((16, round(64 * 16 / 48)), Image.Resampling.BICUBIC), dtype=np.float32)
    crops = [torch.from_numpy(resized[t:t + 16]).permute(2, 0, 1) / 127.5 - 1 for t in range(resized.shape[0] - 15)]
    assert any(torch.equal(views[1], c) for c in crops)


def test_small_images_are_upscaled(tmp_path):
    folder = write_images(tmp_path / "tiny", [(5, 9)])
    views = ImageFolderViews(folder, crop_size=32)
    assert views[0].shape == (3, 32, 32)


def test_folder_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        ImageFolderViews(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="No training images"):
        ImageFolderViews(tmp_path / "empty")
    bad = write_images(tmp_path / "bad", [(20, 20)])
    (bad / "broken.jpg").write_bytes(b"not a jpeg at all")
    views = ImageFolderViews(bad, crop_size=8)
    with pytest.raises(InputError, match="broken.jpg"):
        [views[i] for i in range(len(views))]


def test_tensor_views_reject_nan_and_bad_shapes():
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(TensorViews(images)[1], images[1])
    images[1, 0, 2, 3] = float("nan")
    with pytest.raises(InputError, match="NaN/Inf"):
        TensorViews(images)
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        TensorViews(torch.zeros(2, 1, 8, 8))


def test_encode_views_rejects_inf(toy_model):
    adapter = fdm.find_adapter(toy_model)
    x = torch.zeros(1, 3, 8, 8)
    x[0, 1, 0, 0] = float("inf")
    with pytest.raises(InputError, match="NaN/Inf"):
        encode_views(adapter, x)
    with pytest.raises(InputError, match="multiple of the downsampling factor 4"):
        encode_views(adapter, torch.zeros(1, 3, 10, 8))


def test_photo_views(photos_dir):
    views = ImageFolderViews(photos_dir / "train", crop_size=64, views_per_image=2)
    assert len(views) == 2 * len(views.files) and views[3].shape == (3, 64, 64)


# --- feature cache -------------------------------------------------------------------------------------------


def test_memory_cache_equals_direct_encoding(image_dir, toy_model):
    views = ImageFolderViews(image_dir, crop_size=16, views_per_image=2)
    adapter = fdm.find_adapter(toy_model)
    cache = FeatureCache(adapter, views, mode="memory", dtype="float32", batch_size=4, progress=False)
    cache.prepare()
    z, z_q = cache.get([4, 0, 5])
    reference = encode_views(adapter, torch.stack([views[4], views[0], views[5]]))
    ref_z, ref_z_q = reference.z, reference.z_q
    torch.testing.assert_close(z, ref_z, rtol=0, atol=1e-6)
    torch.testing.assert_close(z_q, ref_z_q, rtol=0, atol=1e-6)
    # z_q is made of codebook vectors
    vectors = z_q.permute(0, 2, 3, 1).reshape(-1, 1, 8)
    assert (vectors == adapter.codebook().detach()[None]).all(-1).any(-1).all()
    none = FeatureCache(adapter, views, mode="none")
    torch.testing.assert_close(none.get([4, 0, 5])[0], ref_z, rtol=0, atol=0)


def test_disk_cache_round_trip_reuse_and_invalidation(image_dir, tmp_path):
    model = ToyVQ().eval()
    views = ImageFolderViews(image_dir, crop_size=16, views_per_image=2)
    adapter = fdm.find_adapter(model)
    memory = FeatureCache(adapter, views, mode="memory", batch_size=3, progress=False)
    memory.prepare()
    disk = FeatureCache(adapter, views, mode="disk", cache_dir=tmp_path / "cache", batch_size=3, progress=False)
    disk.prepare()
    shard = disk.path / "shard-00000-of-00001"
    assert (shard / "z.npy").is_file() and not (shard / "progress.json").exists()
    order = [5, 1, 2, 0]
    for a, b in zip(disk.get(order), memory.get(order)):
        assert torch.equal(a, b)

    stamp = (shard / "z.npy").stat().st_mtime_ns
    reused = FeatureCache(adapter, views, mode="disk", cache_dir=tmp_path / "cache", progress=False)
    reused.prepare()
    assert reused.path == disk.path and (shard / "z.npy").stat().st_mtime_ns == stamp
    assert reused.encoded_views == 0
    assert torch.equal(reused.get(order)[1], memory.get(order)[1])

    with torch.no_grad():
        model.quant_conv.bias.add_(0.5)  # the encoder changed: the old cache must not be used
    changed = FeatureCache(adapter, views, mode="disk", cache_dir=tmp_path / "cache", progress=False)
    assert changed.path != disk.path
    changed.prepare()
    assert not torch.equal(changed.get(order)[0], memory.get(order)[0])
    other_views = ImageFolderViews(image_dir, crop_size=16, views_per_image=2, seed=1)
    assert FeatureCache(adapter, other_views, mode="disk", cache_dir=tmp_path / "cache").key() != changed.key()


def test_cache_mode_errors(toy_model):
    adapter = fdm.find_adapter(toy_model)
    views = TensorViews(torch.zeros(2, 3, 8, 8))
    with pytest.raises(InputError, match="cache mode"):
        FeatureCache(adapter, views, mode="gpu")
    with pytest.raises(InputError, match="cache_dir"):
        FeatureCache(adapter, views, mode="disk")
    with pytest.raises(InputError, match="fingerprint"):
        FeatureCache(adapter, [torch.zeros(3, 8, 8)], mode="disk", cache_dir="unused")


# --- schedule ------------------------------------------------------------------------------------------------


def test_warmup_cosine_schedule(tmp_path):
    weight = torch.nn.Parameter(torch.zeros(1))
    opt = paper_optimizer([weight])
    assert opt.defaults["betas"] == (0.0, 0.9) and opt.defaults["lr"] == 2e-4
    sched = WarmupCosineLR(opt, total_steps=20, warmup_steps=4, min_lr=1e-6)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([5e-5, 1e-4, 1.5e-4, 2e-4])
    assert lrs[4] == pytest.approx(2e-4)
    mid = 1e-6 + (2e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 8 / 16))
    assert lrs[12] == pytest.approx(mid)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)  # after the last step

    torch.save(sched.state_dict(), tmp_path / "sched.pt")
    fresh = WarmupCosineLR(paper_optimizer([weight]), total_steps=20, warmup_steps=4)
    fresh.load_state_dict(torch.load(tmp_path / "sched.pt", weights_only=True))
    assert fresh.last_epoch == 20 and fresh.get_last_lr() == sched.get_last_lr()


# --- checkpoints -----------------------------------------------------------------------------------------------


def test_rng_state_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    state = _capture_rng_state({"masks": gen})
    torch.save(state, tmp_path / "rng.pt")

    def draw():
        return (torch.rand(3).tolist(), random.random(), np.random.rand(), torch.rand(2, generator=gen).tolist())

    first = draw()
    _restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), {"masks": gen})
    assert draw() == first


def test_save_load_checkpoint(tmp_path):
    module = fdm.FDM(channels=4, hidden_channels=4, num_blocks=1)
    torch.nn.init.normal_(module.head.weight)
    opt = paper_optimizer(module.parameters())
    module(torch.randn(1, 4, 2, 2)).sum().backward()
    opt.step()
    for step in (10, 20, 30):
        path = save_checkpoint(tmp_path / "ckpt", step, {"fdm": module}, {"optimizer": opt.state_dict()}, keep=2)
    assert latest_checkpoint(tmp_path / "ckpt") == path and path.name == "step-00000030"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000020", "step-00000030"]
    assert latest_checkpoint(tmp_path / "nothing") is None

    other = fdm.FDM(channels=4, hidden_channels=4, num_blocks=1)
    state = load_checkpoint(path, {"fdm": other})
    assert state["step"] == 30
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), other.state_dict().values()))
    fresh_opt = paper_optimizer(other.parameters())
    fresh_opt.load_state_dict(state["optimizer"])
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])

    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_checkpoint(path, {"fdm": fdm.FDM(channels=4, hidden_channels=6, num_blocks=1)})
    with pytest.raises(CheckpointError, match="no weights for 'decoder'"):
        load_checkpoint(path, {"decoder": other})
    (path / "fdm.safetensors").write_bytes((path / "fdm.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError):
        load_checkpoint(path, {"fdm": other})
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(tmp_path, {"fdm": other})
