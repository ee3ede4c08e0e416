"""A seeded fuzz test of the readers of user files: valid files of every kind the library reads (torch.save zip
archives and legacy files, safetensors, JSON, YAML, PNG and JPEG images, WebDataset tar shards) are corrupted in a
fixed set of ways (bytes flipped, truncated, a block repeated, zeroed), and each reader must end in a correct load or
one of the library's own errors (:class:`fdm.errors.FdmError`): never another exception, no file left open, and
nothing written beside the files read. 800 reads, about a second. Then the same for folders read as a whole, one file
corrupted at a time: saved models (FDM, taming, PUT, diffusers) through their loaders, and the feature cache (its
``meta.json`` index and its arrays), about 25 seconds."""

from __future__ import annotations

import gc
import io
import json
import random
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fdm.config_io import read_json, read_yaml
from fdm.errors import FdmError
from fdm.images import read_image
from fdm.io.torch_files import read_checkpoint
from fdm.io.weights import read_safetensors, write_weights
from fdm.training.sources import TarShardSource

SEED = 0
MUTATIONS_PER_FILE = 100


def _state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=generator), "conv.bias": torch.zeros(4),
            "steps": torch.tensor(7), "codes": torch.arange(12, dtype=torch.int64).view(3, 4)}


def _png(size: int = 24) -> bytes:
    pixels = np.random.default_rng(SEED).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _jpeg(size: int = 24) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(_png(size))).save(out, format="JPEG")
    return out.getvalue()


def _torch_file(legacy: bool) -> bytes:
    out = io.BytesIO()
    torch.save({"state_dict": _state_dict(), "epoch": 3}, out, _use_new_zipfile_serialization=not legacy)
    return out.getvalue()


def _safetensors(folder: Path) -> bytes:
    return write_weights(_state_dict(), folder / "reference.safetensors").read_bytes()


