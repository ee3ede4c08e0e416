"""Untrusted files run no code (issue 12, items 1 and 2).

1. Pickles. Every pickle byte fdm-vq reads goes through one restricted unpickler with one allowlist
   (:mod:`fdm.io.unpickler`). Crafted files, each carrying payloads that try to create marker files (``os.system``,
   ``posix.system``, ``nt.system``, ``subprocess.Popen`` / ``run``, ``builtins.eval``, ``builtins.getattr``
   chains, ``importlib.import_module``, ``torch.load`` of a second file, ``copyreg._reconstructor``,
   ``__setstate__``, ``__reduce_ex__``), come in three kinds: (a) a ``torch.save`` zip archive with the payloads
   in its ``data.pkl``, (b) a legacy (non-zip) ``torch.save`` file whose FIRST header pickle runs the payloads and
   then yields the real magic number (and whose data pickle carries them too), (c) a bare pickle. Each kind goes
   through every loader that reads pickles (``read_checkpoint``, ``FDM.from_official_checkpoint``, the taming
   and PUT ``load_model``, ``split_checkpoint``, the VGG19 backbone, the ``fdm eval`` / ``fdm inpaint`` commands,
   Hub downloads): the file loads normally or is refused with a CheckpointError (exit code 2 for the commands),
   and no marker appears. Control tests show every payload is live under plain ``pickle``.
2. taming configs. Every ``target`` at every depth of the model section is checked against an allowlist of
   taming's classes before anything is imported; ``trust_config=True`` / ``--trust-config`` opts in.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import pickletools
import shlex
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import fdm
from fdm.errors import CheckpointError, ConfigError
from fdm.io.torch_files import read_checkpoint
from fdm.io.unpickler import OpaqueObject

TESTS = Path(__file__).resolve().parent
KINDS = ("zip", "legacy", "bare")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# --- pickle opcodes ---------------------------------------------------------------------------------------------


def _str(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _stack_global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + pickle.STACK_GLOBAL


def _tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _list(*items: bytes) -> bytes:
    return pickle.EMPTY_LIST + pickle.MARK + b"".join(items) + pickle.APPENDS


def _call(func: bytes, *args: bytes) -> bytes:
    return func + _tuple(*args) + pickle.REDUCE


def _pickle(expression: bytes) -> bytes:
    return pickle.PROTO + b"\x02" + expression + pickle.STOP


def _dict(**items: bytes) -> bytes:
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(_str(k) + v for k, v in items.items()) + pickle.SETITEMS


class WritesOnSetstate:
    """Unpickling this (NEWOBJ + BUILD) calls its ``__setstate__``, which writes a file."""

    def __setstate__(self, state):
        Path(state["marker"]).write_text("pickle code ran")


class ReduceEx:
    """Pickles as a call of ``os.system`` through ``__reduce_ex__``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce_ex__(self, protocol):
        return os.system, (self.command,)


def payloads(markers: Path, second_file: Path) -> dict[str, bytes]:
    """Pickle expressions (each pushes one object) that, unpickled by plain ``pickle``, create ``markers/<name>``."""

    def touch(name: str) -> str:
        return f"touch {shlex.quote(str(markers / name))}"

    def getattr_(obj: bytes, name: str) -> bytes:
        return _call(_global("builtins", "getattr"), obj, _str(name))

    def argv(name: str) -> bytes:
        return _list(_str("touch"), _str(str(markers / name)))

    return {
        "os.system": _call(_global("os", "system"), _str(touch("os.system"))),
        "posix.system": _call(_global("posix", "system"), _str(touch("posix.system"))),
        "nt.system": _call(_global("nt", "system"), _str(touch("nt.system"))),
        "STACK_GLOBAL os.system": _call(_stack_global("os", "system"), _str(touch("STACK_GLOBAL os.system"))),
        "subprocess.Popen": _call(_global("subprocess", "Popen"), argv("subprocess.Popen")),
        "subprocess.run": _call(_global("subprocess", "run"), argv("subprocess.run")),
        "builtins.eval": _call(_global("builtins", "eval"),
                               _str(f"open({str(markers / 'builtins.eval')!r}, 'w').close()")),
        "builtins.getattr chain": _call(
            getattr_(getattr_(_call(_global("builtins", "__import__"), _str("subprocess")), "os"), "system"),
            _str(touch("builtins.getattr chain"))),
        "importlib.import_module": _call(
            getattr_(_call(_global("importlib", "import_module"), _str("os")), "system"),
            _str(touch("importlib.import_module"))),
        "torch.load": _call(_global("torch", "load"), _str(str(second_file)), pickle.NONE,
                            _call(_global("importlib", "import_module"), _str("pickle"))),
        "copyreg._reconstructor": _call(_global("copyreg", "_reconstructor"), _global("subprocess", "Popen"),
                                        _global("subprocess", "Popen"), argv("copyreg._reconstructor")),
        "__setstate__": (_global(WritesOnSetstate.__module__, "WritesOnSetstate") + pickle.EMPTY_TUPLE
                         + pickle.NEWOBJ + _dict(marker=_str(str(markers / "__setstate__"))) + pickle.BUILD),
        "__reduce_ex__": pickle.dumps(ReduceEx(touch("__reduce_ex__")), protocol=2)[2:-1],
    }


