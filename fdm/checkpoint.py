"""Safe reading of weight files: safetensors, and pickled PyTorch checkpoints (``torch.save`` zip archives, legacy
``torch.save`` files, Lightning ``.ckpt``) through one restricted unpickler with one allowlist of globals.

Nothing here executes code from a checkpoint: unknown pickled classes and functions become inert placeholders.
"""

from __future__ import annotations

import _compat_pickle
import collections
import hashlib
import io
import logging
import pickle
import reprlib
import struct
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fdm.errors import CheckpointError

__all__ = [
    "DIGEST_KEY",
    "check_finite_weights",
    "OpaqueObject",
    "load_state_dict_strict",
    "read_checkpoint",
    "file_sha256",
    "read_safetensors",
    "state_dict_digest",
    "write_weights",
]

logger = logging.getLogger(__name__)

#: safetensors metadata key holding :func:`state_dict_digest` of the tensors, checked on every load.
DIGEST_KEY = "fdm_vq.sha256"

class OpaqueObject:
    """Stands in for a pickled object of a class that is not allowed (a Lightning callback, say).

    It records the class name and the constructor arguments / state / items it was given, and does nothing
    else. Pickles also call, fill or extend the objects they rebuild (``getattr(cls, name)(...)`` for methods,
    SETITEMS for dict subclasses such as Lightning's AttributeDict): a placeholder records those too. Calling a
    placeholder (``os.system(...)``, ``builtins.getattr(...)``...) returns another placeholder; nothing runs.
    """

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:  # pickle's NEWOBJ calls __new__ without __init__
        obj = super().__new__(cls)
        obj.args, obj.kwargs = args, kwargs
        obj.mapping, obj.sequence = {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any):
        pass  # recorded by __new__

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> OpaqueObject:
        result = OpaqueObject(*args, **kwargs)
        result.qualified_name = f"{self.qualified_name}(...)"
        return result

    def __setitem__(self, key: Any, value: Any) -> None:
        self.mapping[key] = value

    def append(self, value: Any) -> None:
        self.sequence.append(value)

    def extend(self, values: Any) -> None:
        self.sequence.extend(values)

    def add(self, value: Any) -> None:
        self.sequence.append(value)

    def __repr__(self) -> str:
        return f"<opaque {self.qualified_name}>"


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something the restricted unpickler never does (call, mutate, import)."""


class _NotACheckpoint(ValueError):
    """The file is neither a ``torch.save`` zip archive nor a legacy ``torch.save`` file."""


def _is_placeholder(obj: Any) -> bool:
    return isinstance(obj, OpaqueObject) or (isinstance(obj, type) and issubclass(obj, OpaqueObject))


def _check_tensor_parts(storage: Any, backward_hooks: Any = None) -> None:
    if not isinstance(storage, torch.storage.TypedStorage):
        raise _Refused(f"a tensor must be rebuilt from a storage of the file, not from {type(storage).__name__}")
    if backward_hooks:  # torch.save never writes hooks (they are code); a file that has them is crafted
        raise _Refused("a pickled tensor carries backward hooks")


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any) -> torch.Tensor:
    _check_tensor_parts(storage)
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool,
                       backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    _check_tensor_parts(storage, backward_hooks)
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                           collections.OrderedDict(), metadata)


def _rebuild_tensor_v3(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> torch.Tensor:
    _check_tensor_parts(storage, backward_hooks)
    if not isinstance(dtype, torch.dtype):
        raise _Refused(f"a tensor's dtype must be a torch.dtype, not {type(dtype).__name__}")
    return torch._utils._rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                                           collections.OrderedDict(), dtype, metadata)


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any) -> nn.Parameter:
    if not isinstance(data, torch.Tensor) or backward_hooks:
        raise _Refused("a pickled Parameter must wrap a tensor of the file and carry no backward hooks")
    return torch._utils._rebuild_parameter(data, requires_grad, collections.OrderedDict())


def _rebuild_parameter_with_state(data: Any, requires_grad: bool, backward_hooks: Any, state: Any) -> nn.Parameter:
    parts = state if isinstance(state, tuple) else (state,)
    for part in parts:  # plain public attributes only: not ``__class__``, not ``_backward_hooks``...
        if part and not (isinstance(part, dict) and all(type(k) is str and not k.startswith("_") for k in part)):
            raise _Refused("a pickled Parameter's state may only set plain attributes")
    param = _rebuild_parameter(data, requires_grad, backward_hooks)
    return torch._utils._set_obj_state(param, state)


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``: a str to latin-1, nothing else."""
    if type(obj) is not str or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _Refused(f"_codecs.encode is allowed for str to latin1 only, got {type(obj).__name__}, {encoding!r}")
    return obj.encode("latin-1")


