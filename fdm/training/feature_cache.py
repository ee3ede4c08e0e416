"""The frozen model's features ``(z, z_q)`` of every training view, computed once (FDM, WACV 2025, sec. 3.3:
phase 2 trains FDM against a frozen encoder and codebook, so its inputs and targets never change).

Modes: ``"memory"`` keeps them in (CPU) memory; ``"disk"`` writes them to ``.npy`` files under a cache folder,
read back through memory maps, reused by later runs and recomputed when the model or the views change;
``"none"`` re-encodes the views at every step, as the official code does (for comparison).

A disk cache is hostile until checked: its ``meta.json`` binds it to the base model's weight digest, the codebook
fingerprint, the views (files, crops, seed) and the sha256 of each array file; every one is checked before the
arrays are used, and a mismatch is a :class:`~fdm.errors.CheckpointError` naming the folder and the remedy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from fdm.adapter import VQAdapter
from fdm.checkpoint import file_sha256, state_dict_digest
from fdm.errors import CheckpointError, InputError
from fdm.training.distributed import DistContext, all_gather_tensors, barrier
from fdm.validation import check_finite, check_image

__all__ = ["CACHE_MODES", "FeatureCache", "encode_views"]

logger = logging.getLogger(__name__)

CACHE_MODES = ("memory", "disk", "none")
_FORMAT = 2
_ARRAYS = ("z", "z_q")


@torch.no_grad()
def encode_views(adapter: VQAdapter, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and quantize a batch of training views with the frozen model.

    Args:
        adapter: the base model's adapter (the model should be in eval mode).
        images: (B, 3, H, W) in [-1, 1], on the model's device; H, W multiples of ``adapter.factor``.

    Returns:
        ``z`` (B, C, h, w) continuous feature and ``z_q`` (B, C, h, w) its quantized version.

    Raises:
        InputError: wrong shape, or NaN / Inf in the images.
    """
    check_image(images, factor=adapter.factor, name="training views")
    check_finite(images, name="training views")
    z = adapter.encode(images)
    z_q, _ = adapter.quantize(z)
    check_finite(z, name="encoded features z of the training views (the base model's output)")
    return z.float(), z_q.float()