PAYLOAD_NAMES = list(payloads(Path("m"), Path("f")))


@pytest.fixture
def markers(tmp_path) -> Path:
    path = tmp_path / "markers"
    path.mkdir()
    return path


@pytest.fixture
def evil(tmp_path, markers) -> dict[str, bytes]:
    """The payloads; ``torch.load`` gets a second file whose own pickle runs ``os.system``."""
    second = tmp_path / "second.pt"
    torch.save(ReduceEx(f"touch {shlex.quote(str(markers / 'torch.load'))}"), second)
    return payloads(markers, second)


def assert_no_marker(markers: Path) -> None:
    assert sorted(p.name for p in markers.iterdir()) == []


# --- crafting files ---------------------------------------------------------------------------------------------


def _add_entry(pickle_bytes: bytes, key: str, value: bytes) -> bytes:
    """A protocol-2 pickle of a dict, with ``key: value`` set on that dict before STOP."""
    assert pickle_bytes[:2] == pickle.PROTO + b"\x02" and pickle_bytes[-1:] == pickle.STOP
    return pickle_bytes[:-1] + _str(key) + value + pickle.SETITEM + pickle.STOP


def _split_pickles(data: bytes, count: int) -> tuple[list[bytes], bytes]:
    stream, parts = io.BytesIO(data), []
    for _ in range(count):
        start = stream.tell()
        for _op in pickletools.genops(stream):
            pass
        parts.append(data[start:stream.tell()])
    return parts, data[stream.tell():]


def craft(kind: str, valid: dict, payload: bytes, path: Path) -> Path:
    """``valid`` saved as ``kind`` with ``payload`` (a pickle expression) where each kind's reader meets it.

    zip: ``data.pkl`` holds ``valid`` plus ``"evil": payload``. legacy: the first header pickle runs ``payload``,
    pops it and yields torch's magic number, and the data pickle holds ``"evil": payload``. bare: a plain pickle
    of ``{"evil": payload}``.
    """
    if kind == "bare":
        path.write_bytes(_pickle(_dict(evil=payload)))
    elif kind == "zip":
        torch.save(valid, path)
        records = {}
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                data = archive.read(name)
                records[name] = _add_entry(data, "evil", payload) if name.endswith("/data.pkl") else data
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            for name, data in records.items():
                archive.writestr(name, data)
    else:
        torch.save(valid, path, _use_new_zipfile_serialization=False)
        (magic, protocol, sys_info, data, keys), tail = _split_pickles(path.read_bytes(), 5)
        real_magic = pickle.dumps(LEGACY_MAGIC, protocol=2)
        assert magic == real_magic
        header = pickle.PROTO + b"\x02" + payload + pickle.POP + real_magic[2:]
        path.write_bytes(header + protocol + sys_info + _add_entry(data, "evil", payload) + keys + tail)
    return path


def all_payloads(evil: dict[str, bytes]) -> bytes:
    return _list(*evil.values())


def test_crafted_legacy_file_is_what_it_claims(tmp_path, evil, markers):
    """Control for kind (b): torch's own reader with plain pickle loads it normally AND runs the header payload."""
    weights = {"w": torch.randn(3, 2)}
    path = craft("legacy", {"state_dict": weights}, evil["os.system"], tmp_path / "legacy.pt")
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(loaded["state_dict"]["w"], weights["w"])
    assert (markers / "os.system").exists()


@pytest.mark.parametrize("name", [n for n in PAYLOAD_NAMES if n != "nt.system"])
def test_payload_is_live_under_plain_pickle(name, evil, markers):
    """Control: each payload really runs its command when unpickled without restrictions."""
    result = pickle.loads(_pickle(evil[name]))
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert (markers / name).exists()


# --- 1. pickles: every payload, every kind, read_checkpoint -----------------------------------------------------


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_read_checkpoint_runs_no_payload(kind, name, tmp_path, evil, markers):
    weights = {"w": torch.randn(4, 3), "b": torch.arange(3)}
    path = craft(kind, {"state_dict": weights, "epoch": 3}, evil[name], tmp_path / f"{kind}.ckpt")
    if kind == "bare":
        with pytest.raises(CheckpointError, match="neither a torch.save zip archive nor a legacy"):
            read_checkpoint(path)
    else:
        loaded = read_checkpoint(path)
        assert loaded["epoch"] == 3 and all(torch.equal(loaded["state_dict"][k], v) for k, v in weights.items())
        assert isinstance(loaded["evil"], OpaqueObject)
    assert_no_marker(markers)


# --- 1. pickles: every kind through every loader ----------------------------------------------------------------


