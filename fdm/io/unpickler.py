"""Safe reading of pickled PyTorch checkpoints (``torch.save`` zip archives, legacy ``torch.save`` files,
Lightning ``.ckpt``) through one restricted unpickler with one allowlist of globals.

Nothing here executes code from a checkpoint: unknown pickled classes and functions become inert placeholders.
Safetensors files are read by :mod:`fdm.io.weights`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import logging
import math
import pickle
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["STORAGE_DTYPES", "OpaqueObject", "Refused", "unpickle"]

logger = logging.getLogger(__name__)

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


class Refused(pickle.UnpicklingError):
    """A pickle asked for something the restricted unpickler never does (call, mutate, import)."""


def _is_placeholder(obj: Any) -> bool:
    return isinstance(obj, OpaqueObject) or (isinstance(obj, type) and issubclass(obj, OpaqueObject))


_TENSOR_METADATA = frozenset({"conj", "neg"})  # what torch.save records of a tensor besides its storage view


def _check_tensor_view(storage: Any, storage_offset: Any, size: Any, stride: Any, backward_hooks: Any = None,
                       requires_grad: Any = False, metadata: Any = None) -> None:
    """Check a pickled tensor's parts before torch sees them.

    The view must lie inside its storage (torch would grow the storage to fit, exposing uninitialised memory),
    and no two of its elements may share memory (a stride-0 or overlapping view is never a weight: it claims
    more elements than the file stores, and in-place updates of it fail).
    """
    if not isinstance(storage, torch.storage.TypedStorage):
        raise Refused(f"a tensor must be rebuilt from a storage of the file, not from {type(storage).__name__}")
    if backward_hooks:  # torch.save never writes hooks (they are code); a file that has them is crafted
        raise Refused("a pickled tensor carries backward hooks")
    if type(requires_grad) is not bool:
        raise Refused(f"a tensor's requires_grad must be a bool, not {requires_grad!r}")
    if metadata and not (type(metadata) is dict and all(
            k in _TENSOR_METADATA and type(v) is bool for k, v in metadata.items())):
        raise Refused(f"tensor metadata {metadata!r} (only {sorted(_TENSOR_METADATA)} flags are known)")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(type(n) is int and n >= 0 for n in (storage_offset, *size, *stride))):
        raise Refused(f"a tensor view (offset {storage_offset!r}, size {size!r}, stride {stride!r}) must be "
                      "non-negative ints, one stride per dimension")
    numel = math.prod(size)
    if numel:
        span = 1  # elements reached by the dimensions so far; the next stride must step past them
        for st, n in sorted((st, n) for n, st in zip(size, stride) if n > 1):
            if st < span:
                raise Refused(f"a tensor of size {tuple(size)} and stride {tuple(stride)} has elements sharing "
                              "memory (a stride-0 or overlapping view is not a weight)")
            span = st * (n - 1) + span
        extent = storage_offset + span
        if extent > storage._size():
            raise Refused(f"a tensor of size {tuple(size)}, stride {tuple(stride)} at offset {storage_offset} "
                          f"reaches element {extent}, beyond its storage of {storage._size()}")


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any) -> torch.Tensor:
    _check_tensor_view(storage, storage_offset, size, stride)
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool,
                       backward_hooks: Any, metadata: Any = None) -> torch.Tensor:
    _check_tensor_view(storage, storage_offset, size, stride, backward_hooks, requires_grad, metadata)
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                           collections.OrderedDict(), metadata)


def _rebuild_tensor_v3(storage: Any, storage_offset: int, size: Any, stride: Any, requires_grad: bool,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> torch.Tensor:
    _check_tensor_view(storage, storage_offset, size, stride, backward_hooks, requires_grad, metadata)
    if not isinstance(dtype, torch.dtype):
        raise Refused(f"a tensor's dtype must be a torch.dtype, not {type(dtype).__name__}")
    return torch._utils._rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                                           collections.OrderedDict(), dtype, metadata)


def _rebuild_parameter(data: Any, requires_grad: bool, backward_hooks: Any) -> nn.Parameter:
    if not isinstance(data, torch.Tensor) or backward_hooks or type(requires_grad) is not bool:
        raise Refused("a pickled Parameter must wrap a tensor of the file, with a bool requires_grad and no "
                      "backward hooks")
    return torch._utils._rebuild_parameter(data, requires_grad, collections.OrderedDict())


def _rebuild_parameter_with_state(data: Any, requires_grad: bool, backward_hooks: Any, state: Any) -> nn.Parameter:
    parts = state if isinstance(state, tuple) else (state,)
    for part in parts:  # new plain attributes only: not ``__class__`` or ``_backward_hooks``, not ``detach``...
        if part and not (isinstance(part, dict) and all(
                type(k) is str and not k.startswith("_") and not hasattr(nn.Parameter, k) for k in part)):
            raise Refused("a pickled Parameter's state may only set plain attributes of its own, not replace a "
                          "tensor method or property")
    param = _rebuild_parameter(data, requires_grad, backward_hooks)
    return torch._utils._set_obj_state(param, state)


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``: a str to latin-1, nothing else."""
    if type(obj) is not str or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise Refused(f"_codecs.encode is allowed for str to latin1 only, got {type(obj).__name__}, {encoding!r}")
    return obj.encode("latin-1")


