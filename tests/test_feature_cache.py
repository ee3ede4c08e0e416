"""The compact, sharded feature cache of phase 2: ``z`` in float16 / bfloat16 / float32 and code indices (``z_q`` is
looked up, never stored), one shard per process, resumable extraction, and the shard-aware batch order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fdm
from fdm.errors import InputError, TrainingError
from fdm.training import DistContext, FeatureCache, TensorViews
from fdm.training import feature_cache as fc
from fdm.training.shards import ShardedBatches, shard_ranges
from toy_vq import ToyVQ


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(1)
    toy = ToyVQ().eval()
    with torch.no_grad():  # codes spread over the encoder's range, so cells use several codes
        toy.codebook.weight.mul_(0.3)
    return fdm.find_adapter(toy)


@pytest.fixture(scope="module")
def views():
    g = torch.Generator().manual_seed(0)
    images = F.interpolate(torch.rand(10, 3, 4, 4, generator=g) * 2 - 1, size=(16, 16), mode="bilinear")
    return TensorViews(images)


def reference(adapter, views):
    """z, z_q and indices of every view, encoded in one batch."""
    with torch.no_grad():
        z = adapter.encode(views.images)
        z_q, indices = adapter.quantize(z)
    return z, z_q, indices


def all_features(cache):
    return cache.get(list(range(len(cache))))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cache_stores_z_in_its_dtype_and_looks_z_q_up(tmp_path, adapter, views, dtype):
    z, z_q, indices = reference(adapter, views)
    for mode in ("memory", "disk"):
        cache = FeatureCache(adapter, views, mode=mode, cache_dir=tmp_path, dtype=dtype, batch_size=3, progress=False)
        cache.prepare()
        got_z, got_z_q = all_features(cache)
        torch.testing.assert_close(got_z, z.to(getattr(torch, dtype)).float(), rtol=0, atol=0)
        assert torch.equal(got_z_q, z_q)  # exactly the quantizer's output: the codebook rows of the indices
        # (C + 1) values per cell: z in the storage type and an int16 index; the old layout stored 2 C float32
        c, (h, w) = adapter.channels, z.shape[-2:]
        assert cache.nbytes_per_view() == (c * torch.finfo(getattr(torch, dtype)).bits // 8 + 2) * h * w
    shard = next((tmp_path / cache.key()).glob("shard-*"))
    assert sorted(p.name for p in shard.iterdir()) == ["indices.npy", "meta.json", "z.npy"]
    assert np.array_equal(np.load(shard / "indices.npy"), indices.numpy().astype(np.int16))


def test_float16_overflow_is_refused_with_the_remedy(tmp_path, views):
    huge = ToyVQ().eval()
    with torch.no_grad():
        huge.encoder[-1].weight.mul_(1e6)  # features far beyond float16's 65504
    cache = FeatureCache(fdm.find_adapter(huge), views, mode="disk", cache_dir=tmp_path, progress=False)
    with pytest.raises(TrainingError, match="NaN or Inf after conversion to float16.*bfloat16"):
        cache.prepare()
    assert not list(tmp_path.rglob("meta.json"))  # the shard was never marked complete
    bf16 = FeatureCache(fdm.find_adapter(huge), views, mode="memory", dtype="bfloat16", progress=False)
    bf16.prepare()
    assert torch.isfinite(all_features(bf16)[0]).all()


def test_shards_split_the_views_and_each_process_reads_only_its_own(adapter, views, monkeypatch):
    assert [list(r) for r in shard_ranges(10, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    whole = FeatureCache(adapter, views, dtype="float32", progress=False)
    whole.prepare()
    two = FeatureCache(adapter, views, dtype="float32", num_shards=2, progress=False)
    two.prepare()
    order = [7, 1, 9, 0, 5]
    for a, b in zip(two.get(order), whole.get(order)):
        assert torch.equal(a, b)
    # process 1 of 2 (no process group needed to fill its own shard) encodes and holds shard 1 only
    monkeypatch.setattr(fc, "barrier", lambda ctx: None)
    rank1 = FeatureCache(adapter, views, dtype="float32", ctx=DistContext(rank=1, world_size=2), progress=False)
    rank1.prepare()
    assert rank1.owned == [1] and rank1.encoded_views == 5
    assert torch.equal(rank1.get([6, 9])[0], whole.get([6, 9])[0])
    with pytest.raises(IndexError, match="shard 0 .* does not own"):
        rank1.get([2])
    with pytest.raises(InputError, match="3 shards, which 2 processes cannot share"):
        FeatureCache(adapter, views, num_shards=3, ctx=DistContext(rank=0, world_size=2))


def test_batches_are_the_same_for_one_process_or_one_per_shard():
    shards = shard_ranges(22, 2)
    single = ShardedBatches(shards, 4, DistContext(), seed=5)
    ranks = [ShardedBatches(shards, 2, DistContext(rank=r, world_size=2), seed=5) for r in (0, 1)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 5  # 11 views per shard, 2 per step
    seen = []
    for step in range(12):  # over two epoch boundaries
        batch = single.batch(step)
        assert sorted(batch) == sorted(ranks[0].batch(step) + ranks[1].batch(step))
        assert all(i in shards[0] for i in ranks[0].batch(step)) and all(i in shards[1] for i in ranks[1].batch(step))
        seen.append(batch)
    epoch = [i for batch in seen[:5] for i in batch]
    assert len(set(epoch)) == 20  # an epoch never repeats a view
    assert seen[5:10] != seen[:5]  # and the next one is shuffled anew
    with pytest.raises(InputError, match="multiple of the number of cache shards"):
        ShardedBatches(shard_ranges(22, 3), 4, DistContext(), seed=0)
    with pytest.raises(InputError, match="fewer than the 8"):
        ShardedBatches(shard_ranges(12, 2), 16, DistContext(), seed=0)


class FlakyViews(TensorViews):
    """Views whose reading fails once at ``fail_at`` (an interrupted extraction)."""

    def __init__(self, images, fail_at):
        super().__init__(images)
        self.fail_at = fail_at

    def __getitem__(self, index):
        if index == self.fail_at:
            self.fail_at = None
            raise KeyboardInterrupt
        return super().__getitem__(index)


def test_interrupted_extraction_resumes_at_the_last_flushed_batch(tmp_path, adapter, views):
    flaky = FlakyViews(views.images, fail_at=7)
    cache = FeatureCache(adapter, flaky, mode="disk", cache_dir=tmp_path / "resumed", batch_size=3, progress=False)
    with pytest.raises(KeyboardInterrupt):
        cache.prepare()
    (shard,) = (tmp_path / "resumed").glob("*/shard-*")
    assert json.loads((shard / "progress.json").read_text())["done"] == 6  # two batches of 3 were flushed
    assert not (shard / "meta.json").exists()

    again = FeatureCache(adapter, flaky, mode="disk", cache_dir=tmp_path / "resumed", batch_size=3, progress=False)
    again.prepare()
    assert again.encoded_views == 4  # views 6..9 only
    assert not (shard / "progress.json").exists()
    once = FeatureCache(adapter, views, mode="disk", cache_dir=tmp_path / "once", batch_size=3, progress=False)
    once.prepare()
    for a, b in zip(all_features(again), all_features(once)):
        assert torch.equal(a, b)
    # a progress file of another cache (other views) is not trusted: the shard starts afresh
    meta = json.loads((shard / "meta.json").read_text())
    (shard / "meta.json").unlink()
    (shard / "progress.json").write_text(json.dumps({"binding": {**meta["binding"], "views": "0"}, "shard": 0,
                                                     "done": 9}))
    fresh = FeatureCache(adapter, flaky, mode="disk", cache_dir=tmp_path / "resumed", batch_size=3, progress=False)
    fresh.prepare()
    assert fresh.encoded_views == 10


class StreamedViews(TensorViews):
    """Views that can only be read in order (a streaming source)."""

    random_access = False

    def __getitem__(self, index):
        raise AssertionError("a streaming source is never indexed")

    def iter_views(self, start, stop):
        for i in range(start, stop):
            yield i, self.images[i]


def test_streamed_views_fill_the_same_cache(adapter, views):
    streamed = FeatureCache(adapter, StreamedViews(views.images), num_shards=2, batch_size=4, progress=False)
    streamed.prepare()
    indexed = FeatureCache(adapter, views, num_shards=2, batch_size=4, progress=False)
    indexed.prepare()
    for a, b in zip(all_features(streamed), all_features(indexed)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_image_late_in_a_disk_fill_is_one_line_naming_it_and_the_work_before_it_is_kept(tmp_path, workers):
    """With worker processes too (DataLoader would have put the worker's traceback into the message); a rerun on
    the same data resumes after the batches already flushed instead of encoding them again."""
    from PIL import Image

    from fdm.training import ImageFolderViews

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(data / f"{i}.png")
    broken = data / "zzz-broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    adapter = fdm.find_adapter(ToyVQ().eval())

    def fill() -> FeatureCache:
        cache = FeatureCache(adapter, ImageFolderViews(data, crop_size=16), mode="disk", cache_dir=tmp_path / "cache",
                             batch_size=2, progress=False, num_workers=workers)
        with pytest.raises(InputError) as err:
            cache.prepare()
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"Cannot read training image file {broken}:")
        return cache

    first = fill()
    (progress,) = (tmp_path / "cache").glob("*/shard-*/progress.json")
    assert json.loads(progress.read_text())["done"] == 6  # the three batches before the broken image
    assert first.encoded_views == 6
    assert fill().encoded_views == 0  # resumed at view 6: nothing encoded again
