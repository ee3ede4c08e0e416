"""Bad weights get a clear exception naming the file or the keys (issue 2, item 7): truncated or corrupted
safetensors, config.json that does not describe the weights, missing / extra keys, an FDM for another base model
(codebook fingerprint, channel count), unreadable pickled checkpoints, and pickles that carry code.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

import fdm
from fdm.errors import CheckpointError, FingerprintMismatchError
from fdm.io.torch_files import read_checkpoint
from fdm.io.unpickler import OpaqueObject
from fdm.io.weights import write_weights
from toy_vq import ToyVQ


@pytest.fixture
def saved(tmp_path) -> pathlib.Path:
    """A saved FDM with non-zero weights."""
    module = fdm.FDM(channels=8, hidden_channels=16, num_blocks=2)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.1)
    module.save_pretrained(tmp_path / "fdm")
    return tmp_path / "fdm"


def toy_fdm(model: ToyVQ, **config) -> fdm.FDM:
    adapter = fdm.find_adapter(model)
    return fdm.FDM(channels=adapter.channels, hidden_channels=16, num_blocks=2,
                   base_model_fingerprint=adapter.fingerprint(), **config)


# --- weight files ---------------------------------------------------------------------------------------------


def test_truncated_safetensors(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as err:
        fdm.FDM.from_pretrained(saved)
    assert str(weights) in str(err.value)


def test_corrupted_safetensors_header(saved):
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8  # the JSON header right after its 8-byte length
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupted") as err:
        fdm.FDM.from_pretrained(saved)
    assert str(weights) in str(err.value)


def test_corrupted_tensor_bytes(saved):
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # one bit of the last tensor: still parses, but the recorded digest no longer matches
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupted: its tensors hash to") as err:
        fdm.FDM.from_pretrained(saved)
    assert str(weights) in str(err.value)


def test_config_that_does_not_match_the_weights(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "channels": 4}))
    with pytest.raises(CheckpointError, match="does not match its weights") as err:
        fdm.FDM.from_pretrained(saved)
    message = str(err.value)
    assert "'channels': 4" in message
    assert "stem.weight: expected (16, 5, 3, 3), got (16, 9, 3, 3)" in message
    assert "head.weight: expected (4, 16, 3, 3), got (8, 16, 3, 3)" in message


def test_config_with_an_unknown_entry(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "num_block": 2}))  # typo
    with pytest.raises(CheckpointError, match=r"unknown entries \['num_block'\]"):
        fdm.FDM.from_pretrained(saved)


def test_missing_config_json(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        fdm.FDM.from_pretrained(saved)


def test_weight_file_with_a_missing_key(saved):
    state = fdm.FDM.from_pretrained(saved).state_dict()
    del state["blocks.1.expand.bias"]
    write_weights(state, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.1.expand.bias'\], unexpected keys \[\]"):
        fdm.FDM.from_pretrained(saved)


def test_weight_file_with_an_extra_key(saved):
    state = fdm.FDM.from_pretrained(saved).state_dict()
    state["blocks.2.reduce.weight"] = torch.zeros(8, 16, 3, 3)  # a third block the config does not have
    write_weights(state, saved / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \[\], unexpected keys \['blocks.2.reduce.weight'\]"):
        fdm.FDM.from_pretrained(saved)


# --- an FDM for another base model ------------------------------------------------------------------------------


def test_fdm_for_another_base_model_is_refused_by_fingerprint():
    torch.manual_seed(1)
    trained_for = ToyVQ()
    torch.manual_seed(2)
    other = ToyVQ()  # same architecture, different codebook
    module = toy_fdm(trained_for, base_model="toy-1")
    fdm.Dequantizer(trained_for, module)  # the matching pair is accepted
    with pytest.raises(FingerprintMismatchError, match="trained for base model toy-1") as err:
        fdm.Dequantizer(other, module)
    assert module.base_model_fingerprint in str(err.value)
    assert fdm.find_adapter(other).fingerprint() in str(err.value)
    fdm.Dequantizer(other, module, check_fingerprint=False)  # the explicit override


def test_fingerprint_survives_save_and_load(tmp_path):
    torch.manual_seed(1)
    trained_for = ToyVQ()
    torch.manual_seed(2)
    other = ToyVQ()
    toy_fdm(trained_for).save_pretrained(tmp_path)
    loaded = fdm.FDM.from_pretrained(tmp_path)
    fdm.Dequantizer(trained_for, loaded)
    with pytest.raises(FingerprintMismatchError):
        fdm.Dequantizer(other, loaded)


def test_fdm_for_another_channel_count_is_refused_even_without_fingerprint_check():
    module = toy_fdm(ToyVQ(channels=8))
    with pytest.raises(FingerprintMismatchError, match="8-channel features but the model's quantized map has 4"):
        fdm.Dequantizer(ToyVQ(channels=4), module, check_fingerprint=False)


# --- pickled checkpoints ----------------------------------------------------------------------------------------


def test_read_checkpoint_on_a_truncated_pth(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)


def test_read_checkpoint_on_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("model: vqgan\nlr: 4.5e-6\n")
    with pytest.raises(CheckpointError, match="as a PyTorch checkpoint") as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)


class WritesOnReduce:
    """Unpickling this calls ``Path.write_text(marker, ...)``: what a malicious checkpoint would do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "pickle code ran")


