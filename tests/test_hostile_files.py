"""Crafted files against the readers (issue 23): tensors that would grow their storage or share memory, state dicts
of the wrong types, and the limits every reader applies (:mod:`fdm.limits`)."""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import fdm
import fdm.limits
from fdm.errors import CheckpointError
from fdm.io.official import fdm_to_official_state_dict
from fdm.io.torch_files import read_checkpoint

LEGACY_HEADER = b"".join(pickle.dumps(obj, protocol=2) for obj in (
    0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}))


class Storage:
    """Stands for a storage record of a crafted file (pickled as a persistent id)."""

    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class Tensor:
    """Pickles as ``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""

    def __init__(self, storage: Storage, size: tuple, stride: tuple, offset: int = 0):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel) + ((None,) if self.legacy else ())
        return None


def _dumps(obj, legacy: bool = False) -> bytes:
    out = io.BytesIO()
    _Pickler(out, legacy).dump(obj)
    return out.getvalue()


def write_archive(path: Path, obj, floats: dict[str, list[float]], byteorder: str = "little") -> Path:
    """A ``torch.save`` zip archive of ``obj`` (holding :class:`Tensor` / :class:`Storage`) and float32 records."""
    fmt = "<" if byteorder == "little" else ">"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", _dumps(obj))
        archive.writestr("archive/byteorder", byteorder)
        for key, values in floats.items():
            archive.writestr(f"archive/data/{key}", struct.pack(f"{fmt}{len(values)}f", *values))
    return path


def write_legacy(path: Path, obj, floats: dict[str, list[float]]) -> Path:
    """A legacy (pre-zip) ``torch.save`` file of ``obj`` and float32 storages."""
    body = _dumps(obj, legacy=True) + pickle.dumps(list(floats), protocol=2)
    for values in floats.values():
        body += struct.pack("<q", len(values)) + struct.pack(f"<{len(values)}f", *values)
    path.write_bytes(LEGACY_HEADER + body)
    return path


# --- tensors never reach past their storage, nor share memory ---------------------------------------------------


@pytest.mark.parametrize("writer", [write_archive, write_legacy, "big-endian"])
@pytest.mark.parametrize("stored", [0, 2])
def test_a_tensor_larger_than_its_storage_is_refused(tmp_path, writer, stored):
    """torch would grow the storage to fit the view, and the weights would be uninitialised memory."""
    values = [1.5, -2.0][:stored]
    obj = {"t": Tensor(Storage("0", stored), (1000,), (1,))}
    if writer == "big-endian":
        path = write_archive(tmp_path / "be.pt", obj, {"0": values}, byteorder="big")
    else:
        path = writer(tmp_path / "grow.pt", obj, {"0": values})
    with pytest.raises(CheckpointError, match=rf"size \(1000,\), stride \(1,\) at offset 0 reaches element 1000, "
                                              rf"beyond its storage of {stored}"):
        read_checkpoint(path)


@pytest.mark.parametrize(("size", "stride", "offset", "phrase"), [
    ((10**6,), (0,), 0, "sharing memory"),  # stride 0: a million elements over two stored floats
    ((2, 2), (1, 1), 0, "sharing memory"),  # overlapping rows
    ((2,), (1,), 1, "reaches element 3"),  # offset past the end
    ((2,), (-1,), 0, "must be non-negative ints"),
    ((2, 1), (1,), 0, "one stride per dimension"),
])
def test_views_that_share_memory_or_leave_their_storage_are_refused(tmp_path, size, stride, offset, phrase):
    path = write_archive(tmp_path / "view.pt", {"t": Tensor(Storage("0", 2), size, stride, offset)},
                         {"0": [1.5, -2.0]})
    with pytest.raises(CheckpointError, match=phrase):
        read_checkpoint(path)


def test_views_torch_save_writes_still_read(tmp_path):
    """Slices, transposes and big-endian storages: views inside their storage read back exactly."""
    base = torch.randn(4, 6)
    obj = {"base": base, "t": base.t(), "row": base[1], "col": base[:, 2], "step": base[::2, 1::3]}
    path = tmp_path / "views.pt"
    torch.save(obj, path)
    loaded = read_checkpoint(path)
    assert all(torch.equal(loaded[k], v) for k, v in obj.items())
    path = write_archive(tmp_path / "be.pt", {"t": Tensor(Storage("0", 2), (2,), (1,))}, {"0": [1.5, -2.0]}, "big")
    assert torch.equal(read_checkpoint(path)["t"], torch.tensor([1.5, -2.0]))


def test_a_big_endian_storage_cannot_grow(tmp_path):
    path = write_archive(tmp_path / "be.pt", {"t": Tensor(Storage("0", 2), (2,), (1,))}, {"0": [1.5, -2.0]}, "big")
    storage = read_checkpoint(path)["t"].untyped_storage()
    with pytest.raises(RuntimeError, match="not resizable"):
        storage.resize_(1 << 20)


# --- state dicts: names map to tensors, or the loader says which entries do not ---------------------------------


def _official_file(tmp_path: Path, change) -> Path:
    state = fdm_to_official_state_dict(fdm.FDM(8, hidden_channels=8, num_blocks=1).state_dict())
    path = tmp_path / "fdm.pth"
    torch.save({"model": change(state)}, path)
    return path


def _taming_state_dict(checkpoint: dict) -> dict:
    from fdm.adapters.taming.loading import model_state_dict

    return model_state_dict(checkpoint, torch.nn.Conv2d(2, 2, 1), source="checkpoint x.ckpt")


def _first(state: dict) -> str:
    return next(iter(state))


STATE_CHANGES = {
    "an integer key": (lambda sd: {**sd, 7: torch.zeros(1)}, "7: Tensor"),
    "a number where a tensor is expected": (lambda sd: {**sd, _first(sd): 3}, ": int"),
    "a nested dict": (lambda sd: {**sd, _first(sd): {"x": torch.zeros(1)}}, ": dict"),
}


@pytest.mark.parametrize("change", list(STATE_CHANGES))
@pytest.mark.parametrize("loader", ["official FDM", "PUT split", "PUT load_model", "taming"])
def test_state_dict_entries_of_the_wrong_type_are_named(tmp_path, loader, change):
    from fdm.adapters.put import load_model, split_checkpoint

    edit, phrase = STATE_CHANGES[change]
    path = _official_file(tmp_path, edit)
    read = {"official FDM": fdm.FDM.from_official_checkpoint, "PUT split": split_checkpoint,
            "PUT load_model": load_model,
            "taming": lambda p: _taming_state_dict({"state_dict": read_checkpoint(p)["model"]})}[loader]
    with pytest.raises(CheckpointError, match=f"must map names to tensors; these entries do not: .*{phrase}"):
        read(path)


@pytest.mark.parametrize("loader", ["official FDM", "PUT split"])
def test_a_model_entry_that_is_not_a_dict_is_refused(tmp_path, loader):
    from fdm.adapters.put import split_checkpoint

    path = _official_file(tmp_path, lambda sd: 5)
    read = fdm.FDM.from_official_checkpoint if loader == "official FDM" else split_checkpoint
    with pytest.raises(CheckpointError, match="must be a state dict .*; got int"):
        read(path)


def test_complex_weights_are_refused_not_cast(tmp_path):
    path = _official_file(tmp_path, lambda sd: {k: v.to(torch.complex64) for k, v in sd.items()})
    with pytest.raises(CheckpointError, match="integer and complex weights are refused, not cast"):
        fdm.FDM.from_official_checkpoint(path)


# --- one limits object, applied by every reader ------------------------------------------------------------------


def test_limits_are_validated_and_override_restores_them():
    before = fdm.limits.current()
    with pytest.raises(ValueError, match="max_tensor_bytes must be a positive integer; got 0"):
        fdm.limits.Limits(max_tensor_bytes=0)
    with pytest.raises(TypeError):
        fdm.limits.set_limits(max_tensor_byte=1)  # a misspelt field is not silently ignored
    with pytest.raises(RuntimeError), fdm.limits.override(max_depth=3) as inside:
        assert inside.max_depth == 3 and fdm.limits.current() == inside
        raise RuntimeError
    assert fdm.limits.current() == before
    previous = fdm.limits.set_limits(max_image_pixels=10)
    try:
        assert previous == before and fdm.limits.current().max_image_pixels == 10
    finally:
        fdm.limits.set_limits(previous)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_storage_over_the_tensor_limit_is_refused_before_it_is_read(tmp_path, legacy):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(256, dtype=torch.float32)}, path, _use_new_zipfile_serialization=not legacy)
    with fdm.limits.override(max_tensor_bytes=1000), pytest.raises(CheckpointError, match="1024 bytes, more than the "
                                                                                            "1000 allowed"):
        read_checkpoint(path)
    assert torch.equal(read_checkpoint(path)["w"], torch.arange(256, dtype=torch.float32))


def test_a_compressed_data_pkl_bomb_is_refused(tmp_path):
    """The pickle itself is bounded like the storages (a 10 MB pickle of one long string, deflated to kilobytes)."""
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"s": "a" * 10_000_000}, protocol=2),
                         compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match=r"record archive/data.pkl inflates \d+ bytes to \d+ \(more than "
                                              r"100-fold"):
        read_checkpoint(path)


def test_an_archive_inflating_past_the_total_limit_is_refused(tmp_path):
    path = tmp_path / "many.pt"
    torch.save({f"w{i}": torch.zeros(100) for i in range(10)}, path)  # 10 stored records of 400 bytes
    with fdm.limits.override(max_decompressed_bytes=2000), \
            pytest.raises(CheckpointError, match="inflate to more than 2000 bytes"):
        read_checkpoint(path)


def test_config_depth_fdm_size_and_image_pixels_follow_the_limits(tmp_path):
    from fdm.config_io import read_json
    from fdm.errors import ConfigError, InputError
    from fdm.images import read_image

    config = tmp_path / "config.json"
    config.write_text('{"a": {"b": {"c": 1}}}')
    with fdm.limits.override(max_depth=2), pytest.raises(ConfigError, match="nests deeper than 2 levels"):
        read_json(config)
    assert read_json(config) == {"a": {"b": {"c": 1}}}
    fdm.FDM(8, hidden_channels=8, num_blocks=1).save_pretrained(tmp_path / "fdm")
    with fdm.limits.override(max_fdm_parameters=1000), \
            pytest.raises(CheckpointError, match=r"more than 1,000 is refused \(fdm.limits\)"):
        fdm.FDM.from_pretrained(tmp_path / "fdm")
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "image.png")
    with fdm.limits.override(max_image_pixels=1000), \
            pytest.raises(InputError, match=r"40x30 pixels is more than the 1000 an image may have"):
        read_image(tmp_path / "image.png")
    assert read_image(tmp_path / "image.png").shape == (1, 3, 30, 40)


def test_label_maps_follow_the_limits(tmp_path):
    import numpy as np

    from fdm.adapters.taming.command import read_label_maps
    from fdm.errors import InputError

    np.save(tmp_path / "labels.npy", np.zeros((40, 30), dtype=np.uint8))
    with fdm.limits.override(max_label_map_pixels=1000), pytest.raises(InputError, match="larger than the 1000"):
        read_label_maps([tmp_path / "labels.npy"])
    assert read_label_maps([tmp_path / "labels.npy"]).shape == (1, 40, 30)


def test_a_taming_model_over_the_parameter_limit_is_refused_before_its_weights_are_read(tmp_path):
    pytest.importorskip("taming")
    from fdm.adapters.taming import load_model
    from fdm.errors import ConfigError
    from taming_tiny import random_model, save_lightning_ckpt, vqgan_config, write_config

    config = write_config(vqgan_config(), tmp_path / "model.yaml")
    checkpoint = save_lightning_ckpt(random_model(vqgan_config()).state_dict(), tmp_path / "last.ckpt")
    with fdm.limits.override(max_model_parameters=1000), \
            pytest.raises(ConfigError, match=r"VQModel of [\d,]+ parameters, more than the 1,000 allowed"):
        load_model(config, checkpoint)
    assert load_model(config, checkpoint) is not None


# --- taming configs: params are mappings, no file is read while building ---------------------------------------


@pytest.mark.parametrize(("edit", "phrase"), [
    (lambda c: c["model"]["params"].__setitem__("remap", "/dev/stdin"),
     r"model.params.remap = '/dev/stdin': a file that taming reads while building the model"),
    (lambda c: c["model"].__setitem__("params", [1, 2]), r"model.params must be a mapping .*; got list"),
    (lambda c: c["model"]["params"]["lossconfig"].__setitem__("params", "x"), None),  # the loss is never built
    (lambda c: c["model"]["params"].__setitem__("ddconfig", {"target": "torch.nn.Identity", "params": 3}),
     r"model.params.ddconfig.params must be a mapping .*; got int"),
])
def test_taming_config_params_and_remap_are_checked_before_anything_is_built(tmp_path, edit, phrase):
    pytest.importorskip("taming")
    from fdm.adapters.taming.loading import load_config
    from fdm.errors import ConfigError
    from taming_tiny import vqgan_config, write_config

    config = vqgan_config()
    edit(config)
    path = write_config(config, tmp_path / "model.yaml")
    if phrase is None:
        load_config(path)
    else:
        with pytest.raises(ConfigError, match=phrase):
            load_config(path)


def test_config_values_a_constructor_refuses_are_the_librarys_error(tmp_path):
    """Found by the folder fuzz test: taming and diffusers raise TypeError / ValueError / IndexError from their
    constructors for a config with a missing argument or inconsistent sizes."""
    from fdm.errors import ConfigError

    pytest.importorskip("taming")
    from fdm.adapters.taming.loading import build_model
    from taming_tiny import vqgan_config, write_config

    config = vqgan_config()
    del config["model"]["params"]["ddconfig"]["in_channels"]
    with pytest.raises(ConfigError, match=r"taming can build .*TypeError: .*in_channels"):
        build_model(write_config(config, tmp_path / "model.yaml"), device="meta")
    diffusers = pytest.importorskip("diffusers")
    from fdm.adapters.diffusers import load_model

    diffusers.VQModel(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).save_pretrained(tmp_path / "vq")
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    config["norm_num_groups"] = 32  # 8 channels cannot be split into 32 groups
    (tmp_path / "vq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"could not build the VQModel that .*config.json describes: ValueError"):
        load_model(tmp_path / "vq")


def test_a_deeply_nested_metrics_json_is_not_taken_for_a_report(tmp_path):
    from fdm.errors import UsageError
    from fdm.evaluation.report import check_report_dir

    (tmp_path / "index.html").write_text("<html></html>")
    (tmp_path / "metrics.json").write_text("[" * 100_000 + "]" * 100_000)  # json.loads: RecursionError
    with pytest.raises(UsageError, match="not empty and holds no previous report"):
        check_report_dir(tmp_path)


def test_a_checkpoint_nesting_containers_deeply_is_refused(tmp_path):
    """A dict checkpoint holding a 100 000-deep list: refused before a loader walks it (moving it to a device
    recursed until RecursionError)."""
    deep = pickle.EMPTY_LIST * 100_000 + pickle.APPEND * 99_999
    data_pkl = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.SHORT_BINUNICODE + b"\x01x" + deep + pickle.SETITEM \
        + pickle.STOP
    path = tmp_path / "deep.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
    with pytest.raises(CheckpointError, match="deep.pt nests containers deeper than 64 levels"):
        read_checkpoint(path, map_location="meta")
    nested = {"a": [[{"b": (1, [2])}]]}
    torch.save(nested, tmp_path / "shallow.pt")
    assert read_checkpoint(tmp_path / "shallow.pt") == nested