def _tiny_put():
    from fdm.adapters.put import PUT, PVQVAE, UQTransformer

    codec = PVQVAE(encoder_channels=16, encoder_out_channels=16, encoder_blocks=2, encoder_block_channels=8,
                   num_codes=32, embed_dim=8, known_codes=16, decoder_in_channels=8, decoder_channels=16,
                   decoder_blocks=2, decoder_block_channels=8, base_channels=4)
    return PUT(codec, UQTransformer(embed_dim=8, n_embd=16, n_layer=1, n_head=2, num_codes=16, seq_len=16)).eval()


@pytest.fixture(scope="module")
def tiny_put():
    return _tiny_put()


@pytest.fixture(scope="module")
def tiny_vqgan():
    pytest.importorskip("taming")
    from taming_tiny import random_model, vqgan_config

    return random_model(vqgan_config())


def _official_fdm_sd() -> dict[str, torch.Tensor]:
    from fdm.io.official import fdm_to_official_state_dict

    module = fdm.FDM(channels=8)
    torch.nn.init.normal_(module.head.weight)
    return fdm_to_official_state_dict(module.state_dict())


def _load_read_checkpoint(path, tmp_path, request):
    return read_checkpoint(path)


def _load_official_fdm(path, tmp_path, request):
    return fdm.FDM.from_official_checkpoint(path)


def _load_taming(path, tmp_path, request):
    from fdm.adapters.taming import load_model
    from taming_tiny import vqgan_config

    return load_model(vqgan_config(), path)


def _load_put_codec(path, tmp_path, request):
    from fdm.adapters.put import load_model

    return load_model(path, n_head=2)


def _load_put_transformer(path, tmp_path, request):
    from fdm.adapters.put import load_model, put_state_dicts

    codec_sd, _ = put_state_dicts(request.getfixturevalue("tiny_put"))
    torch.save({"model": codec_sd}, tmp_path / "p_vqvae.pth")
    return load_model(tmp_path / "p_vqvae.pth", transformer=path, n_head=2)


def _load_split_checkpoint(path, tmp_path, request):
    from fdm.adapters.put import split_checkpoint

    return split_checkpoint(path)


def _load_vgg19(path, tmp_path, request):
    from fdm.training.backbones import load_vgg19

    return load_vgg19(path, last_layer="relu1_1")


def _valid_content(loader: str, request) -> dict:
    """A checkpoint the loader accepts (the payload is added next to it)."""
    if loader in ("taming",):
        return {"epoch": 3, "state_dict": request.getfixturevalue("tiny_vqgan").state_dict()}
    if loader in ("put_codec", "put_transformer", "split_checkpoint"):
        from fdm.adapters.put import put_state_dicts

        codec_sd, transformer_sd = put_state_dicts(request.getfixturevalue("tiny_put"))
        return {"model": transformer_sd if loader == "put_transformer" else codec_sd}
    if loader == "official_fdm":
        return {"model": _official_fdm_sd()}
    if loader == "vgg19":  # torchvision layout; the layers after relu1_1 are not needed
        return {"features.0.weight": torch.randn(64, 3, 3, 3), "features.0.bias": torch.randn(64)}
    return {"state_dict": {"w": torch.randn(2, 2)}}


LOADERS = {
    "read_checkpoint": _load_read_checkpoint,
    "official_fdm": _load_official_fdm,
    "taming": _load_taming,
    "put_codec": _load_put_codec,
    "put_transformer": _load_put_transformer,
    "split_checkpoint": _load_split_checkpoint,
    "vgg19": _load_vgg19,
}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("kind", KINDS)
def test_loader_runs_no_payload(kind, loader, tmp_path, evil, markers, request):
    valid = _valid_content(loader, request)
    path = craft(kind, valid, all_payloads(evil), tmp_path / f"{loader}-{kind}.pth")
    if kind == "bare":
        with pytest.raises(CheckpointError, match="neither a torch.save zip archive nor a legacy"):
            LOADERS[loader](path, tmp_path, request)
    else:  # loads normally, payloads inert: every tensor of the file arrives in what the loader returns
        loaded = _tensors(LOADERS[loader](path, tmp_path, request))
        missing = [t.shape for t in _tensors(valid) if not any(torch.equal(t, u) for u in loaded)]
        assert not missing, missing
    assert_no_marker(markers)