def _tar_shard() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i, data in enumerate([_png(), _jpeg()]):
            info = tarfile.TarInfo(f"{i:06d}.{'png' if i == 0 else 'jpg'}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _read_shard(path: Path) -> None:
    source = TarShardSource(str(path))
    for _ in source.iter_images(0, len(source)):
        pass


def _mutations(data: bytes, rng: random.Random) -> list[bytes]:
    """``MUTATIONS_PER_FILE`` corrupted copies of ``data``: flipped bytes, truncations, a repeated block, zeroed
    blocks, and bytes set to the extremes (lengths and counts in headers become huge or negative)."""
    out = []
    for k in range(MUTATIONS_PER_FILE):
        mutated = bytearray(data)
        kind = k % 5
        if kind == 0:  # flip a few bytes
            for _ in range(rng.randint(1, 8)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncate
            mutated = mutated[: rng.randrange(len(mutated))]
        elif kind == 2:  # repeat a block
            start = rng.randrange(len(mutated))
            block = mutated[start: start + rng.randint(1, 64)]
            mutated[start:start] = block * rng.randint(1, 4)
        elif kind == 3:  # zero a block
            start = rng.randrange(len(mutated))
            mutated[start: start + rng.randint(1, 32)] = bytes(min(32, len(mutated) - start))
        else:  # set bytes to 0xff (huge lengths) or 0x80 (sign bits)
            for _ in range(rng.randint(1, 6)):
                mutated[rng.randrange(len(mutated))] = rng.choice((0xFF, 0x80, 0x7F))
        out.append(bytes(mutated))
    return out


READERS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "torch zip archive": (".pt", read_checkpoint),
    "torch legacy file": (".pt", read_checkpoint),
    "safetensors": (".safetensors", lambda path: read_safetensors(path, require_digest=True, require_finite=True)),
    "JSON": (".json", lambda path: read_json(path, "fuzzed JSON")),
    "YAML": (".yaml", lambda path: read_yaml(path, "fuzzed YAML")),
    "PNG image": (".png", read_image),
    "JPEG image": (".jpg", read_image),
    "tar shard": (".tar", _read_shard),
}


def _valid(kind: str, folder: Path) -> bytes:
    if kind.startswith("torch"):
        return _torch_file(legacy=kind.endswith("legacy file"))
    return {
        "safetensors": lambda: _safetensors(folder),
        "JSON": lambda: json.dumps({"channels": 16, "training": {"steps": [1, 2, 3], "name": "run"}}).encode(),
        "YAML": lambda: b"model:\n  target: taming.models.vqgan.VQModel\n  params:\n    embed_dim: 8\n"
                        b"    ddconfig: {ch: 32, ch_mult: [1, 2], num_res_blocks: 1}\nanchors: &a [1, 2]\nuse: *a\n",
        "PNG image": _png,
        "JPEG image": _jpeg,
        "tar shard": _tar_shard,
    }[kind]()


@pytest.mark.filterwarnings("error::ResourceWarning")  # a file left open: raised when its handle is collected ...
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # ... which fails the test
@pytest.mark.parametrize("kind", list(READERS))
def test_corrupted_files_load_or_fail_with_the_librarys_error(kind, tmp_path):
    suffix, read = READERS[kind]
    data = _valid(kind, tmp_path)
    original = tmp_path / f"original{suffix}"
    original.write_bytes(data)
    read(original)  # the uncorrupted file loads
    rng = random.Random(f"{SEED}-{kind}")
    outcomes = {"loaded": 0, "refused": 0}
    before = sorted(p.name for p in tmp_path.iterdir())
    for i, mutated in enumerate(_mutations(data, rng)):
        path = tmp_path / f"mutated-{i}{suffix}"
        path.write_bytes(mutated)
        try:
            read(path)
        except FdmError:
            outcomes["refused"] += 1
        except Exception as err:  # anything else is a bug: name the mutation that found it
            raise AssertionError(f"{kind}, mutation {i} ({len(mutated)} bytes): {type(err).__name__}: {err}") from err
        else:
            outcomes["loaded"] += 1
        path.unlink()
    gc.collect()  # a reader that left a file open warns here, and the warning fails the test
    assert outcomes["refused"] > 0, outcomes  # the corruptions were noticed, not all read as something
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside the files read


# --- folders read as a whole: model loaders and the feature cache ----------------------------------------------


def _fdm_folder(folder: Path) -> Callable[[Path], object]:
    from fdm import FDM

    torch.manual_seed(SEED)
    FDM(8, hidden_channels=8, num_blocks=1).save_pretrained(folder)
    (folder / "README.md").unlink()
    return FDM.from_pretrained


def _feature_cache(folder: Path) -> Callable[[Path], object]:
    import fdm
    from fdm.training import FeatureCache, TensorViews
    from toy_vq import ToyVQ

    torch.manual_seed(SEED)
    adapter = fdm.find_adapter(ToyVQ().eval())
    views = TensorViews(torch.rand(6, 3, 16, 16) * 2 - 1)

    def read(root: Path) -> object:
        cache = FeatureCache(adapter, views, mode="disk", cache_dir=root, batch_size=3, progress=False)
        cache.prepare()
        return cache.get(list(range(len(views))))

    read(folder)
    (shard,) = folder.glob("*/shard-*")  # the files are mutated where the cache keeps them
    for file in shard.iterdir():
        file.rename(folder / file.name)
    shard.rmdir()
    shard.parent.rmdir()
    layout = shard.relative_to(folder)

    def read_moved(root: Path) -> object:
        (root / layout).mkdir(parents=True)
        for file in [p for p in root.iterdir() if p.is_file()]:
            file.rename(root / layout / file.name)
        return read(root)

    return read_moved


def _taming_model(folder: Path) -> Callable[[Path], object]:
    pytest.importorskip("taming")
    from fdm.adapters.taming import load_model
    from taming_tiny import random_model, save_lightning_ckpt, vqgan_config, write_config

    write_config(vqgan_config(), folder / "model.yaml")
    save_lightning_ckpt(random_model(vqgan_config()).state_dict(), folder / "last.ckpt")
    return lambda root: load_model(root / "model.yaml", root / "last.ckpt")


def _put_checkpoint(folder: Path) -> Callable[[Path], object]:
    from fdm.adapters.put import load_model

    codec = read_safetensors(Path(__file__).parent / "data" / "put" / "put_tiny_p_vqvae.safetensors")
    torch.save({"model": codec, "epoch": 3}, folder / "p_vqvae.pth")
    return lambda root: load_model(root / "p_vqvae.pth")


def _diffusers_folder(folder: Path) -> Callable[[Path], object]:
    diffusers = pytest.importorskip("diffusers")
    from fdm.adapters.diffusers import load_model

    torch.manual_seed(SEED)
    diffusers.VQModel(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, num_vq_embeddings=8,
                      norm_num_groups=4).save_pretrained(folder)
    return load_model


FOLDERS: dict[str, Callable[[Path], Callable[[Path], object]]] = {
    "FDM folder": _fdm_folder,
    "feature cache": _feature_cache,
    "taming model": _taming_model,
    "PUT checkpoint": _put_checkpoint,
    "diffusers VQModel": _diffusers_folder,
}
FOLDER_MUTATIONS = 40  # per file of the folder


@pytest.mark.filterwarnings("error::ResourceWarning")
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", list(FOLDERS))
def test_corrupted_model_folders_and_caches_load_or_fail_with_the_librarys_error(kind, tmp_path):
    """Each file of a saved model (or of the feature cache: its index meta.json and its arrays) corrupted in turn,
    the others intact: the loader ends in a load or the library's error, leaves no file open and writes nothing."""
    valid = tmp_path / "valid"
    valid.mkdir()
    read = FOLDERS[kind](valid)
    files = sorted(p.name for p in valid.iterdir())
    work = tmp_path / "work"
    shutil.copytree(valid, work)
    read(work)  # the uncorrupted folder loads
    shutil.rmtree(work)
    rng = random.Random(f"{SEED}-{kind}")
    outcomes = {"loaded": 0, "refused": 0}
    for name in files:
        for i, mutated in enumerate(_mutations((valid / name).read_bytes(), rng)[:FOLDER_MUTATIONS]):
            shutil.copytree(valid, work)
            (work / name).write_bytes(mutated)
            try:
                read(work)
            except FdmError:
                outcomes["refused"] += 1
            except Exception as err:
                raise AssertionError(f"{kind}, {name} mutation {i} ({len(mutated)} bytes): "
                                     f"{type(err).__name__}: {err}") from err
            else:
                outcomes["loaded"] += 1
            shutil.rmtree(work)
    gc.collect()
    assert outcomes["refused"] > 0, outcomes
    assert sorted(p.name for p in valid.iterdir()) == files
