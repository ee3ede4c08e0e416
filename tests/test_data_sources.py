"""Image sources of the training views (fdm.training.sources): a folder, a Hugging Face dataset (saved, imagefolder,
streamed) and WebDataset-style tar shards give the same images, hence the same seeded views; hostile shards and
datasets fail with errors naming the shard, member or row."""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training_data import write_images

import fdm.limits
from fdm import FDM
from fdm.errors import InputError, MissingExtraError, UsageError
from fdm.training import (
    FolderSource,
    HFDatasetSource,
    ImageFolderViews,
    SeededViews,
    TarShardSource,
    TensorViews,
    open_source,
)

ASSETS = Path(__file__).resolve().parents[1] / "fdm" / "demo" / "assets"
VIEWS = {"crop_size": 16, "views_per_image": 2, "seed": 3}


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    """Five images of different sizes and kinds: three RGB PNGs, a grayscale PNG and a JPEG (in a sub-folder)."""
    folder = write_images(tmp_path / "photos", [(40, 56), (64, 48), (20, 20), (30, 26), (24, 36)])
    (folder / "sub").mkdir()
    Image.open(folder / "img_03.png").convert("L").save(folder / "sub" / "gray.png")
    Image.open(folder / "img_04.png").save(folder / "sub" / "photo.jpg", quality=80)
    (folder / "img_03.png").unlink()
    (folder / "img_04.png").unlink()
    return folder