class WritesOnSetstate:
    """Unpickling this calls its ``__setstate__``, which writes a file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = str(marker)

    def __setstate__(self, state):
        pathlib.Path(state["marker"]).write_text("pickle code ran")


class AttributeDict(dict):
    """A dict subclass, like the ``hyper_parameters`` of Lightning checkpoints (pickled with SETITEMS)."""


@pytest.mark.parametrize("payload", [WritesOnReduce, WritesOnSetstate])
def test_restricted_unpickler_runs_no_pickled_code(tmp_path, payload):
    marker = tmp_path / "marker.txt"
    state_dict = {"encoder.weight": torch.randn(4, 3), "decoder.bias": torch.randn(3)}
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state_dict, "callbacks": {"evil": payload(marker)}, "epoch": 3,
                "hyper_parameters": AttributeDict(lr=4.5e-6, embed_dim=256)}, path)

    checkpoint = read_checkpoint(path)
    assert not marker.exists()
    assert checkpoint["epoch"] == 3
    assert checkpoint["state_dict"].keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(checkpoint["state_dict"][key], value)
    placeholder = checkpoint["callbacks"]["evil"]
    assert isinstance(placeholder, OpaqueObject) and not isinstance(placeholder, payload)
    assert checkpoint["hyper_parameters"].mapping == {"lr": 4.5e-6, "embed_dim": 256}  # kept, as inert data

    # control: the payload is live, an unrestricted load runs it
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pickle code ran"


def test_fields_that_do_not_fit_config_json_are_refused_before_anything_is_written(tmp_path):
    module = fdm.FDM(4, hidden_channels=4, num_blocks=1)
    for name, value, phrase in [("base_model", 5, "base_model must be a string or None; got int 5"),
                                ("base_model_fingerprint", ["x"], "base_model_fingerprint must be a string"),
                                ("training_info", {"seconds": torch.tensor(1.0)}, "must hold only JSON data")]:
        original = getattr(module, name)
        setattr(module, name, value)
        with pytest.raises(TypeError, match=phrase):
            module.save_pretrained(tmp_path / name)
        assert not (tmp_path / name).exists()
        setattr(module, name, original)


def test_a_config_json_describing_a_huge_fdm_is_refused_before_anything_is_allocated(saved):
    config = json.loads((saved / "config.json").read_text())
    for crafted, phrase in [({"channels": 100_000, "hidden_channels": 100_000},
                             r"parameters \(channels 100000, hidden 100000, 2 blocks\); more than 200,000,000"),
                            ({"num_blocks": 10**7}, "10000000 blocks"),
                            ({"hidden_channels": "8"}, "hidden_channels must be an integer; got '8'")]:
        (saved / "config.json").write_text(json.dumps({**config, **crafted}))
        with pytest.raises(CheckpointError, match=phrase):
            fdm.FDM.from_pretrained(saved)
