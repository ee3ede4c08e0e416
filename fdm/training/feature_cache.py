"""The frozen model's features of every training view, computed once (FDM, WACV 2025, sec. 3.3: phase 2 trains
FDM against a frozen encoder and codebook, so its inputs and targets never change).

What is stored is compact: the continuous feature ``z`` in ``float16`` (default), ``bfloat16`` or ``float32``,
and the code index of every latent cell (``int16`` for codebooks of up to 32768 codes, else ``int32``). ``z_q``
is never stored: :meth:`FeatureCache.get` looks the indices up in the codebook, which is exactly what the
adapters' ``quantize`` returns. Against the earlier layout (``z`` and ``z_q`` in float32) a float16 cache takes
``(2 C + 2) / (8 C)`` of the bytes: 26.6 % at C = 16 channels, 25.1 % at C = 256.

The views are split into ``num_shards`` contiguous shards (by default one per process); process ``r`` of ``W``
encodes and reads only the shards ``s`` with ``s % W == r``, so no process ever holds the whole cache, and the
phase-2 sampler (:class:`~fdm.training.shards.ShardedBatches`) draws every process's batch from its own shards.

Modes: ``"memory"`` keeps a process's shards in (CPU) memory; ``"disk"`` writes them to ``.npy`` files under a
cache folder, read back through memory maps and reused by later runs; an interrupted extraction resumes at the
last flushed batch; ``"none"`` re-encodes the views at every step, as the official code does (for comparison).

A disk cache is hostile until checked: every shard's ``meta.json`` binds it to the base model's weight digest,
the codebook fingerprint, the views, the storage type, the shard layout and the sha256 of each array file;
every one is checked before the arrays are used, and a mismatch is a :class:`~fdm.errors.CheckpointError`
naming the folder and the remedy. A shard is only marked complete after its ``z`` was checked finite and its
indices in range.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from fdm.adapter import VQAdapter
from fdm.errors import CheckpointError, InputError, TrainingError
from fdm.io.fingerprint import json_digest
from fdm.io.weights import file_sha256, state_dict_digest
from fdm.pipeline import Latents, encode_latents
from fdm.training.data import load_batches
from fdm.training.distributed import DistContext, barrier
from fdm.training.shards import owned_shards, shard_ranges
from fdm.validation import check_finite, check_image

__all__ = ["CACHE_DTYPES", "CACHE_MODES", "FeatureCache", "encode_views", "index_dtype"]

logger = logging.getLogger(__name__)

CACHE_MODES = ("memory", "disk", "none")
CACHE_DTYPES = ("float16", "bfloat16", "float32")
"""Storage types of the cached ``z``; bfloat16 keeps float32's range (use it when float16 overflows)."""

_FORMAT = 3
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# numpy has no bfloat16: its bits are stored as int16 and reinterpreted on reading
_NUMPY_DTYPES = {"float16": np.float16, "bfloat16": np.int16, "float32": np.float32}
_VERIFY_ROWS = 4096  # views checked at once when a shard is completed


@torch.no_grad()
def encode_views(adapter: VQAdapter, images: torch.Tensor, holes: torch.Tensor | None = None) -> Latents:
    """Encode and quantize a batch of training views with the frozen model (:func:`fdm.pipeline.encode_latents`).

    Args:
        adapter: the base model's adapter (the model should be in eval mode).
        images: (B, 3, H, W) in [-1, 1], on the model's device; H, W multiples of ``adapter.factor``.
        holes: (B, 1, H, W) binary hole masks (1 = hole), or None.

    Returns:
        The batch's :class:`~fdm.pipeline.Latents`.

    Raises:
        InputError: wrong shape, or NaN / Inf in the images or in their features.
    """
    check_image(images, factor=adapter.factor, name="training views")
    check_finite(images, name="training views")
    latents = encode_latents(adapter, images, holes)
    check_finite(latents.z, name="encoded features z of the training views (the base model's output)")
    return latents


def index_dtype(codes: int) -> str:
    """How the cache stores code indices: ``"int16"`` for codebooks of up to 32768 codes, else ``"int32"``."""
    return "int16" if codes <= 2**15 else "int32"


@dataclass
class _Shard:
    """One shard's arrays: ``z`` (n, C, h, w) in the storage type and ``indices`` (n, h, w)."""

    views: range
    z: torch.Tensor | np.ndarray
    indices: torch.Tensor | np.ndarray