#: dtype of every storage class a checkpoint may name (``torch.save`` writes ``torch.FloatStorage``...).
_STORAGE_DTYPES: dict[type, torch.dtype] = {
    cls: dtype
    for name, dtype in [
        ("ByteStorage", torch.uint8), ("CharStorage", torch.int8), ("ShortStorage", torch.int16),
        ("IntStorage", torch.int32), ("LongStorage", torch.int64), ("HalfStorage", torch.float16),
        ("FloatStorage", torch.float32), ("DoubleStorage", torch.float64), ("BFloat16Storage", torch.bfloat16),
        ("BoolStorage", torch.bool), ("ComplexFloatStorage", torch.complex64),
        ("ComplexDoubleStorage", torch.complex128), ("UntypedStorage", torch.uint8),
    ]
    if isinstance(cls := getattr(torch, name, None), type)
}

#: Globals a pickle may call (each checks its arguments); nothing else is ever called while unpickling.
_CALLABLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_encode,
}

#: THE allowlist of pickled globals, the only one in fdm-vq: every pickle byte the library reads (zip archives,
#: legacy torch.save files including their header pickles, bare pickles, Hub downloads) is unpickled by
#: :class:`_RestrictedUnpickler`, which resolves a global through this table only (nothing is imported) and
#: turns any other global into an inert :class:`OpaqueObject` placeholder class. Storage classes and dtypes are
#: values: they may be named (in a tensor's persistent id, as a dtype argument) but never called.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_CALLABLE_GLOBALS,
    **{("torch", cls.__name__): cls for cls in _STORAGE_DTYPES},
    ("torch.storage", "UntypedStorage"): torch.storage.UntypedStorage,
    ("torch.storage", "TypedStorage"): torch.storage.TypedStorage,
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
}
_CALLABLE_IDS = frozenset(id(obj) for obj in _CALLABLE_GLOBALS.values())