def _tensors(obj: object) -> list[torch.Tensor]:
    """The tensors of a (nested) state dict or of a module's state dict."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for value in obj.values() for t in _tensors(value)] if isinstance(obj, dict) else []


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "fdm.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.mark.slow  # fresh interpreters
@pytest.mark.parametrize("kind", KINDS)
def test_cli_eval_and_inpaint_refuse_crafted_checkpoints(kind, tmp_path, evil, markers):
    """``fdm eval`` (taming) and ``fdm inpaint`` (PUT) exit with code 2 on crafted files, running nothing."""
    pytest.importorskip("taming")
    from taming_tiny import vqgan_config, write_config

    # no usable weights next to the payloads: the commands stop at the checkpoint, with code 2
    ckpt = craft(kind, {"state_dict": {"junk": torch.zeros(1)}}, all_payloads(evil), tmp_path / "evil.ckpt")
    config = write_config(vqgan_config(), tmp_path / "model.yaml")
    fdm.FDM(channels=8, hidden_channels=8, num_blocks=1).save_pretrained(tmp_path / "fdm")
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (90, 120, 150)).save(tmp_path / "images" / "photo.png")
    result = _cli("eval", str(tmp_path / "images"), "--model", "taming", "--config", str(config), "--checkpoint",
                  str(ckpt), "--fdm", str(tmp_path / "fdm"), "--device", "cpu", "--no-extras", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "evil.ckpt" in result.stderr and "Traceback" not in result.stderr
    Image.new("L", (32, 32), 0).save(tmp_path / "mask.png")
    result = _cli("inpaint", "--checkpoint", str(ckpt), "--image", str(tmp_path / "images" / "photo.png"),
                  "--mask", str(tmp_path / "mask.png"), "--out",
                  str(tmp_path / "out"), "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert ("evil.ckpt" in result.stderr or "'junk'" in result.stderr) and "Traceback" not in result.stderr
    assert_no_marker(markers)
    assert sorted(p.name for p in tmp_path.glob("*.patch")) == []


HUB_CLIENT = """
import json, sys
from fdm.adapters.put import load_model as load_put
from fdm.adapters.taming import load_model as load_taming
from fdm.errors import CheckpointError
from taming_tiny import vqgan_config

outcomes = {}
for name, load in [("taming", lambda: load_taming(vqgan_config(), "hf://tester/evil/last.ckpt")),
                   ("put", lambda: load_put("hf://tester/evil/p_vqvae.pth", n_head=2))]:
    try:
        load()
        outcomes[name] = "loaded"
    except CheckpointError as err:
        outcomes[name] = "refused: " + str(err)