def image_files(folder: Path) -> list[Path]:
    return FolderSource(folder).files


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **fields) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_shards(folder: Path, files: list[Path], per_shard: int = 3) -> list[Path]:
    """WebDataset shards ``train-000000.tar``...: sample i is ``{i:06d}.<ext>`` plus a ``{i:06d}.cls`` label."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, first in enumerate(range(0, len(files), per_shard)):
        shards.append(folder / f"train-{number:06d}.tar")
        with tarfile.open(shards[-1], "w") as tar:
            for i, path in enumerate(files[first:first + per_shard], start=first):
                add_member(tar, f"{i:06d}{path.suffix}", path.read_bytes())
                add_member(tar, f"{i:06d}.cls", str(i % 2).encode())
    return shards


def save_dataset(folder: Path, files: list[Path], splits: bool = True) -> Path:
    """A dataset of the files' bytes (and a label column) written with save_to_disk: a DatasetDict with a
    ``train`` split of every file and a ``test`` split of the first one, or a single Dataset."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": p.read_bytes(), "path": None} for p in files], "label": list(range(len(files)))}
    train = datasets.Dataset.from_dict(rows, features=features)
    data = datasets.DatasetDict({"train": train, "test": train.select([0])}) if splits else train
    data.save_to_disk(str(folder))
    return folder


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """imagefolder datasets write their arrow cache here, not into the user's Hugging Face cache."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def assert_same_views(a: SeededViews, b: SeededViews) -> None:
    assert len(a) == len(b)
    for (i, x), (j, y) in zip(a.iter_views(), b.iter_views(), strict=True):
        assert i == j and torch.equal(x, y), f"view {i} differs"


# --- the same images from every source ---------------------------------------------------------------------


def test_every_source_gives_the_same_views(photo_dir, tmp_path, hf_cache):
    files = image_files(photo_dir)
    folder = ImageFolderViews(photo_dir, **VIEWS)
    sources = {
        "tar": TarShardSource(write_shards(tmp_path / "shards", files)),
        "saved": HFDatasetSource(save_dataset(tmp_path / "saved", files)),
        "saved, streaming": HFDatasetSource(tmp_path / "saved", streaming=True),
        "imagefolder": HFDatasetSource(photo_dir),
        "imagefolder, streaming": HFDatasetSource(photo_dir, streaming=True, num_images=len(files)),
    }
    for name, source in sources.items():
        views = SeededViews(source, **VIEWS)
        assert len(source) == 5 and len(views) == 10, name
        assert_same_views(folder, views)
        if source.random_access:
            assert all(torch.equal(views[i], folder[i]) for i in range(len(views))), name
    # a source's fingerprint names its images, not the crops; the views' fingerprint adds the crops
    fingerprints = {name: source.fingerprint() for name, source in sources.items()}
    assert fingerprints["saved"] == fingerprints["saved, streaming"]  # the same files, read two ways
    assert fingerprints["imagefolder"] == fingerprints["imagefolder, streaming"]
    assert len(set(fingerprints.values())) == 3
    reseeded = SeededViews(sources["tar"], **{**VIEWS, "seed": 4})
    assert reseeded.fingerprint() != SeededViews(sources["tar"], **VIEWS).fingerprint()


def test_folder_views_are_seeded_views_of_a_folder_source(photo_dir):
    folder = ImageFolderViews(photo_dir, **VIEWS)
    seeded = SeededViews(FolderSource(photo_dir), **VIEWS)
    assert folder.fingerprint() == seeded.fingerprint()
    assert folder.files == seeded.source.files and folder.root == photo_dir
    assert folder.names() == ["img_00.png", "img_01.png", "img_02.png", "sub/gray.png", "sub/photo.jpg"]
    assert_same_views(folder, seeded)


def test_random_access_equals_sequential_reading(photo_dir, tmp_path):
    files = image_files(photo_dir)
    for source in (FolderSource(photo_dir), TarShardSource(write_shards(tmp_path / "shards", files, per_shard=2))):
        whole = list(source.iter_images())
        assert [i for i, _ in whole] == [0, 1, 2, 3, 4]
        for i, image in whole:
            assert np.array_equal(pixels(image), pixels(source.image(i)))
        # a range crossing a shard boundary
        assert [i for i, _ in source.iter_images(1, 4)] == [1, 2, 3]
        assert list(source.iter_images(2, 2)) == []
        with pytest.raises(IndexError):
            source.image(5)
        with pytest.raises(IndexError):
            list(source.iter_images(3, 6))
        views = SeededViews(source, crop_size=8, views_per_image=3, seed=1)
        # ranges that start and stop inside an image's views
        for start, stop in [(0, 15), (4, 11), (5, 6), (14, 15)]:
            got = list(views.iter_views(start, stop))
            assert [i for i, _ in got] == list(range(start, stop))
            assert all(torch.equal(view, views[i]) for i, view in got)


def test_sources_read_grayscale_and_jpeg_as_rgb(photo_dir):
    source = FolderSource(photo_dir)
    gray, jpeg = source.image(3), source.image(4)
    assert gray.mode == jpeg.mode == "RGB" and gray.size == (26, 30) and jpeg.size == (36, 24)
    r, g, b = np.moveaxis(pixels(gray), -1, 0)
    assert np.array_equal(r, g) and np.array_equal(g, b)


def test_tensor_views_iterate_in_order():
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    got = list(TensorViews(images).iter_views(1, 3))
    assert [i for i, _ in got] == [1, 2] and torch.equal(got[1][1], images[2])


def test_fingerprints_follow_the_content(photo_dir, tmp_path):
    files = image_files(photo_dir)
    shards = write_shards(tmp_path / "shards", files)
    before = TarShardSource(shards).fingerprint()
    assert TarShardSource(shards).fingerprint() == before
    write_shards(tmp_path / "shards", [files[1], *files[1:]])  # sample 0 now holds another image
    assert TarShardSource(shards).fingerprint() != before

    folder_before = FolderSource(photo_dir).fingerprint()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(photo_dir / "img_02.png")
    assert FolderSource(photo_dir).fingerprint() != folder_before


def test_saved_dataset_fingerprint_splits_and_columns(photo_dir, tmp_path):
    files = image_files(photo_dir)
    saved = save_dataset(tmp_path / "saved", files)
    train = HFDatasetSource(saved)
    test = HFDatasetSource(saved, split="test")
    assert len(train) == 5 and len(test) == 1 and train.fingerprint() != test.fingerprint()
    assert np.array_equal(pixels(test.image(0)), pixels(train.image(0)))
    assert train.names()[:2] == ["train[0]", "train[1]"]
    assert len(HFDatasetSource(saved, num_images=3)) == 3
    with pytest.raises(InputError, match="has only 5 images"):
        HFDatasetSource(saved, num_images=6)
    with pytest.raises(InputError, match="no split 'validation'; it has train, test"):
        HFDatasetSource(saved, split="validation")
    with pytest.raises(InputError, match="no column 'img'; its columns: image, label"):
        HFDatasetSource(saved, column="img")
    with pytest.raises(InputError, match="Column 'label' .* not images"):
        HFDatasetSource(saved, column="label")

    single = HFDatasetSource(save_dataset(tmp_path / "single", files, splits=False))
    assert len(single) == 5 and np.array_equal(pixels(single.image(4)), pixels(train.image(4)))
    resaved = HFDatasetSource(save_dataset(tmp_path / "single2", [files[1], *files[1:]], splits=False))
    assert [f[0] for f in resaved.identity()["files"]] == [f[0] for f in single.identity()["files"]]
    assert resaved.fingerprint() != single.fingerprint()


def test_streaming_sources_have_no_random_access(photo_dir, tmp_path, hf_cache):
    stream = HFDatasetSource(save_dataset(tmp_path / "saved", image_files(photo_dir)), streaming=True)
    assert not stream.random_access and len(stream) == 5
    with pytest.raises(UsageError, match="random access .* needs a non-streaming source"):
        stream.image(0)
    views = SeededViews(stream, **VIEWS)
    assert not views.random_access
    with pytest.raises(UsageError, match="non-streaming"):
        views[0]
    assert [i for i, _ in views.iter_views(3, 7)] == [3, 4, 5, 6]

    with pytest.raises(InputError, match="not recorded .* num_images=N"):
        HFDatasetSource(photo_dir, streaming=True)
    assert [i for i, _ in HFDatasetSource(photo_dir, streaming=True, num_images=2).iter_images()] == [0, 1]
    too_long = HFDatasetSource(photo_dir, streaming=True, num_images=7)
    with pytest.raises(InputError, match="ended after 5 images; 7 were expected"):
        list(too_long.iter_images())


def test_unreadable_dataset_rows_are_named(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"image": [{"bytes": b"\x89PNG\r\n\x1a\n not an image", "path": None}]}
    datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image()})).save_to_disk(
        str(tmp_path / "bad"))
    with pytest.raises(InputError, match="Cannot read image 0 of Hugging Face saved dataset .*bad"):
        HFDatasetSource(tmp_path / "bad").image(0)
    with pytest.raises(InputError, match="dataset folder not found"):
        HFDatasetSource(tmp_path / "missing")


def test_missing_datasets_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MissingExtraError, match=r'pip install "\.\[data\]"'):
        HFDatasetSource(tmp_path)
    with pytest.raises(MissingExtraError, match="datasets package"):
        open_source(f"hf:{tmp_path}?split=train")


# --- tar shards ----------------------------------------------------------------------------------------------


def test_shard_patterns(photo_dir, tmp_path):
    shards = write_shards(tmp_path / "shards", image_files(photo_dir), per_shard=2)  # 3 shards
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    forms = [
        str(tmp_path / "shards" / "train-{000000..000002}.tar"),
        str(tmp_path / "shards" / "train-*.tar"),
        str(tmp_path / "shards" / "train-00000{0,1,2}.tar"),
        [str(shards[0]), str(tmp_path / "shards" / "train-00000[12].tar")],
    ]
    for form in forms:
        source = TarShardSource(form)
        assert source.shards == shards and len(source) == 5, form
    assert len(TarShardSource(str(tmp_path / "shards" / "train-{000001..000002}.tar"))) == 3
    assert len(TarShardSource(shards[2])) == 1
    assert TarShardSource(shards).names() == [
        "train-000000.tar:000000.png", "train-000000.tar:000001.png", "train-000001.tar:000002.png",
        "train-000001.tar:000003.png", "train-000002.tar:000004.jpg"]

    with pytest.raises(InputError, match=r"Tar shard not found: .*train-000003.tar \(from .*\{000000..000003\}"):
        TarShardSource(str(tmp_path / "shards" / "train-{000000..000003}.tar"))
    with pytest.raises(InputError, match="No tar shard matches"):
        TarShardSource(str(tmp_path / "shards" / "val-*.tar"))
    with pytest.raises(UsageError, match="counts down"):
        TarShardSource(str(tmp_path / "shards" / "train-{000002..000000}.tar"))
    with pytest.raises(UsageError, match="more than 100000 shard names"):
        TarShardSource(str(tmp_path / "shards" / "train-{0..999999}-{0..9}.tar"))
    with pytest.raises(UsageError, match="Cannot expand {x}"):
        TarShardSource(str(tmp_path / "shards" / "train-{x}.tar"))


def test_webdataset_samples_take_their_first_image(photo_dir, tmp_path):
    files = image_files(photo_dir)
    shard = tmp_path / "samples.tar"
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "a/000001.seg.png", files[0].read_bytes())  # not the sample's image: extension seg.png
        add_member(tar, "a/000001.JPG", files[4].read_bytes())
        add_member(tar, "a/000001.png", files[1].read_bytes())  # second image of sample a/000001: skipped
        add_member(tar, "a/000002.json", b"{}")  # no image in sample a/000002
        add_member(tar, "b/000001.png", files[2].read_bytes())  # another folder, another key
    source = TarShardSource(shard)
    assert source.names() == ["samples.tar:a/000001.JPG", "samples.tar:b/000001.png"]
    assert np.array_equal(pixels(source.image(0)), pixels(FolderSource(photo_dir).image(4)))


def test_hostile_members_are_skipped_or_named(photo_dir, tmp_path):
    png = image_files(photo_dir)[0].read_bytes()
    shard = tmp_path / "hostile" / "shard.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "000000.png", png)
        add_member(tar, "000001.png", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
        add_member(tar, "000002.png", kind=tarfile.LNKTYPE, linkname="000000.png")
        add_member(tar, "000003.png", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add_member(tar, "000004.png", kind=tarfile.DIRTYPE)
        add_member(tar, "../../000005.png", png)
        add_member(tar, "/tmp/000006.png", png)
        add_member(tar, "000007.png", b"GIF89a, or rather not an image at all")
    before = sorted(tmp_path.rglob("*"))
    source = TarShardSource(shard)
    assert source.names() == ["shard.tar:000000.png", "shard.tar:../../000005.png", "shard.tar:/tmp/000006.png",
                              "shard.tar:000007.png"]
    assert np.array_equal(pixels(source.image(1)), pixels(source.image(0)))
    assert sorted(tmp_path.rglob("*")) == before  # nothing was extracted anywhere
    with pytest.raises(InputError, match=r"Cannot read image '000007.png' in tar shard .*shard.tar: .*not an image"):
        source.image(3)
    with pytest.raises(InputError, match="'000007.png' in tar shard"):
        list(SeededViews(source, crop_size=8).iter_views())


def test_truncated_and_foreign_shards(photo_dir, tmp_path):
    shard = write_shards(tmp_path / "shards", image_files(photo_dir)[:2])[0]
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        image, label = tar.getmember("000001.png"), tar.getmember("000001.cls")
    marker = label.offset_data + 512  # the end-of-archive zero blocks start after the last member's data block
    cut = tmp_path / "cut.tar"
    for length, message in [
        (image.offset_data + image.size // 2, r"truncated: member '000001.png' ends at byte \d+, the file has"),
        (label.offset + 100, "truncated or corrupted after member '000001.png': what follows is neither a tar "
                             "header nor the end-of-archive marker"),
        (marker, "truncated or corrupted after member '000001.cls': it ends without the end-of-archive marker"),
        (300, r"Cannot read tar shard .*cut.tar: .*truncated header"),
    ]:
        cut.write_bytes(data[:length])
        with pytest.raises(InputError, match=message):
            TarShardSource(cut)
    cut.write_bytes(data[:marker] + b"\x01" + bytes(1023))  # garbage where the end marker should be
    with pytest.raises(InputError, match="neither a tar header nor the end-of-archive marker"):
        TarShardSource(cut)
    cut.write_bytes(data[:marker + 700])  # a cut inside the end marker loses nothing
    assert len(TarShardSource(cut)) == 2

    (tmp_path / "text.tar").write_text("not a tar archive " * 50)
    with pytest.raises(InputError, match=r"Cannot read tar shard .*text.tar: .*not an uncompressed tar file"):
        TarShardSource(tmp_path / "text.tar")
    with tarfile.open(tmp_path / "zipped.tar", "w:gz") as tar:
        add_member(tar, "000000.png", image_files(photo_dir)[0].read_bytes())
    with pytest.raises(InputError, match="Cannot read tar shard .*zipped.tar"):
        TarShardSource(tmp_path / "zipped.tar")
    with tarfile.open(tmp_path / "labels.tar", "w") as tar:
        add_member(tar, "000000.cls", b"1")
    with pytest.raises(InputError, match="No images in the tar shards .*labels.tar"):
        TarShardSource(tmp_path / "labels.tar")

    with fdm.limits.override(max_image_bytes=1000), \
            pytest.raises(InputError, match=r"member '000000.png': \d+ bytes, more than the 1000"):
        TarShardSource(shard)


def test_shard_changed_after_indexing(photo_dir, tmp_path):
    shard = write_shards(tmp_path / "shards", image_files(photo_dir)[:1])[0]
    source = TarShardSource(shard)
    shard.write_bytes(shard.read_bytes()[:600])
    with pytest.raises(InputError, match=r"image '000000.png' in tar shard .*: the shard ends after \d+ of its"):
        source.image(0)


# --- --data strings ------------------------------------------------------------------------------------------


def test_open_source_forms(photo_dir, tmp_path):
    shards = write_shards(tmp_path / "shards", image_files(photo_dir))
    assert isinstance(open_source(photo_dir), FolderSource)
    assert isinstance(open_source(str(shards[0])), TarShardSource) and len(open_source(str(shards[0]))) == 3
    assert len(open_source(str(tmp_path / "shards" / "train-{000000..000001}.tar"))) == 5
    assert len(open_source(str(tmp_path / "shards" / "*.tar"))) == 5


def test_open_source_hf_forms(photo_dir, tmp_path):
    saved = save_dataset(tmp_path / "saved", image_files(photo_dir))
    source = open_source(f"hf:{saved}?split=test&column=image")
    assert isinstance(source, HFDatasetSource) and (source.split, source.column, len(source)) == ("test", "image", 1)
    stream = open_source(f"hf:{saved}?streaming=true&num_images=4")
    assert stream.streaming and len(stream) == 4
    assert not open_source(f"hf:{saved}?streaming=0").streaming


@pytest.mark.parametrize("suffix, message", [
    ("?shuffle=1", "unknown option 'shuffle'; expected split, column, streaming, num_images"),
    ("?streaming=maybe", "streaming must be 1 or 0"),
    ("?num_images=0", "num_images must be a positive integer; got '0'"),
    ("?num_images=ten", "num_images must be a positive integer"),
    ("?split=a&split=b", "option 'split' given twice"),
    ("?split=", "option 'split' needs a value"),
    ("?split", "cannot parse the options"),
])
def test_open_source_refuses_bad_hf_options(tmp_path, suffix, message):
    with pytest.raises(UsageError, match=message):
        open_source(f"hf:{tmp_path}{suffix}")


def test_open_source_refuses_unknown_forms(tmp_path):
    with pytest.raises(UsageError, match="expected hf:PATH"):
        open_source("hf:")
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(UsageError, match="not a folder, a .tar shard or hf:PATH"):
        open_source(tmp_path / "list.txt")
    with pytest.raises(InputError, match="Training data not found: .*nothing-here .*expected a folder of images"):
        open_source(tmp_path / "nothing-here")


def test_commands_refuse_streaming_data_where_views_are_read_by_index(photo_dir, tmp_path, monkeypatch, toy_model):
    """fdm finetune (and fdm train --cache none) read views by index: a streaming --data is a UsageError (which
    the fdm command prints as one line, exit code 2), raised before any training."""
    from fdm.commands import finetune as finetune_command
    from fdm.commands import train as train_command

    saved = save_dataset(tmp_path / "saved", image_files(photo_dir))
    monkeypatch.setattr(train_command, "load_base_model", lambda args: toy_model)
    monkeypatch.setattr(finetune_command, "load_base_model", lambda args: toy_model)
    monkeypatch.setattr(finetune_command, "load_fdm", lambda args: FDM(channels=8, hidden_channels=8, num_blocks=1))
    stream = f"hf:{saved}?streaming=1"
    model = ["--model", "taming", "--device", "cpu", "--steps", "1"]
    finetune = [*model, "--fdm", "unused", "--no-perceptual", "--out", str(tmp_path / "ft")]
    commands = [
        (finetune_command, [*finetune, "--data", stream],
         "--data hf:.*streaming=1: fine-tuning reads images by index and Hugging Face saved dataset .* only streams"),
        (finetune_command, [*finetune, "--data", str(photo_dir), "--val-data", stream], "--val-data hf:"),
        (train_command, [*model, "--data", stream, "--cache", "none", "--out", str(tmp_path / "tr")],
         "--cache none re-encodes views by index .* use --cache memory or --cache disk"),
    ]
    for command, argv, message in commands:
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        with pytest.raises(UsageError, match=message):
            command.run(parser.parse_args(argv))
    assert not (tmp_path / "tr").exists() and not (tmp_path / "ft").exists()


@pytest.mark.parametrize("name", ["dataset_dict.json", "train/dataset_info.json", "train/state.json"])
def test_deeply_nested_dataset_metadata_is_refused_before_datasets_reads_it(photo_dir, tmp_path, name):
    folder = save_dataset(tmp_path / "saved", image_files(photo_dir))
    (folder / name).write_text("[" * 100_000 + "]" * 100_000)  # datasets' json.load: RecursionError
    with pytest.raises(InputError, match=f"Cannot open Hugging Face saved dataset .*{name} nests too deeply to parse"):
        HFDatasetSource(folder)
