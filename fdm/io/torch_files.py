"""Reading ``torch.save`` files (zip archives and the legacy format, Lightning ``.ckpt`` included) without running
their code: every pickle inside goes through :mod:`fdm.io.unpickler`; storages are bounded by the file's size.
"""

from __future__ import annotations

import io
import reprlib
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from fdm.errors import CheckpointError
from fdm.io.unpickler import STORAGE_DTYPES, OpaqueObject, Refused, unpickle
from fdm.io.weights import read_safetensors
from fdm.limits import Limits
from fdm.limits import current as current_limits

__all__ = ["read_checkpoint"]

class NotACheckpoint(ValueError):
    """The file is neither a ``torch.save`` zip archive nor a legacy ``torch.save`` file."""


_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


def _text(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _storage_dtype(storage_type: Any) -> torch.dtype:
    dtype = STORAGE_DTYPES.get(storage_type) if isinstance(storage_type, type) else None
    if dtype is None:
        raise Refused(f"a tensor storage of type {storage_type!r}")
    return dtype


def _nonnegative_int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise Refused(f"{what} must be a non-negative int, got {value!r}")
    return value


def _typed_storage(data: torch.Tensor, dtype: torch.dtype, byteorder: str) -> torch.storage.TypedStorage:
    """A storage of ``dtype`` over the uint8 tensor ``data`` (byte-swapped if written on the other endianness)."""
    width = dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize
    if byteorder != sys.byteorder and width > 1:  # swapped into a fixed-size buffer like the one read
        data = _bytes_tensor(data.numel()).copy_(data.view(-1, width).flip(-1).reshape(-1))
    return torch.storage.TypedStorage(wrap_storage=data.untyped_storage(), dtype=dtype, _internal=True)


def _bytes_tensor(size: int) -> torch.Tensor:
    """A zeroed uint8 tensor whose storage cannot be resized (``set_`` beyond it fails instead of growing it)."""
    return torch.frombuffer(bytearray(size), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)


class _Inflation:
    """Bytes an archive's records inflate to, checked against the limits before each record is read."""

    def __init__(self, limits: Limits):
        self.limits, self.total = limits, 0

    def admit(self, info: zipfile.ZipInfo, largest: int) -> None:
        limits = self.limits
        if info.file_size > largest:
            raise ValueError(f"record {info.filename} holds {info.file_size} bytes, more than the {largest} allowed "
                             "(fdm.limits)")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > limits.max_compression_ratio * max(
                info.compress_size, 1):
            raise ValueError(f"record {info.filename} inflates {info.compress_size} bytes to {info.file_size} (more "
                             f"than {limits.max_compression_ratio}-fold, fdm.limits; torch.save stores storages "
                             "uncompressed)")
        self.total += info.file_size
        if self.total > limits.max_decompressed_bytes:
            raise ValueError(f"its records inflate to more than {limits.max_decompressed_bytes} bytes (fdm.limits)")


def _read_record(archive: zipfile.ZipFile, info: zipfile.ZipInfo, data: torch.Tensor) -> None:
    """Fill ``data`` (uint8, ``info.file_size`` long) with the record, refusing one shorter than it declares."""
    with archive.open(info) as record:
        view, done = memoryview(data.numpy()), 0
        while done < info.file_size and (chunk := record.read(min(1 << 24, info.file_size - done))):
            view[done: done + len(chunk)] = chunk
            done += len(chunk)
    if done != info.file_size:
        raise ValueError(f"record {info.filename} is truncated: {done} of its {info.file_size} bytes")


def _read_zip(handle: Any) -> Any:
    """A ``torch.save`` zip archive: ``<name>/data.pkl`` (restricted) and its storages ``<name>/data/<key>``."""
    limits = current_limits()
    inflation = _Inflation(limits)
    with zipfile.ZipFile(handle) as archive:
        listing = archive.namelist()
        names = set(listing)
        if len(names) != len(listing):
            twice = sorted({n for n in listing if listing.count(n) > 1})
            raise ValueError(f"records named twice in the archive: {twice} (which one would be read is ambiguous)")
        pickles = sorted(n for n in names if n.count("/") == 1 and n.endswith("/data.pkl"))
        if len(pickles) != 1:
            raise ValueError(f"a torch.save archive holds one <name>/data.pkl record; this one holds {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "constants.pkl" in names:
            raise Refused("this is a TorchScript archive (torch.jit.save), whose code runs when it is loaded")
        byteorder = "little"
        if prefix + "byteorder" in names:
            info = archive.getinfo(prefix + "byteorder")
            inflation.admit(info, len("little"))
            byteorder = archive.read(info).decode()
        if byteorder not in ("little", "big"):
            raise ValueError(f"unknown byte order {byteorder!r}")
        storages: dict[str, torch.storage.TypedStorage] = {}

        def persistent_load(pid: Any) -> torch.storage.TypedStorage:
            if type(pid) is not tuple or len(pid) != 5 or _text(pid[0]) != "storage":
                raise Refused(f"persistent id {pid!r} (a torch.save archive only has ('storage', ...) ids)")
            _, storage_type, key, location, numel = pid
            dtype, key = _storage_dtype(storage_type), _text(key)
            numel = _nonnegative_int(numel, "a storage's size")
            if type(key) is not str or type(_text(location)) is not str or f"{prefix}data/{key}" not in names:
                raise Refused(f"persistent id {pid!r} names no storage record of the archive")
            if key not in storages:
                info = archive.getinfo(f"{prefix}data/{key}")
                if info.file_size != numel * dtype.itemsize:
                    raise ValueError(f"storage {key} holds {info.file_size} bytes, not {numel} x {dtype}")
                inflation.admit(info, limits.max_tensor_bytes)
                data = _bytes_tensor(info.file_size)
                _read_record(archive, info, data)
                storages[key] = _typed_storage(data, dtype, byteorder)
            elif storages[key].dtype != dtype:
                raise Refused(f"storage {key} is named with two dtypes")
            return storages[key]

        info = archive.getinfo(pickles[0])
        inflation.admit(info, limits.max_tensor_bytes)
        data_pkl = _bytes_tensor(info.file_size)
        _read_record(archive, info, data_pkl)
        return unpickle(data_pkl.numpy().tobytes(), persistent_load)


def _read_legacy(handle: Any) -> Any:
    """A legacy (``_use_new_zipfile_serialization=False``) file: five pickles, all restricted, then raw storages."""
    try:
        magic = unpickle(handle)
    except Refused:
        raise
    except Exception as err:
        raise NotACheckpoint("it is neither a torch.save zip archive nor a legacy torch.save file "
                              f"(its first bytes are not a pickle: {err!r})") from err
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise NotACheckpoint("it is neither a torch.save zip archive nor a legacy torch.save file "
                              f"(its first pickle holds {type(magic).__name__}, not torch's magic number)")
    protocol = unpickle(handle)
    if type(protocol) is not int or protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"unknown legacy torch.save protocol {protocol!r}")
    sys_info = unpickle(handle)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise ValueError("only little-endian legacy torch.save files are read")
    limits = current_limits()
    roots: dict[str, tuple[torch.Tensor, torch.dtype, int]] = {}
    views: dict[str, torch.storage.TypedStorage] = {}
    here = handle.tell()
    room = handle.seek(0, io.SEEK_END) - here  # the storages' bytes follow: none may declare more than is left
    handle.seek(here)

    def persistent_load(pid: Any) -> Any:
        kind = _text(pid[0]) if type(pid) is tuple and pid else None
        if kind == "module" and len(pid) == 4 and isinstance(pid[1], type) and issubclass(pid[1], OpaqueObject):
            return pid[1]  # a pickled nn.Module class: its source is not compared (torch may write a patch file)
        if kind != "storage" or len(pid) != 6:
            raise Refused(f"persistent id {pid!r} (a legacy torch.save file has ('storage', ...) ids)")
        _, storage_type, key, location, numel, view = pid
        dtype, key = _storage_dtype(storage_type), _text(key)
        numel = _nonnegative_int(numel, "a storage's size")
        if type(key) is not str or type(_text(location)) is not str:
            raise Refused(f"persistent id {pid!r}")
        if key not in roots:
            if numel * dtype.itemsize > limits.max_tensor_bytes:
                raise ValueError(f"storage {key} declares {numel * dtype.itemsize} bytes, more than the "
                                 f"{limits.max_tensor_bytes} allowed (fdm.limits)")
            declared = numel * dtype.itemsize + sum(d.numel() for d, _, _ in roots.values())
            if declared > room:
                raise ValueError(f"its storages declare {declared} bytes, more than the {room} bytes the file has "
                                 "left")
            roots[key] = (_bytes_tensor(numel * dtype.itemsize), dtype, numel)
        data, root_dtype, root_numel = roots[key]
        if root_dtype != dtype or root_numel != numel:
            raise Refused(f"storage {key} is named with two dtypes or sizes")
        if view is None:
            return torch.storage.TypedStorage(wrap_storage=data.untyped_storage(), dtype=dtype, _internal=True)
        if type(view) is not tuple or len(view) != 3:
            raise Refused(f"storage view {view!r}")
        view_key = _text(view[0])
        offset, size = _nonnegative_int(view[1], "a view's offset"), _nonnegative_int(view[2], "a view's size")
        if type(view_key) is not str or offset + size > numel:
            raise Refused(f"storage view {view!r} of a storage of {numel} elements")
        if view_key not in views:
            part = data.untyped_storage()[offset * dtype.itemsize: (offset + size) * dtype.itemsize]
            views[view_key] = torch.storage.TypedStorage(wrap_storage=part, dtype=dtype, _internal=True)
        return views[view_key]

    result = unpickle(handle, persistent_load)
    keys = unpickle(handle)
    if type(keys) is not list or sorted(map(_text, keys)) != sorted(roots):
        raise ValueError("the list of storages does not match the storages the data names")
    for key in map(_text, keys):
        data, dtype, numel = roots[key]
        header = handle.read(8)
        if len(header) != 8 or struct.unpack("<q", header)[0] != numel:
            raise ValueError(f"storage {key}: expected {numel} elements of {dtype}")
        if handle.readinto(memoryview(data.numpy())) != data.numel():
            raise ValueError(f"storage {key} is cut short")
    return result


def _check_depth(obj: Any, path: Path) -> None:
    """Refuse containers nested deeper than ``max_depth`` (walked without recursion), before a loader that walks
    them (moving tensors to a device, looking keys up) runs out of recursion."""
    limit, stack = current_limits().max_depth, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list, tuple, set, frozenset)):
            if depth > limit:
                raise CheckpointError(f"{path} nests containers deeper than {limit} levels (fdm.limits); a "
                                      "checkpoint is far shallower.")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _to_device(value, device)
        return obj
    if type(obj) in (list, tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def read_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a PyTorch checkpoint (``torch.save`` zip archive, legacy ``torch.save`` file, Lightning ``.ckpt``)
    or a ``.safetensors`` file, without executing anything the file holds.

    Every pickle of the file (a zip archive's ``data.pkl``; a legacy file's header pickles, data and storage list)
    goes through one restricted unpickler and its one allowlist (:data:`_ALLOWED_GLOBALS`): tensors, storages,
    dtypes, ``torch.Size`` / ``torch.device``, ``OrderedDict`` / ``set`` / ``frozenset`` and plain values are
    rebuilt; any other pickled class or function (``os.system``, a Lightning callback...) becomes an inert
    :class:`OpaqueObject` that records its arguments and runs nothing. Neither ``torch.load`` nor ``pickle.load``
    is used. Storages are read into CPU memory, then moved to ``map_location``.

    Raises:
        CheckpointError: the file is missing, truncated, not a PyTorch checkpoint, does not hold a dict, or was
            refused: a TorchScript archive, tensors with backward hooks, pickled instructions to set the state of
            or fill an object that is not a fresh container, copyreg extension codes, unknown persistent ids.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        with path.open("rb") as handle:
            is_zip = handle.read(4) == _ZIP_MAGIC
            handle.seek(0)
            obj = _read_zip(handle) if is_zip else _read_legacy(handle)
    except Refused as err:
        raise CheckpointError(f"Refused to read {path}: {err}. fdm-vq reads tensors and plain containers from "
                              "pickled checkpoints and never runs code from a file.") from err
    except NotACheckpoint as err:
        raise CheckpointError(f"Could not read {path} as a PyTorch checkpoint: {err}.") from err
    except Exception as err:  # zip errors, EOF, malformed pickles: a truncated or foreign file
        raise CheckpointError(f"Could not read {path} as a PyTorch checkpoint (truncated or corrupted?): {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__} ({reprlib.repr(obj)}), not the dict of a "
                              "checkpoint.")  # reprlib: bounded depth, also for a crafted 100 000-deep list
    _check_depth(obj, path)
    device = torch.device(map_location)
    return obj if device.type == "cpu" else _to_device(obj, device)