def _allowed_call(func: Any, args: Any, kwargs: Any = None) -> Any:
    """``func(*args, **kwargs)`` if ``func`` is a placeholder (records, runs nothing) or an allowed callable."""
    if type(args) is not tuple or not (kwargs is None or (type(kwargs) is dict and all(type(k) is str for k in kwargs))):
        raise _Refused("malformed call arguments")
    if not (_is_placeholder(func) or id(func) in _CALLABLE_IDS):
        raise _Refused(f"a pickle asked to call {func!r}, which is not an allowed callable")
    return func(*args, **(kwargs or {}))


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: every opcode can be guarded
    """Unpickles with :data:`_ALLOWED_GLOBALS` only, and never calls, imports or mutates anything else.

    Calls (REDUCE, NEWOBJ, INST, OBJ) go to allowed callables or placeholders; BUILD only fills placeholders and
    fresh OrderedDicts; APPEND / SETITEM / ADDITEMS only fill fresh lists / dicts / sets or placeholders; copyreg
    extension codes are refused; persistent ids go to the ``persistent_load`` the file format gives (a bare
    pickle has none). A refused construct raises :class:`_Refused`.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(file, encoding="utf-8")
        self._persistent_load = persistent_load
        self._placeholders: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names (``__builtin__.set``...), mapped but not imported
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if (module, name) not in self._placeholders:
            logger.debug("checkpoint: replacing pickled %s.%s by a placeholder", module, name)
            self._placeholders[(module, name)] = type(str(name), (OpaqueObject,), {"qualified_name": f"{module}.{name}"})
        return self._placeholders[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise _Refused("a persistent id outside a torch.save file")
        return self._persistent_load(pid)

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = _allowed_call(self.stack[-1], args)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = _allowed_call(self._class(), args)

    def _load_newobj_ex(self) -> None:
        kwargs, args = self.stack.pop(), self.stack.pop()
        self.stack[-1] = _allowed_call(self._class(), args, kwargs)

    def _class(self) -> type:
        if not isinstance(self.stack[-1], type):
            raise _Refused(f"NEWOBJ of {self.stack[-1]!r}, which is not a class")
        return self.stack[-1]

    def _instantiate(self, klass: Any, args: list) -> None:  # INST and OBJ (protocols 0 and 1)
        self.append(_allowed_call(klass, tuple(args)))

    def _load_ext(self) -> None:
        raise _Refused("copyreg extension codes")

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, OpaqueObject):
            OpaqueObject.__setstate__(inst, state)
        elif (type(inst) is collections.OrderedDict and type(state) is dict
              and all(type(k) is str and not k.startswith("__") for k in state)):
            inst.__dict__.update(state)  # a state dict's ``_metadata``
        else:
            raise _Refused(f"a pickle asked to set the state of {type(inst).__name__}")

    def _load_append(self) -> None:
        value = self.stack.pop()
        self._target(list).append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        self._target(list).extend(items)

    def _load_setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        self._target(dict, collections.OrderedDict)[key] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise _Refused("SETITEMS with an odd number of items")
        target = self._target(dict, collections.OrderedDict)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def _load_additems(self) -> None:
        items = self.pop_mark()
        target = self._target(set)
        for item in items:
            target.add(item)

    def _target(self, *kinds: type) -> Any:
        """The object on top of the stack, if it is a fresh container of ``kinds`` or a placeholder."""
        target = self.stack[-1]
        if type(target) not in kinds and not isinstance(target, OpaqueObject):
            raise _Refused(f"a pickle asked to fill a {type(target).__name__}")
        return target

    for _opcode, _method in [
        (pickle.REDUCE, _load_reduce), (pickle.NEWOBJ, _load_newobj), (pickle.NEWOBJ_EX, _load_newobj_ex),
        (pickle.EXT1, _load_ext), (pickle.EXT2, _load_ext), (pickle.EXT4, _load_ext), (pickle.BUILD, _load_build),
        (pickle.APPEND, _load_append), (pickle.APPENDS, _load_appends), (pickle.SETITEM, _load_setitem),
        (pickle.SETITEMS, _load_setitems), (pickle.ADDITEMS, _load_additems),
    ]:
        dispatch[_opcode[0]] = _method
    del _opcode, _method


def _unpickle(source: Any, persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """One pickle from ``source`` (bytes, or a binary file left just after the pickle), restricted."""
    return _RestrictedUnpickler(io.BytesIO(source) if isinstance(source, bytes) else source, persistent_load).load()


_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


def _text(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _storage_dtype(storage_type: Any) -> torch.dtype:
    dtype = _STORAGE_DTYPES.get(storage_type) if isinstance(storage_type, type) else None
    if dtype is None:
        raise _Refused(f"a tensor storage of type {storage_type!r}")
    return dtype


def _nonnegative_int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise _Refused(f"{what} must be a non-negative int, got {value!r}")
    return value


def _typed_storage(data: torch.Tensor, dtype: torch.dtype, byteorder: str) -> torch.storage.TypedStorage:
    """A storage of ``dtype`` over the uint8 tensor ``data`` (byte-swapped if written on the other endianness)."""
    width = dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize
    if byteorder != sys.byteorder and width > 1:
        data = data.view(-1, width).flip(-1).reshape(-1)
    return torch.storage.TypedStorage(wrap_storage=data.untyped_storage(), dtype=dtype, _internal=True)


MAX_COMPRESSION = 100
"""Largest inflation ratio of a compressed storage record of a zip checkpoint (a zip bomb is refused)."""


def _bytes_tensor(size: int) -> torch.Tensor:
    """A zeroed uint8 tensor whose storage cannot be resized (``set_`` beyond it fails instead of growing it)."""
    return torch.frombuffer(bytearray(size), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)


def _read_zip(handle: Any) -> Any:
    """A ``torch.save`` zip archive: ``<name>/data.pkl`` (restricted) and its storages ``<name>/data/<key>``."""
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
            raise _Refused("this is a TorchScript archive (torch.jit.save), whose code runs when it is loaded")
        byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise ValueError(f"unknown byte order {byteorder!r}")
        storages: dict[str, torch.storage.TypedStorage] = {}

        def persistent_load(pid: Any) -> torch.storage.TypedStorage:
            if type(pid) is not tuple or len(pid) != 5 or _text(pid[0]) != "storage":
                raise _Refused(f"persistent id {pid!r} (a torch.save archive only has ('storage', ...) ids)")
            _, storage_type, key, location, numel = pid
            dtype, key = _storage_dtype(storage_type), _text(key)
            numel = _nonnegative_int(numel, "a storage's size")
            if type(key) is not str or type(_text(location)) is not str or f"{prefix}data/{key}" not in names:
                raise _Refused(f"persistent id {pid!r} names no storage record of the archive")
            if key not in storages:
                info = archive.getinfo(f"{prefix}data/{key}")
                if info.file_size != numel * dtype.itemsize:
                    raise ValueError(f"storage {key} holds {info.file_size} bytes, not {numel} x {dtype}")
                if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_COMPRESSION * info.compress_size:
                    raise ValueError(f"storage {key} inflates {info.compress_size} bytes to {info.file_size} (more than "
                                     f"{MAX_COMPRESSION}-fold; torch.save stores storages uncompressed)")
                data = _bytes_tensor(info.file_size)
                with archive.open(info) as record:
                    view, done = memoryview(data.numpy()), 0
                    while done < info.file_size and (chunk := record.read(min(1 << 24, info.file_size - done))):
                        view[done: done + len(chunk)] = chunk
                        done += len(chunk)
                if done != info.file_size:
                    raise ValueError(f"storage {key} is truncated: {done} of its {info.file_size} bytes")
                storages[key] = _typed_storage(data, dtype, byteorder)
            elif storages[key].dtype != dtype:
                raise _Refused(f"storage {key} is named with two dtypes")
            return storages[key]

        return _unpickle(archive.read(pickles[0]), persistent_load)


def _read_legacy(handle: Any) -> Any:
    """A legacy (``_use_new_zipfile_serialization=False``) file: five pickles, all restricted, then raw storages."""
    try:
        magic = _unpickle(handle)
    except _Refused:
        raise
    except Exception as err:
        raise _NotACheckpoint("it is neither a torch.save zip archive nor a legacy torch.save file "
                              f"(its first bytes are not a pickle: {err!r})") from err
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise _NotACheckpoint("it is neither a torch.save zip archive nor a legacy torch.save file "
                              f"(its first pickle holds {type(magic).__name__}, not torch's magic number)")
    protocol = _unpickle(handle)
    if type(protocol) is not int or protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"unknown legacy torch.save protocol {protocol!r}")
    sys_info = _unpickle(handle)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise ValueError("only little-endian legacy torch.save files are read")
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
            raise _Refused(f"persistent id {pid!r} (a legacy torch.save file has ('storage', ...) ids)")
        _, storage_type, key, location, numel, view = pid
        dtype, key = _storage_dtype(storage_type), _text(key)
        numel = _nonnegative_int(numel, "a storage's size")
        if type(key) is not str or type(_text(location)) is not str:
            raise _Refused(f"persistent id {pid!r}")
        if key not in roots:
            declared = numel * dtype.itemsize + sum(d.numel() for d, _, _ in roots.values())
            if declared > room:
                raise ValueError(f"its storages declare {declared} bytes, more than the {room} bytes the file has "
                                 "left")
            roots[key] = (_bytes_tensor(numel * dtype.itemsize), dtype, numel)
        data, root_dtype, root_numel = roots[key]
        if root_dtype != dtype or root_numel != numel:
            raise _Refused(f"storage {key} is named with two dtypes or sizes")
        if view is None:
            return torch.storage.TypedStorage(wrap_storage=data.untyped_storage(), dtype=dtype, _internal=True)
        if type(view) is not tuple or len(view) != 3:
            raise _Refused(f"storage view {view!r}")
        view_key = _text(view[0])
        offset, size = _nonnegative_int(view[1], "a view's offset"), _nonnegative_int(view[2], "a view's size")
        if type(view_key) is not str or offset + size > numel:
            raise _Refused(f"storage view {view!r} of a storage of {numel} elements")
        if view_key not in views:
            part = data.untyped_storage()[offset * dtype.itemsize: (offset + size) * dtype.itemsize]
            views[view_key] = torch.storage.TypedStorage(wrap_storage=part, dtype=dtype, _internal=True)
        return views[view_key]

    result = _unpickle(handle, persistent_load)
    keys = _unpickle(handle)
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
    except _Refused as err:
        raise CheckpointError(f"Refused to read {path}: {err}. fdm-vq reads tensors and plain containers from "
                              "pickled checkpoints and never runs code from a file.") from err
    except _NotACheckpoint as err:
        raise CheckpointError(f"Could not read {path} as a PyTorch checkpoint: {err}.") from err
    except Exception as err:  # zip errors, EOF, malformed pickles: a truncated or foreign file
        raise CheckpointError(f"Could not read {path} as a PyTorch checkpoint (truncated or corrupted?): {err}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__} ({reprlib.repr(obj)}), not the dict of a "
                              "checkpoint.")  # reprlib: bounded depth, also for a crafted 100 000-deep list
    device = torch.device(map_location)
    return obj if device.type == "cpu" else _to_device(obj, device)


def read_safetensors(path: str | Path, *, require_digest: bool = False,
                     require_finite: bool = False) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file into a CPU state dict, checking the digest :func:`write_weights` recorded.

    Args:
        path: the file.
        require_digest: refuse a file without a recorded digest (files fdm-vq wrote itself: training
            checkpoints, fine-tuned decoders). Third-party safetensors files carry none and are read as they are.
        require_finite: refuse NaN or Inf in a floating-point tensor (:func:`check_finite_weights`; weights that
            fdm-vq trains).

    Raises:
        CheckpointError: the file is missing, truncated or not safetensors; its tensors do not match the
            recorded digest (corrupted bytes); no digest where one is required; a tensor is not floating point
            where weights are expected (see :func:`load_state_dict_strict`).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(DIGEST_KEY)
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open API)
    except FileNotFoundError as err:
        raise CheckpointError(f"Weight file not found: {path}") from err
    except Exception as err:
        raise CheckpointError(f"Could not read {path} as safetensors (truncated or corrupted?): {err}. "
                              "Download or copy it again.") from err
    if recorded is None:
        if require_digest:
            raise CheckpointError(f"{path} carries no {DIGEST_KEY} digest, which every file fdm-vq writes has: it "
                                  "was altered or not written by fdm-vq. Download or copy it again.")
    elif recorded != (actual := state_dict_digest(state_dict)):
        raise CheckpointError(
            f"{path} is corrupted: its tensors hash to sha256 {actual}, but {recorded} was recorded when the "
            "file was written. Download or copy it again."
        )
    if require_finite:
        check_finite_weights(state_dict, what=f"the weights in {path}")
    return state_dict


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in key order: the one digest of weights in
    fdm-vq (recorded under :data:`DIGEST_KEY` in every file it writes, and the id of a base model's weights)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (integrity of the non-tensor files fdm-vq writes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_finite_weights(state_dict: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Refuse weights that hold NaN or Inf.

    Raises:
        CheckpointError: naming ``what`` and up to five of the tensors that hold NaN or Inf.
    """
    bad = sorted(k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(f"{what} hold NaN or Inf values ({', '.join(bad[:5])}{more}): weights like these are "
                              "neither saved nor loaded (a run that diverged: lower --lr, or start again).")


def write_weights(state_dict: dict[str, torch.Tensor], path: str | Path, *,
                  metadata: dict[str, str] | None = None) -> Path:
    """Write ``state_dict`` as safetensors with :func:`state_dict_digest` in its metadata; returns the path.

    The file is written under a temporary name and renamed, so an interrupted write never leaves a truncated file
    under ``path``.

    Raises:
        CheckpointError: a floating-point tensor holds NaN or Inf (:func:`check_finite_weights`); nothing is written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    check_finite_weights(state_dict, what=f"the weights to write to {path}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={**(metadata or {}), "format": "pt", DIGEST_KEY: state_dict_digest(tensors)})
    tmp.replace(path)
    return path


def load_state_dict_strict(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str,
    assign: bool = False,
    file_key: Mapping[str, str] | Callable[[str], str] | None = None,
    layout: str | None = None,
) -> None:
    """Load ``state_dict`` into ``module`` with every key, shape and dtype checked.

    ``assign=True`` is passed to ``load_state_dict`` (for modules built on the meta device).

    Args:
        module: the module to fill.
        state_dict: its weights, under the module's own key names.
        source: what the weights are, for messages (``"PUT checkpoint p_vqvae.pth"``).
        assign: passed to ``load_state_dict``.
        file_key: how the file spells each of the module's keys, when a converter renamed them (a mapping or a
            function; keys it does not cover are spelled as they are). Messages name missing, unexpected and
            mis-shaped keys as the file spells them, or would spell them.
        layout: the key layout the file was read as (``"FDM authors'"``), named in messages.

    Raises:
        CheckpointError: naming entries that are not name -> tensor, the missing, unexpected and wrongly shaped
            keys, and floating-point weights given as integer, bool or complex tensors, which are refused instead of
            cast.
    """
    if file_key is None:
        def spell(key: str) -> str:
            return key
    elif callable(file_key):
        spell = file_key
    else:
        def spell(key: str) -> str:
            return file_key.get(key, key)

    odd = sorted(repr(k) for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if odd:
        raise CheckpointError(f"Cannot load the {source} into {type(module).__name__}: it must map names to tensors; "
                              f"these entries do not: {', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''}.")
    expected = module.state_dict()
    missing = sorted(spell(k) for k in set(expected) - set(state_dict))
    unexpected = sorted(spell(k) for k in set(state_dict) - set(expected))
    common = sorted(set(expected) & set(state_dict))
    wrong_shape = [
        f"{spell(k)}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
        for k in common
        if expected[k].shape != state_dict[k].shape
    ]
    wrong_dtype = [
        f"{spell(k)}: expected floating point ({expected[k].dtype}), got {state_dict[k].dtype}"
        for k in common
        if expected[k].is_floating_point() and not state_dict[k].is_floating_point()
    ]
    if missing or unexpected or wrong_shape or wrong_dtype:
        read_as = f" (keys read in the {layout} layout)" if layout else ""
        dtypes = f", wrong dtypes {wrong_dtype} (integer and complex weights are refused, not cast)" if wrong_dtype else ""
        raise CheckpointError(
            f"Cannot load the {source} into {type(module).__name__}{read_as}: missing keys {missing}, unexpected "
            f"keys {unexpected}, wrong shapes {wrong_shape}{dtypes}."
        )
    module.load_state_dict(state_dict, strict=True, assign=assign)