print(json.dumps(outcomes))
"""


@pytest.mark.slow  # a fresh interpreter (huggingface_hub reads HF_ENDPOINT when it is imported)
@pytest.mark.parametrize("kind", KINDS)
def test_hub_download_runs_no_payload(kind, tmp_path, evil, markers, local_hub, tiny_vqgan, tiny_put):
    """Crafted files served by a Hub (tests/hub_server.py) go through the same reader."""
    from hub_server import Blob, Repo

    from fdm.adapters.put import put_state_dicts

    codec_sd, _ = put_state_dicts(tiny_put)
    ckpt = craft(kind, {"state_dict": tiny_vqgan.state_dict()}, all_payloads(evil), tmp_path / "last.ckpt")
    codec = craft(kind, {"model": codec_sd}, all_payloads(evil), tmp_path / "p_vqvae.pth")
    repo = Repo(private=False)
    repo.add_commit("main", {"last.ckpt": Blob(ckpt.read_bytes(), lfs=True),
                             "p_vqvae.pth": Blob(codec.read_bytes(), lfs=True)}, "crafted files")
    local_hub.repos["tester/evil"] = repo
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGINGFACE_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HF_ENDPOINT=local_hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(HUB_CLIENT)], env=env, capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert any(path.endswith("/resolve/main/last.ckpt") for _, path in local_hub.requests)
    if kind == "bare":
        assert all(o.startswith("refused: ") and "neither a torch.save" in o for o in outcomes.values()), outcomes
    else:
        assert outcomes == {"taming": "loaded", "put": "loaded"}
    assert_no_marker(markers)


# --- 1. pickles: constructs that could smuggle calls or mutate allowed objects ----------------------------------


def _zip_with_data_pkl(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for name, data in (records or {}).items():
            archive.writestr(f"archive/{name}", data)
    return path


def _storage_pid(storage_type: bytes, key: str = "0", numel: int = 2) -> bytes:
    return _tuple(_str("storage"), storage_type, _str(key), _str("cpu"), pickle.BININT + struct.pack("<i", numel))


def _tensor(pid: bytes, hooks: bytes = b"") -> bytes:
    """``_rebuild_tensor_v2(storage, 0, (2,), (1,), False, hooks)`` with the storage from persistent id ``pid``."""
    hooks = hooks or _call(_global("collections", "OrderedDict"))
    return _call(_global("torch._utils", "_rebuild_tensor_v2"), pid + pickle.BINPERSID, pickle.BININT1 + b"\x00",
                 _tuple(pickle.BININT1 + b"\x02"), _tuple(pickle.BININT1 + b"\x01"), pickle.NEWFALSE, hooks)


FLOATS = {"data/0": struct.pack("<2f", 1.5, -2.0)}

REFUSED_CONSTRUCTS = {
    # BUILD on an allowed function (torch's legacy reader would then write a .patch file for it)
    "BUILD sets attributes of an allowed function": (
        _global("torch._utils", "_rebuild_tensor") + _dict(dump_patches=pickle.NEWTRUE) + pickle.BUILD, "state"),
    "BUILD slot state on an allowed class": (
        _global("torch.storage", "TypedStorage")
        + _tuple(pickle.NONE, _dict(__reduce__=_global("os", "system"))) + pickle.BUILD, "state"),
    "BUILD on a placeholder class": (_global("os", "system") + _dict(x=pickle.NONE) + pickle.BUILD, "state"),
    "SETITEM on an allowed class": (
        _global("collections", "OrderedDict") + _str("fromkeys") + _global("os", "system") + pickle.SETITEM, "fill"),
    "APPEND on a tensor rebuild function": (
        _global("torch._utils", "_rebuild_tensor") + _str("x") + pickle.APPEND, "fill"),
    "calling a storage class": (_call(_global("torch", "FloatStorage"), pickle.BININT + struct.pack("<i", 10)),
                                "not an allowed callable"),
    "NEWOBJ on a function": (_global("torch._utils", "_rebuild_tensor") + pickle.EMPTY_TUPLE + pickle.NEWOBJ,
                             "not a class"),
    "copyreg extension code": (pickle.EXT1 + b"\x01", "extension"),
    "_codecs.encode to another codec": (
        _call(_global("_codecs", "encode"), _str("x"), _str("rot13")), "latin1"),
    "persistent id with a placeholder storage type": (_storage_pid(_global("os", "system")) + pickle.BINPERSID,
                                                      "storage of type"),
    "persistent id naming no record": (_storage_pid(_global("torch", "FloatStorage"), key="../../etc/passwd")
                                       + pickle.BINPERSID, "names no storage record"),
    "persistent id of another kind": (_tuple(_str("module"), _global("os", "system"), _str("a"), _str("b"))
                                      + pickle.BINPERSID, "persistent id"),
    "tensor with backward hooks": (
        _tensor(_storage_pid(_global("torch", "FloatStorage")),
                hooks=_dict(h=_call(_global("os", "system"), _str("true")))), "backward hooks"),
    "tensor from a forged storage": (
        _call(_global("torch._utils", "_rebuild_tensor"), _call(_global("os", "system"), _str("x")),
              pickle.BININT1 + b"\x00", _tuple(), _tuple()), "rebuilt from a storage of the file"),
    "Parameter state setting __class__": (
        _call(_global("torch._utils", "_rebuild_parameter_with_state"),
              _tensor(_storage_pid(_global("torch", "FloatStorage"))), pickle.NEWFALSE,
              _call(_global("collections", "OrderedDict")), _dict(__class__=_global("os", "system"))),
        "plain attributes"),
    "Parameter state replacing a tensor method": (
        _call(_global("torch._utils", "_rebuild_parameter_with_state"),
              _tensor(_storage_pid(_global("torch", "FloatStorage"))), pickle.NEWFALSE,
              _call(_global("collections", "OrderedDict")), _dict(is_floating_point=_global("builtins", "eval"))),
        "not replace a tensor method"),
}


@pytest.mark.parametrize("construct", list(REFUSED_CONSTRUCTS))
def test_constructs_that_call_or_mutate_are_refused(construct, tmp_path):
    expression, message = REFUSED_CONSTRUCTS[construct]
    functions_before = dict(vars(torch._utils._rebuild_tensor))
    typed_storage_before = dict(vars(torch.storage.TypedStorage))
    path = _zip_with_data_pkl(tmp_path / "crafted.pt", _pickle(_dict(evil=expression)), FLOATS)
    with pytest.raises(CheckpointError, match=f"Refused to read .*{message}"):
        read_checkpoint(path)
    assert dict(vars(torch._utils._rebuild_tensor)) == functions_before
    assert dict(vars(torch.storage.TypedStorage)) == typed_storage_before


def test_hand_written_archive_reads_like_torch_save(tmp_path):
    """The crafting helpers make a valid file when nothing hostile is in it (so the refusals above are real)."""
    path = _zip_with_data_pkl(tmp_path / "ok.pt", _pickle(_dict(t=_tensor(_storage_pid(_global("torch",
                                                                                               "FloatStorage"))))), FLOATS)
    assert torch.equal(read_checkpoint(path)["t"], torch.tensor([1.5, -2.0]))
    assert torch.equal(torch.load(path)["t"], torch.tensor([1.5, -2.0]))


def _declare_size(path: Path, record: str, size: int) -> None:
    """Rewrite the uncompressed size that ``record``'s local header and central directory entry declare."""
    data = bytearray(path.read_bytes())
    name = record.encode()
    local = next(i for i in range(len(data)) if data.startswith(b"PK\x03\x04", i) and data[i + 30:i + 30 + len(name)]
                 == name)
    central = next(i for i in range(len(data)) if data.startswith(b"PK\x01\x02", i)
                   and data[i + 46:i + 46 + len(name)] == name)
    struct.pack_into("<I", data, local + 22, size)
    struct.pack_into("<I", data, central + 24, size)
    path.write_bytes(bytes(data))


TENSOR_PICKLE = _pickle(_dict(t=_tensor(_storage_pid(_global("torch", "FloatStorage")))))


def test_a_pickle_nested_100000_deep_is_a_clear_error(tmp_path):
    deep = pickle.EMPTY_LIST * 100_000 + pickle.APPEND * 99_999  # [[[...]]], 100 000 lists deep
    path = _zip_with_data_pkl(tmp_path / "deep.pt", _pickle(deep))
    with pytest.raises(CheckpointError, match=r"holds a list \(\[\[\[.*\), not the dict of a checkpoint"):
        read_checkpoint(path)