class FeatureCache:
    """``(z, z_q)`` of each view of ``views``, by view index.

    Args:
        adapter: adapter of the frozen base model.
        views: dataset of (3, S, S) training views; for ``mode="disk"`` it needs a ``fingerprint()`` method
            (:class:`~fdm.training.ImageFolderViews` and :class:`~fdm.training.TensorViews` have one).
        mode: ``"memory"``, ``"disk"`` or ``"none"`` (see the module docstring).
        cache_dir: folder of disk caches (mode ``"disk"``); each model / view set gets its own sub-folder.
        batch_size: views encoded at once while filling.
        num_workers: data-loading worker processes while filling.
        device: where the model runs and where :meth:`get` returns features (default: the model's device).
        ctx: distributed context; the views are encoded shard by shard across the processes.
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
        batch_size: int = 16,
        num_workers: int = 0,
        device: str | torch.device | None = None,
        ctx: DistContext | None = None,
        progress: bool = True,
    ):
        if mode not in CACHE_MODES:
            raise InputError(f"cache mode must be one of {CACHE_MODES}; got {mode!r}.")
        if mode == "disk" and cache_dir is None:
            raise InputError("cache mode 'disk' needs a cache_dir.")
        if mode == "disk" and not callable(getattr(views, "fingerprint", None)):
            raise InputError(
                f"cache mode 'disk' needs views with a fingerprint() method to tell when the cache is stale; "
                f"{type(views).__name__} has none. Use mode 'memory' or wrap the data in ImageFolderViews/TensorViews."
            )
        self.adapter = adapter
        self.views = views
        self.mode = mode
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = torch.device(device) if device is not None else adapter.device
        self.ctx = ctx or DistContext(device=self.device)
        self.progress = progress
        self.fill_seconds = 0.0
        self._z: torch.Tensor | np.ndarray | None = None
        self._z_q: torch.Tensor | np.ndarray | None = None
        self._path: Path | None = None
        self._binding: dict | None = None

    def __len__(self) -> int:
        return len(self.views)

    @property
    def path(self) -> Path | None:
        """Folder of this model's and views' disk cache (mode ``"disk"``), else None; fixed at first use."""
        if self.mode != "disk":
            return None
        if self._path is None:
            self._path = self.cache_dir / self.key()
        return self._path

    def key(self) -> str:
        """Id of the cached content (the name of its folder): :meth:`binding` hashed."""
        return hashlib.sha256(json.dumps(self.binding(), sort_keys=True).encode()).hexdigest()[:16]

    def binding(self) -> dict:
        """What a disk cache belongs to: cache format, base model weight digest and codebook, views."""
        if self._binding is None:
            self._binding = {
                "format": _FORMAT,
                "model": state_dict_digest(self.adapter.model.state_dict()),
                "codebook": self.adapter.fingerprint(),
                "views": self.views.fingerprint(),
                "num_views": len(self.views),
            }
        return self._binding

    def prepare(self) -> None:
        """Compute (or, for a valid disk cache, open) the features of every view; no-op for mode ``"none"``."""
        if self.mode == "none" or self._z is not None:
            return
        start = time.perf_counter()
        if self.mode == "memory":
            self._z, self._z_q = self._fill("memory")
        else:
            self._prepare_disk()
        self.fill_seconds = time.perf_counter() - start
        if self.ctx.is_main:
            logger.info("features of %d views ready (%s cache) in %.1f s", len(self), self.mode,
                        self.fill_seconds)

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` and ``z_q``, each (B, C, h, w) float32 on ``device``, of the views ``indices``."""
        if self.mode == "none":
            images = default_collate([self.views[i] for i in indices]).to(self.device)
            return encode_views(self.adapter, images)
        if self._z is None:
            raise RuntimeError("FeatureCache.prepare() must be called before get().")
        if self.mode == "memory":
            rows = torch.as_tensor(list(indices), dtype=torch.long)
            z, z_q = self._z[rows], self._z_q[rows]
        else:
            rows = np.asarray(indices, dtype=np.int64)
            z, z_q = torch.from_numpy(self._z[rows]), torch.from_numpy(self._z_q[rows])
        return z.to(self.device, non_blocking=True), z_q.to(self.device, non_blocking=True)

    # --- filling ---------------------------------------------------------------------------------------

    def _prepare_disk(self) -> None:
        folder = self.path
        log = logger.info if self.ctx.is_main else logger.debug
        if not (folder / "meta.json").is_file():
            log("no feature cache at %s: computing it", folder)
            partial = folder.with_name(folder.name + ".partial")
            self._fill(partial if self.ctx.is_main else None)
            if self.ctx.is_main:
                shutil.rmtree(folder, ignore_errors=True)
                partial.rename(folder)
            barrier(self.ctx)
        else:
            log("checking and reusing the feature cache at %s", folder)
        self._z, self._z_q = self._open_verified(folder)

    def _open_verified(self, folder: Path) -> tuple[np.ndarray, np.ndarray]:
        """Memory-map the arrays of a disk cache after checking them against its ``meta.json``.

        Raises:
            CheckpointError: unreadable metadata, another model or other views, a missing, truncated or altered
                array file.
        """
        remedy = f"Delete {folder} (it is recomputed on the next run)."
        meta_file = folder / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
            recorded, binding = meta["sha256"], meta["binding"]
            shape = tuple(int(s) for s in meta["shape"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"feature cache metadata {meta_file} is unreadable ({err}). {remedy}") from err
        if binding != self.binding():
            differs = sorted(k for k in self.binding() if binding.get(k) != self.binding()[k])
            raise CheckpointError(f"feature cache {folder} was built for another {' and '.join(differs)} "
                                  f"than this run's. {remedy}")
        arrays = []
        for name in _ARRAYS:
            file = folder / f"{name}.npy"
            if not file.is_file() or file_sha256(file) != recorded.get(name):
                raise CheckpointError(f"feature cache file {file} is missing, truncated or altered: it does not "
                                      f"match the sha256 recorded in {meta_file}. {remedy}")
            array = np.load(file, mmap_mode="r", allow_pickle=False)
            if array.shape != (len(self), *shape) or array.dtype != np.float32:
                raise CheckpointError(f"feature cache file {file} holds {array.dtype} {array.shape}, expected "
                                      f"float32 {(len(self), *shape)}. {remedy}")
            arrays.append(array)
        return arrays[0], arrays[1]

    def _fill(self, target: str | Path | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Encode every view, the processes sharing the work.

        ``target`` is ``"memory"`` (return the features as CPU tensors), a folder (write ``z.npy``,
        ``z_q.npy`` and ``meta.json`` there) or None (this process only helps encoding).

        Views are taken in chunks of ``batch_size * world_size``; process ``r`` encodes the ``r``-th slice of
        each chunk (padded to ``batch_size`` with repeats so every process contributes equally) and the slices
        are gathered on every process.
        """
        n, b, ctx = len(self), self.batch_size, self.ctx
        chunks = [list(range(s, min(s + b * ctx.world_size, n))) for s in range(0, n, b * ctx.world_size)]
        mine = []
        for chunk in chunks:
            part = chunk[ctx.rank * b:(ctx.rank + 1) * b]
            mine.append(part + [chunk[-1]] * (b - len(part)) if ctx.distributed else part)
        loader = DataLoader(self.views, batch_sampler=mine, num_workers=self.num_workers)
        z_all = z_q_all = None
        bar = tqdm(total=n, desc="caching features", unit="view", disable=not (self.progress and ctx.is_main))
        for chunk, images in zip(chunks, loader):
            z, z_q = encode_views(self.adapter, images.to(self.device))
            counts = [len(chunk[r * b:(r + 1) * b]) for r in range(ctx.world_size)]
            z = torch.cat([t[:c].cpu() for t, c in zip(all_gather_tensors(z, ctx), counts)])
            z_q = torch.cat([t[:c].cpu() for t, c in zip(all_gather_tensors(z_q, ctx), counts)])
            if target is not None:
                if z_all is None:
                    z_all, z_q_all = self._allocate((n, *z.shape[1:]), target)
                z_all[chunk[0]:chunk[-1] + 1] = z if target == "memory" else z.numpy()
                z_q_all[chunk[0]:chunk[-1] + 1] = z_q if target == "memory" else z_q.numpy()
            bar.update(len(chunk))
        bar.close()
        if target is None or target == "memory":
            return z_all, z_q_all
        z_all.flush()
        z_q_all.flush()
        folder = Path(target)
        meta = {"binding": self.binding(), "shape": list(z_all.shape[1:]), "images": self._image_list(),
                "sha256": {name: file_sha256(folder / f"{name}.npy") for name in _ARRAYS}}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
        return None, None

    def _image_list(self) -> list[str]:
        """The image files the views come from (for a reader of ``meta.json``), or [] for in-memory views."""
        return [str(p) for p in getattr(self.views, "files", [])]

    @staticmethod
    def _allocate(shape: tuple[int, ...], target: str | Path) -> tuple:
        if target == "memory":
            return torch.empty(shape), torch.empty(shape)
        folder = Path(target)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return tuple(np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape)
                     for name in ("z", "z_q"))