#: dtype of every storage class a checkpoint may name (``torch.save`` writes ``torch.FloatStorage``...).
STORAGE_DTYPES: dict[type, torch.dtype] = {
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
    **{("torch", cls.__name__): cls for cls in STORAGE_DTYPES},
    ("torch.storage", "UntypedStorage"): torch.storage.UntypedStorage,
    ("torch.storage", "TypedStorage"): torch.storage.TypedStorage,
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
}
_CALLABLE_IDS = frozenset(id(obj) for obj in _CALLABLE_GLOBALS.values())


def _allowed_call(func: Any, args: Any, kwargs: Any = None) -> Any:
    """``func(*args, **kwargs)`` if ``func`` is a placeholder (records, runs nothing) or an allowed callable."""
    if type(args) is not tuple or not (kwargs is None or (type(kwargs) is dict and all(type(k) is str for k in kwargs))):
        raise Refused("malformed call arguments")
    if not (_is_placeholder(func) or id(func) in _CALLABLE_IDS):
        raise Refused(f"a pickle asked to call {func!r}, which is not an allowed callable")
    return func(*args, **(kwargs or {}))


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: every opcode can be guarded
    """Unpickles with :data:`_ALLOWED_GLOBALS` only, and never calls, imports or mutates anything else.

    Calls (REDUCE, NEWOBJ, INST, OBJ) go to allowed callables or placeholders; BUILD only fills placeholders and
    fresh OrderedDicts; APPEND / SETITEM / ADDITEMS only fill fresh lists / dicts / sets or placeholders; copyreg
    extension codes are refused; persistent ids go to the ``persistent_load`` the file format gives (a bare
    pickle has none). A refused construct raises :class:`Refused`.
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
            raise Refused("a persistent id outside a torch.save file")
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
            raise Refused(f"NEWOBJ of {self.stack[-1]!r}, which is not a class")
        return self.stack[-1]

    def _instantiate(self, klass: Any, args: list) -> None:  # INST and OBJ (protocols 0 and 1)
        self.append(_allowed_call(klass, tuple(args)))

    def _load_ext(self) -> None:
        raise Refused("copyreg extension codes")

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, OpaqueObject):
            OpaqueObject.__setstate__(inst, state)
        elif (type(inst) is collections.OrderedDict and type(state) is dict
              and all(type(k) is str and not k.startswith("__") for k in state)):
            inst.__dict__.update(state)  # a state dict's ``_metadata``
        else:
            raise Refused(f"a pickle asked to set the state of {type(inst).__name__}")

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
            raise Refused("SETITEMS with an odd number of items")
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
            raise Refused(f"a pickle asked to fill a {type(target).__name__}")
        return target

    for _opcode, _method in [
        (pickle.REDUCE, _load_reduce), (pickle.NEWOBJ, _load_newobj), (pickle.NEWOBJ_EX, _load_newobj_ex),
        (pickle.EXT1, _load_ext), (pickle.EXT2, _load_ext), (pickle.EXT4, _load_ext), (pickle.BUILD, _load_build),
        (pickle.APPEND, _load_append), (pickle.APPENDS, _load_appends), (pickle.SETITEM, _load_setitem),
        (pickle.SETITEMS, _load_setitems), (pickle.ADDITEMS, _load_additems),
    ]:
        dispatch[_opcode[0]] = _method
    del _opcode, _method


def unpickle(source: Any, persistent_load: Callable[[Any], Any] | None = None) -> Any:
    """One pickle from ``source`` (bytes, or a binary file left just after the pickle), restricted."""
    return _RestrictedUnpickler(io.BytesIO(source) if isinstance(source, bytes) else source, persistent_load).load()