def test_a_legacy_file_declaring_more_storage_than_it_holds_is_refused_before_allocating(tmp_path):
    """A file of a few hundred bytes declaring a 4 GB storage: refused from its size, before anything is allocated."""
    pid = _tuple(_str("storage"), _global("torch", "FloatStorage"), _str("0"), _str("cpu"),
                 pickle.BININT + struct.pack("<i", 10**9), pickle.NONE)
    header = b"".join(pickle.dumps(obj, protocol=2) for obj in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}))
    path = tmp_path / "legacy.pt"
    path.write_bytes(header + _pickle(_dict(t=_tensor(pid))) + pickle.dumps(["0"], protocol=2)
                     + struct.pack("<q", 10**9))
    with pytest.raises(CheckpointError, match=r"storages declare 4000000000 bytes, more than the \d+ bytes the file has left"):
        read_checkpoint(path)


def test_archive_records_named_twice_are_refused(tmp_path):
    path = _zip_with_data_pkl(tmp_path / "twice.pt", _pickle(_dict(a=pickle.NONE)), FLOATS)
    with warnings.catch_warnings(), zipfile.ZipFile(path, "a") as archive:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it writes
        archive.writestr("archive/data.pkl", TENSOR_PICKLE)
    with pytest.raises(CheckpointError, match=r"records named twice in the archive: \['archive/data.pkl'\]"):
        read_checkpoint(path)


def test_a_storage_record_shorter_than_it_declares_is_refused(tmp_path):
    path = tmp_path / "short.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", TENSOR_PICKLE)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", struct.pack("<f", 1.5), compress_type=zipfile.ZIP_DEFLATED)  # 4 bytes of 8
    _declare_size(path, "archive/data/0", 8)
    with pytest.raises(CheckpointError, match="data/0 is truncated: 4 of its 8 bytes"):
        read_checkpoint(path)