class FeatureCache:
    """``(z, z_q)`` of each view of ``views``, by view index, for the shards this process owns.

    Args:
        adapter: adapter of the frozen base model.
        views: dataset of (3, S, S) training views. For ``mode="disk"`` it needs a ``fingerprint()`` method
            (:class:`~fdm.training.SeededViews`, :class:`~fdm.training.ImageFolderViews` and
            :class:`~fdm.training.TensorViews` have one). Views with an ``iter_views(start, stop)`` method and
            ``random_access = False`` (streaming sources) are read sequentially.
        mode: ``"memory"``, ``"disk"`` or ``"none"`` (see the module docstring).
        cache_dir: folder of disk caches (mode ``"disk"``); each model / view set / layout gets its own
            sub-folder.
        dtype: storage type of ``z``, one of :data:`CACHE_DTYPES`.
        num_shards: number of shards; None: one per process. Must be a multiple of the number of processes.
        batch_size: views encoded at once while filling.
        num_workers: data-loading worker processes while filling (random-access views).
        device: where the model runs and where :meth:`get` returns features (default: the model's device).
        ctx: distributed context (which shards are this process's).
        progress: show a progress bar while filling (on the main process).

    Call :meth:`prepare` once before :meth:`get`.
    """

    def __init__(
        self,
        adapter: VQAdapter,
        views: Dataset,
        *,
        mode: str = "memory",
        cache_dir: str | Path | None = None,
        dtype: str = "float16",
        num_shards: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        device: str | torch.device | None = None,
        ctx: DistContext | None = None,
        progress: bool = True,
    ):
        if mode not in CACHE_MODES:
            raise InputError(f"cache mode must be one of {CACHE_MODES}; got {mode!r}.")
        if dtype not in CACHE_DTYPES:
            raise InputError(f"cache dtype must be one of {CACHE_DTYPES}; got {dtype!r}.")
        if mode == "disk" and cache_dir is None:
            raise InputError("cache mode 'disk' needs a cache_dir.")
        if mode == "disk" and not callable(getattr(views, "fingerprint", None)):
            raise InputError(
                f"cache mode 'disk' needs views with a fingerprint() method to tell when the cache is stale; "
                f"{type(views).__name__} has none. Use mode 'memory' or wrap the data in SeededViews/TensorViews."
            )
        self.adapter = adapter
        self.views = views
        self.mode = mode
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else adapter.device
        self.ctx = ctx or DistContext(device=self.device)
        self.num_shards = num_shards if num_shards is not None else self.ctx.world_size
        if self.num_shards < 1 or self.num_shards > max(1, len(views)):
            raise InputError(f"num_shards must be between 1 and the number of views ({len(views)}); "
                             f"got {self.num_shards}.")
        self.shards = shard_ranges(len(views), self.num_shards)
        self.owned = owned_shards(self.num_shards, self.ctx)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress
        self.fill_seconds = 0.0
        self.encoded_views = 0  # views encoded by this process's last prepare() (0 when a disk cache was reused)
        self._data: dict[int, _Shard] = {}
        self._binding: dict | None = None

    def __len__(self) -> int:
        return len(self.views)

    @property
    def path(self) -> Path | None:
        """Folder of this model's and views' disk cache (mode ``"disk"``), else None."""
        if self.mode != "disk":
            return None
        return self.cache_dir / self.key()

    def key(self) -> str:
        """Id of the cached content (the name of its folder): :meth:`binding` hashed."""
        return json_digest(self.binding())

    def binding(self) -> dict:
        """What a disk cache belongs to: format, base model weight digest and codebook, views, storage, shards."""
        if self._binding is None:
            self._binding = {
                "format": _FORMAT,
                "model": state_dict_digest(self.adapter.model.state_dict()),
                "codebook": self.adapter.fingerprint(),
                "views": self.views.fingerprint(),
                "num_views": len(self.views),
                "dtype": self.dtype,
                "num_shards": self.num_shards,
            }
        return self._binding

    def nbytes_per_view(self) -> float:
        """Bytes of cached data per view (``z`` and the indices), over this process's prepared shards."""
        total = sum(_nbytes(s.z) + _nbytes(s.indices) for s in self._data.values())
        return total / max(1, sum(len(s.views) for s in self._data.values()))

    def prepare(self) -> None:
        """Compute (or, for a valid disk cache, open) this process's shards; no-op for mode ``"none"``."""
        if self.mode == "none" or self._data:
            return
        start = time.perf_counter()
        self.encoded_views = 0
        for shard in self.owned:
            if self.mode == "memory":
                self._data[shard] = self._fill_memory(shard)
            else:
                self._data[shard] = self._prepare_disk(shard)
        barrier(self.ctx)
        self.fill_seconds = time.perf_counter() - start
        if self.ctx.is_main:
            logger.info("features of %d views ready (%s cache, %s, %d shard(s)) in %.1f s", len(self), self.mode,
                        self.dtype, self.num_shards, self.fill_seconds)

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` and ``z_q``, each (B, C, h, w) float32 on ``device``, of the views ``indices``.

        Raises:
            IndexError: a view in a shard this process does not own (the samplers never ask for one).
        """
        if self.mode == "none":
            latents = encode_views(self.adapter, default_collate([self.views[i] for i in indices]).to(self.device))
            return latents.z.float(), latents.z_q.float()
        if not self._data:
            raise RuntimeError("FeatureCache.prepare() must be called before get().")
        views = np.asarray(indices, dtype=np.int64)
        if views.size and (views.min() < 0 or views.max() >= len(self)):
            raise IndexError(f"view indices must be in [0, {len(self)}); got {views.min()}..{views.max()}.")
        shard_of = np.searchsorted([r.start for r in self.shards], views, side="right") - 1
        z_parts, code_parts, order = [], [], []
        for s in np.unique(shard_of):
            shard = self._data.get(int(s))
            if shard is None:
                raise IndexError(f"views in shard {s} were asked for, which process {self.ctx.rank} does not own "
                                 f"(it owns {self.owned}).")
            positions = np.nonzero(shard_of == s)[0]
            rows = views[positions] - shard.views.start
            z_parts.append(_take(shard.z, rows))
            code_parts.append(_take(shard.indices, rows))
            order.append(positions)
        if len(order) == 1:  # one shard (one per process, the default): the rows are in the batch's order already
            z, codes = z_parts[0], code_parts[0]
        else:
            inverse = torch.from_numpy(np.argsort(np.concatenate(order), kind="stable"))
            z, codes = torch.cat(z_parts)[inverse], torch.cat(code_parts)[inverse]
        # moved in their compact storage types, widened on the device
        z = _from_storage(z.to(self.device, non_blocking=True), self.dtype)
        codes = codes.to(self.device, non_blocking=True).long()
        return z, self.adapter.lookup(codes).float()

    # --- filling ---------------------------------------------------------------------------------------

    def _batches(self, views: range) -> Iterator[torch.Tensor]:
        """The images of ``views``, in order, ``batch_size`` at a time."""
        if getattr(self.views, "random_access", True):
            batches = [list(views[i:i + self.batch_size]) for i in range(0, len(views), self.batch_size)]
            yield from load_batches(self.views, batches, self.num_workers)
            return
        batch = []
        for _, image in self.views.iter_views(views.start, views.stop):
            batch.append(image)
            if len(batch) == self.batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)

    def _encode_into(self, shard: int, views: range, z_out, codes_out, offset: int, on_flush=None) -> None:
        """Encode ``views`` (a tail of shard ``shard``) into rows ``offset...`` of the output arrays."""
        bar = tqdm(total=len(self.shards[shard]), initial=offset, desc=f"caching features (shard {shard})",
                   unit="view", disable=not (self.progress and self.ctx.is_main))
        row = offset
        for images in self._batches(views):
            latents = encode_views(self.adapter, images.to(self.device))
            z, codes = latents.z.float(), latents.indices
            z = _to_storage(z.cpu(), self.dtype)
            n = z.shape[0]
            if isinstance(z_out, np.ndarray):
                z_out[row:row + n] = z.numpy()
                codes_out[row:row + n] = codes.cpu().numpy().astype(codes_out.dtype)
            else:
                z_out[row:row + n] = z
                codes_out[row:row + n] = codes.cpu().to(codes_out.dtype)
            row += n
            self.encoded_views += n
            if on_flush is not None:
                on_flush(row)
            bar.update(n)
        bar.close()

    @functools.cached_property
    def _view_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-view shapes of ``z`` (C, h, w) and of the indices (h, w) ((h, w, L) for a residual quantizer of L
        levels), from the model and the size of the first view (read once)."""
        size = self.views[0].shape[-2:] if getattr(self.views, "random_access", True) else \
            next(iter(self.views.iter_views(0, 1)))[1].shape[-2:]
        h, w = (s // self.adapter.factor for s in size)
        levels = self.adapter.code_levels
        return (self.adapter.channels, h, w), ((h, w) if levels == 1 else (h, w, levels))

    def _index_dtype(self) -> str:
        return index_dtype(self.adapter.codebook().shape[0])

    def _fill_memory(self, shard: int) -> _Shard:
        views = self.shards[shard]
        z_shape, code_shape = self._view_shapes
        z = torch.empty((len(views), *z_shape), dtype=_to_storage(torch.zeros(0), self.dtype).dtype)
        codes = torch.empty((len(views), *code_shape), dtype=getattr(torch, self._index_dtype()))
        self._encode_into(shard, views, z, codes, 0)
        self._check_arrays(z, codes, f"in-memory feature cache shard {shard}")
        return _Shard(views, z, codes)

    def _prepare_disk(self, shard: int) -> _Shard:
        folder = self.path / f"shard-{shard:05d}-of-{self.num_shards:05d}"
        if (folder / "meta.json").is_file():
            logger.debug("checking and reusing the feature cache shard %s", folder)
            return self._open_verified(shard, folder)
        return self._fill_disk(shard, folder)

    def _fill_disk(self, shard: int, folder: Path) -> _Shard:
        """Encode the shard into ``folder``, resuming after the last flushed batch of an interrupted pass, and
        map the arrays it wrote (checked as they were written: not hashed a second time)."""
        views = self.shards[shard]
        z_file, codes_file, done = self._open_partial(shard, folder)
        progress_file = folder / "progress.json"

        def flush(rows: int) -> None:
            z_file.flush()
            codes_file.flush()
            _write_json_atomic(progress_file, {"binding": self.binding(), "shard": shard, "done": rows})

        self._encode_into(shard, range(views.start + done, views.stop), z_file, codes_file, done, flush)
        self._check_arrays(z_file, codes_file, f"feature cache {folder}")
        z_file.flush()
        codes_file.flush()
        meta = {"binding": self.binding(), "shard": shard, "views": [views.start, views.stop],
                "images": self._image_names(views),
                "sha256": {name: file_sha256(folder / f"{name}.npy") for name in ("z", "indices")}}
        _write_json_atomic(folder / "meta.json", meta)
        progress_file.unlink(missing_ok=True)
        return _Shard(views, *(np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                               for name in ("z", "indices")))

    def _open_partial(self, shard: int, folder: Path) -> tuple[np.memmap, np.memmap, int]:
        """The shard's arrays, writable, and how many views they already hold: those of an interrupted pass
        when its ``progress.json`` belongs to this cache and the arrays have the expected layout, else new ones."""
        views = self.shards[shard]
        z_shape, code_shape = self._view_shapes
        expected = ((len(views), *z_shape), np.dtype(_NUMPY_DTYPES[self.dtype]),
                    (len(views), *code_shape), np.dtype(self._index_dtype()))
        try:
            progress = json.loads((folder / "progress.json").read_text())
            done = int(progress["done"])
            linked = any((folder / name).is_symlink() for name in ("z.npy", "indices.npy"))  # writes would go elsewhere
            if (progress["binding"] == self.binding() and progress["shard"] == shard and 0 < done <= len(views)
                    and not linked):
                z_file = np.lib.format.open_memmap(folder / "z.npy", mode="r+")
                codes_file = np.lib.format.open_memmap(folder / "indices.npy", mode="r+")
                if (z_file.shape, z_file.dtype, codes_file.shape, codes_file.dtype) == expected:
                    logger.info("resuming the feature cache shard %s at view %d of %d", folder, done, len(views))
                    return z_file, codes_file, done
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            pass  # no usable partial pass: start the shard afresh
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        z_file = np.lib.format.open_memmap(folder / "z.npy", mode="w+", dtype=expected[1], shape=expected[0])
        codes_file = np.lib.format.open_memmap(folder / "indices.npy", mode="w+", dtype=expected[3], shape=expected[2])
        return z_file, codes_file, 0

    def _check_arrays(self, z, codes, where: str) -> None:
        """Refuse to complete a shard with a non-finite ``z`` (e.g. float16 overflow) or an index out of range.

        Raises:
            TrainingError: naming ``where``, the views and the remedy; nothing is trained on or saved.
        """
        num_codes = self.adapter.codebook().shape[0]
        for start in range(0, z.shape[0], _VERIFY_ROWS):
            values = _from_storage(_take(z, np.arange(start, min(start + _VERIFY_ROWS, len(z)))), self.dtype)
            if not torch.isfinite(values).all():
                hint = " Store z as bfloat16 or float32 (dtype / --cache-dtype)." if self.dtype == "float16" else ""
                raise TrainingError(f"{where}: z holds NaN or Inf after conversion to {self.dtype} "
                                    f"(views {start}..{start + len(values) - 1} of the shard).{hint}")
            if not _codes_in_range(np.asarray(codes[start:start + _VERIFY_ROWS]), num_codes):
                raise TrainingError(f"{where}: code indices outside [0, {num_codes}).")

    def _open_verified(self, shard: int, folder: Path) -> _Shard:
        """Memory-map a shard's arrays after checking them against its ``meta.json``.

        Raises:
            CheckpointError: unreadable metadata, another model, views, storage type or shard layout, a missing,
                truncated or altered array file.
        """
        remedy = f"Delete {self.path} (it is recomputed on the next run)."
        meta_file = folder / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
            recorded, binding = meta["sha256"], meta["binding"]
            recorded_shard = meta["shard"]
            if not isinstance(recorded, dict):
                raise TypeError(f"sha256 is {type(recorded).__name__}, not a mapping of file names to digests")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:  # a crafted, deeply nested file
            raise CheckpointError(f"feature cache metadata {meta_file} is unreadable ({err}). {remedy}") from err
        if binding != self.binding() or recorded_shard != shard:
            differs = sorted(k for k in self.binding() if not isinstance(binding, dict)
                             or binding.get(k) != self.binding()[k]) or ["shard"]
            raise CheckpointError(f"feature cache {folder} was built for another {' and '.join(differs)} "
                                  f"than this run's. {remedy}")
        views = self.shards[shard]
        z_shape, code_shape = self._view_shapes
        expected = {"z": ((len(views), *z_shape), np.dtype(_NUMPY_DTYPES[self.dtype])),
                    "indices": ((len(views), *code_shape), np.dtype(self._index_dtype()))}
        arrays = {}
        for name, (shape, dtype) in expected.items():
            file = folder / f"{name}.npy"
            if file.is_symlink():
                raise CheckpointError(f"feature cache file {file} is a symbolic link; a cache holds its own files. "
                                      f"{remedy}")
            if not file.is_file() or file_sha256(file) != recorded.get(name):
                raise CheckpointError(f"feature cache file {file} is missing, truncated or altered: it does not "
                                      f"match the sha256 recorded in {meta_file}. {remedy}")
            array = np.load(file, mmap_mode="r", allow_pickle=False)
            if array.shape != shape or array.dtype != dtype:
                raise CheckpointError(f"feature cache file {file} holds {array.dtype} {array.shape}, expected "
                                      f"{dtype} {shape}. {remedy}")
            arrays[name] = array
        codes, num_codes = arrays["indices"], self.adapter.codebook().shape[0]
        if not _codes_in_range(codes, num_codes):
            raise CheckpointError(f"feature cache file {folder / 'indices.npy'} holds code indices outside "
                                  f"[0, {num_codes}). {remedy}")
        return _Shard(views, arrays["z"], codes)

    def _image_names(self, views: range) -> list[str]:
        """The images a shard's views come from (for a reader of ``meta.json``), or [] for in-memory views."""
        names = getattr(self.views, "names", None)
        names = names() if callable(names) else [str(p) for p in getattr(self.views, "files", [])]
        per_image = getattr(self.views, "views_per_image", 1)
        return list(names[views.start // per_image:(views.stop - 1) // per_image + 1])


def _codes_in_range(codes: np.ndarray, num_codes: int) -> bool:
    """Whether every code index lies in ``[0, num_codes)``."""
    return not codes.size or (codes.min() >= 0 and codes.max() < num_codes)


def _to_storage(z: torch.Tensor, dtype: str) -> torch.Tensor:
    """float32 ``z`` -> its storage form (bfloat16 as its int16 bits)."""
    stored = z.to(_TORCH_DTYPES[dtype])
    return stored.view(torch.int16) if dtype == "bfloat16" else stored


def _from_storage(stored: torch.Tensor, dtype: str) -> torch.Tensor:
    """Storage form -> a float32 tensor (on the device of ``stored``)."""
    return (stored.view(torch.bfloat16) if dtype == "bfloat16" else stored).float()


def _take(array: torch.Tensor | np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """``array[rows]`` of an in-memory tensor or a memory-mapped array, as a tensor in the storage type (a copy)."""
    return array[torch.from_numpy(rows)] if isinstance(array, torch.Tensor) else torch.from_numpy(array[rows])


def _nbytes(array: torch.Tensor | np.ndarray) -> int:
    return array.nbytes if isinstance(array, np.ndarray) else array.numel() * array.element_size()


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary file, so that a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