def test_a_compressed_storage_that_inflates_a_hundredfold_is_refused(tmp_path):
    numel = 1 << 20
    pickled = _pickle(_dict(t=_tensor(_storage_pid(_global("torch", "FloatStorage"), numel=numel))))
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/data/0", bytes(4 * numel), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match=r"inflates \d+ bytes to 4194304 \(more than 100-fold"):
        read_checkpoint(path)


def test_placeholders_record_calls_and_run_nothing(tmp_path, evil, markers):
    """REDUCE on a placeholder, a placeholder called with a placeholder, getattr chains: all inert records."""
    path = craft("zip", {"state_dict": {}}, all_payloads(evil), tmp_path / "evil.pt")
    placeholders = read_checkpoint(path)["evil"]
    assert len(placeholders) == len(evil) and all(isinstance(p, OpaqueObject) for p in placeholders)
    os_system = placeholders[0]  # os.system(...): an instance of the placeholder class os.system
    assert os_system.qualified_name == "os.system" and os_system.args == (f"touch {markers / 'os.system'}",)
    assert os_system("touch x").qualified_name == "os.system(...)"  # calling it records again
    assert_no_marker(markers)


def test_legacy_module_persistent_id_compares_no_source(tmp_path, monkeypatch):
    """A legacy file's ('module', class, file, source) id: torch checks the source and may write a .patch file
    into the working directory; fdm-vq keeps the (placeholder) class and compares nothing."""
    monkeypatch.chdir(tmp_path)
    weights = {"w": torch.randn(2)}
    path = tmp_path / "legacy.pt"
    torch.save(weights, path, _use_new_zipfile_serialization=False)
    (magic, protocol, sys_info, data, keys), tail = _split_pickles(path.read_bytes(), 5)
    module_pid = _tuple(_str("module"), _global("torch._utils", "_rebuild_tensor"), _str("x.py"), _str("changed"))
    path.write_bytes(magic + protocol + sys_info + _add_entry(data, "net", module_pid + pickle.BINPERSID)
                     + keys + tail)
    with pytest.raises(CheckpointError, match="Refused.*persistent id"):  # an allowed function is not a module class
        read_checkpoint(path)
    module_pid = _tuple(_str("module"), _global("mynet", "Net"), _str("x.py"), _str("changed"))
    path.write_bytes(magic + protocol + sys_info + _add_entry(data, "net", module_pid + pickle.BINPERSID)
                     + keys + tail)
    loaded = read_checkpoint(path)
    assert torch.equal(loaded["w"], weights["w"]) and issubclass(loaded["net"], OpaqueObject)
    assert list(tmp_path.glob("*.patch")) == []


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_is_refused(tmp_path):
    """torch.jit.load runs TorchScript code (``__setstate__`` methods) while loading; fdm-vq never loads one."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointError, match="TorchScript"):
        read_checkpoint(path)


@pytest.mark.parametrize("zipped", [True, False])
def test_checkpoint_contents_survive_the_restricted_reader(tmp_path, zipped):
    """What torch.save writes in checkpoints reads back: dtypes, views, Parameters, OrderedDict metadata, bytes,
    sets, torch.Size / device / dtype; unknown classes become placeholders that keep their state."""
    state = collections.OrderedDict(w=torch.randn(3, 4), i=torch.arange(5), b=torch.tensor([True, False]),
                                    c=torch.randn(2, dtype=torch.complex64), h=torch.randn(3).half(),
                                    bf=torch.randn(3).bfloat16(), e=torch.empty(0))
    state._metadata = {"": {"version": 1}}
    tagged = torch.nn.Parameter(torch.randn(2))
    tagged.tag = "kept"  # pickled with _rebuild_parameter_with_state
    obj = {"state_dict": state, "row": state["w"][1], "p": torch.nn.Parameter(torch.randn(2)), "raw": b"\x00\xff",
           "tagged": tagged,
           "set": {1, 2}, "frozen": frozenset([3]), "size": torch.Size([2, 3]), "device": torch.device("cpu"),
           "dtype": torch.float16, "args": argparse.Namespace(lr=0.1), "plain": (1, 2.5, "s", None, [True])}
    path = tmp_path / "full.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    loaded = read_checkpoint(path)
    assert all(torch.equal(loaded["state_dict"][k], v) and loaded["state_dict"][k].dtype == v.dtype
               for k, v in state.items())
    assert loaded["state_dict"]._metadata == state._metadata
    assert torch.equal(loaded["row"], obj["row"])
    assert loaded["row"].untyped_storage().data_ptr() == loaded["state_dict"]["w"].untyped_storage().data_ptr()
    assert isinstance(loaded["p"], torch.nn.Parameter) and torch.equal(loaded["p"], obj["p"])
    assert torch.equal(loaded["tagged"], tagged) and loaded["tagged"].tag == "kept"
    for key in ("raw", "set", "frozen", "size", "device", "dtype", "plain"):
        assert loaded[key] == obj[key]
    assert isinstance(loaded["args"], OpaqueObject) and loaded["args"].state == {"lr": 0.1}


def test_big_endian_archive_is_byte_swapped(tmp_path):
    values = {"f": torch.randn(5), "c": torch.randn(3, dtype=torch.complex64), "s": torch.arange(4).short()}
    path = tmp_path / "le.pt"
    torch.save(values, path)
    swapped = tmp_path / "be.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(swapped, "w", zipfile.ZIP_STORED) as dst:
        prefix = next(n for n in src.namelist() if n.endswith("/data.pkl"))[: -len("data.pkl")]
        widths = {}
        for name in ("f", "c", "s"):  # torch.save writes storages in the order it meets them
            widths[str(len(widths))] = values[name].dtype.itemsize // (2 if values[name].is_complex() else 1)
        for name in src.namelist():
            data = src.read(name)
            if name == prefix + "byteorder":
                data = b"big"
            elif name.startswith(prefix + "data/"):
                width = widths[name.rsplit("/", 1)[1]]
                data = b"".join(data[i:i + width][::-1] for i in range(0, len(data), width))
            dst.writestr(name, data)
    loaded = read_checkpoint(swapped)
    assert all(torch.equal(loaded[k], v) for k, v in values.items())


def test_non_dict_checkpoint_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        read_checkpoint(path)


# --- 2. taming configs ------------------------------------------------------------------------------------------


def _set(config: dict, path: str, value) -> dict:
    """Set ``config[...]`` at a dotted path (``model.params.x[1].target``), creating dicts / lists on the way."""
    keys = [int(p) if p.isdigit() else p for p in path.replace("[", ".").replace("]", "").split(".")]
    node = config
    for key, following in zip(keys, keys[1:]):
        if isinstance(node, list):
            while len(node) <= key:
                node.append({})
            node = node[key]
        else:
            node = node.setdefault(key, [] if isinstance(following, int) else {})
    node[keys[-1]] = value
    return config


@pytest.fixture
def probe_module(tmp_path, monkeypatch) -> Path:
    """An importable module that creates a marker when it is imported (to show a target is refused unimported)."""
    marker = tmp_path / "imported"
    (tmp_path / "fdm_probe_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("fdm_probe_module", None)


def _taming_configs():
    pytest.importorskip("taming")
    import taming_tiny

    return taming_tiny


REFUSED_TARGETS = [
    ("vqgan", "model.target", "os.system"),
    ("vqgan", "model.params.lossconfig.target", "builtins.eval"),
    ("gumbel", "model.params.temperature_scheduler_config.target", "subprocess.run"),
    ("unconditional", "model.params.first_stage_config.target", "os.system"),
    ("unconditional", "model.params.first_stage_config.params.lossconfig.target", "fdm_probe_module.Thing"),
    ("unconditional", "model.params.transformer_config.target", "fdm_probe_module.Thing"),
    ("unconditional", "model.params.permuter_config.target", "subprocess.Popen"),
    ("class", "model.params.cond_stage_config.target", "made.up.Module"),
    ("semantic", "model.params.cond_stage_config.params.ddconfig.extra.target", "posix.system"),
    ("vqgan", "model.params.ddconfig.blocks[1].target", "fdm_probe_module.Thing"),
]


@pytest.mark.parametrize(("layout", "path", "target"), REFUSED_TARGETS)
def test_config_targets_are_checked_at_every_depth(layout, path, target, tmp_path, markers, probe_module):
    tiny = _taming_configs()
    from fdm.adapters.taming import build_model, load_model

    config = getattr(tiny, f"{layout}_config")()
    _set(config, path, target)
    _set(config, path.rsplit(".", 1)[0] + ".params",
         {"command": f"touch {markers / 'x'}"} if "system" in target else {"args": ["touch", str(markers / "x")]})
    ckpt = tmp_path / "unused.ckpt"
    yaml_file = tiny.write_config(config, tmp_path / "model.yaml")
    for load in (lambda: load_model(config, ckpt), lambda: load_model(yaml_file, ckpt), lambda: build_model(config)):
        with pytest.raises(ConfigError) as err:
            load()
        assert f"{path} = {target!r}" in str(err.value) and "trust_config=True" in str(err.value)
    assert not probe_module.exists() and "fdm_probe_module" not in sys.modules  # refused before any import
    assert_no_marker(markers)


def test_instantiate_from_config_checks_targets_too(markers):
    """taming's models call instantiate_from_config for nested configs: it refuses unless trusted."""
    from fdm.adapters.taming.compat import instantiate_from_config, trusted_targets

    with pytest.raises(ConfigError, match="target = 'os.system'"):
        instantiate_from_config({"target": "os.system", "params": {"command": f"touch {markers / 'x'}"}})
    assert_no_marker(markers)
    with trusted_targets():
        assert isinstance(instantiate_from_config({"target": "collections.OrderedDict"}), collections.OrderedDict)


def test_yaml_python_tags_are_refused(tmp_path, markers):
    _taming_configs()
    from fdm.adapters.taming import load_model

    config = tmp_path / "model.yaml"
    config.write_text(f"model: !!python/object/apply:os.system ['touch {markers / 'x'}']\n")
    with pytest.raises(ConfigError, match="python/object/apply:os.system"):
        load_model(config, tmp_path / "unused.ckpt")
    assert_no_marker(markers)


CUSTOM_MODEL = '''
from taming.models.vqgan import VQModel


class CustomVQModel(VQModel):
    """A harmless custom class: what trust_config=True is for."""
'''


def test_trust_config_allows_custom_targets(tmp_path, monkeypatch, tiny_vqgan):
    tiny = _taming_configs()
    from fdm.adapters.taming import load_model
    from fdm.commands.model_options import add_model_arguments, load_base_model

    (tmp_path / "fdm_custom_taming.py").write_text(CUSTOM_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fdm_custom_taming", raising=False)
    config = _set(tiny.vqgan_config(), "model.target", "fdm_custom_taming.CustomVQModel")
    ckpt = tiny.save_lightning_ckpt(tiny_vqgan.state_dict(), tmp_path / "last.ckpt")
    with pytest.raises(ConfigError, match="model.target = 'fdm_custom_taming.CustomVQModel'"):
        load_model(config, ckpt)
    assert "fdm_custom_taming" not in sys.modules
    model = load_model(config, ckpt, trust_config=True)
    assert type(model).__name__ == "CustomVQModel"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_vqgan.state_dict().items())

    # the command line: --trust-config
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    yaml_file = tiny.write_config(config, tmp_path / "model.yaml")
    argv = ["--model", "taming", "--config", str(yaml_file), "--checkpoint", str(ckpt), "--device", "cpu"]
    with pytest.raises(ConfigError, match="--trust-config"):
        load_base_model(parser.parse_args(argv))
    assert type(load_base_model(parser.parse_args([*argv, "--trust-config"]))).__name__ == "CustomVQModel"


def test_released_config_layouts_pass_the_allowlist(tmp_path):
    """The released layouts (tiny versions), a full *-project.yaml with data / lightning sections (dropped
    unread), and the demo model's own config (lossconfig torch.nn.Identity) build without trust_config."""
    tiny = _taming_configs()
    from fdm.adapters.taming import build_model
    from fdm.adapters.taming.compat import check_targets

    expected = {"vqgan": "VQModel", "gumbel": "GumbelVQ", "unconditional": "Net2NetTransformer",
                "class": "Net2NetTransformer", "semantic": "Net2NetTransformer"}
    for layout, class_name in expected.items():
        config = getattr(tiny, f"{layout}_config")()
        check_targets(config["model"])
        assert type(build_model(config, device="meta")).__name__ == class_name
    project = tiny.vqgan_config()
    project["data"] = {"target": "main.DataModuleFromConfig",
                       "params": {"train": {"target": "taming.data.custom.CustomTrain", "params": {"size": 32}}}}
    project["lightning"] = {"callbacks": {"image_logger": {"target": "main.ImageLogger"}}}
    assert type(build_model(tiny.write_config(project, tmp_path / "project.yaml"), device="meta")).__name__ == "VQModel"
    demo_config = Path(fdm.__file__).parent / "demo" / "assets" / "vqgan.yaml"
    check_targets(yaml.safe_load(demo_config.read_text())["model"])
