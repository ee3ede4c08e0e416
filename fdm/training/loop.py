"""The step loop both FDM trainers run (:class:`TrainingLoop`) and the update of one optimiser step at the run's
precision (:func:`optimizer_step`).

What phase 2 and phase 3 do alike lives here, once:

- **length and progress**: a run lasts a number of steps, a wall-time budget or both (:class:`RunBudget`); its
  progress is the same number on every process;
- **records**: a progress bar, and every ``log_every`` steps and at the last one the mean of each loss term since
  the previous record, averaged over processes, logged and appended to ``<output_dir>/metrics.jsonl``
  (``"split": "train"``; the phases add their own splits);
- **one run per folder**: ``<output_dir>/run.json`` records the run (phase, config, the
  :func:`~fdm.training.checkpointing.run_identity` of its data and base model, process count); a run into a folder
  that records another run is refused, naming what differs (:meth:`TrainingLoop.start_point` decides where a
  command starts: a new run, ``--resume`` or ``--overwrite``);
- **checkpoints**: every ``checkpoint_every`` steps and where ``until`` stops a run early, with the config, the
  :func:`~fdm.training.checkpointing.run_identity`, every RNG state and each process's unlogged losses; a resume
  is refused when the checkpoint was written by another kind of run
  (:func:`~fdm.training.checkpointing.check_resumable`) and continues the run exactly;
- **masks**: a step's random masks depend on ``(seed, step, key)`` alone (:meth:`TrainingLoop.step_seed`), so a
  resume needs no mask state and any process draws the same mask for the same key;
- **the training record** saved with the FDM: its common fields (:meth:`TrainingLoop.training_record`).

A phase says what one step does (:meth:`~TrainingLoop.train_step`), what follows it (:meth:`~TrainingLoop.after_step`),
what its checkpoints hold beyond the common part, and what the run produces (:meth:`~TrainingLoop.finish`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fdm.config_io import read_json
from fdm.errors import CheckpointError, ConfigError, UsageError
from fdm.module import FDM
from fdm.precision import load_scaler_state
from fdm.training.checkpointing import (
    _capture_rng_state,
    _restore_rng_state,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fdm.training.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    derived_seed,
    init_distributed,
)
from fdm.training.schedule import RunBudget

__all__ = ["TrainingLoop", "optimizer_step"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    clip: float | None = None,
    parameters: Iterable[nn.Parameter] = (),
) -> None:
    """One update at the run's precision: the gradients of ``loss`` (scaled by ``scaler`` for fp16), clipped to norm
    ``clip`` over ``parameters`` when ``clip`` is given, then the optimiser's step (which the fp16 scaler skips when
    the scaled gradients overflowed)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, clip)
    scaler.step(optimizer)
    scaler.update()


class TrainingLoop:
    """One training run's step loop; the base of :class:`~fdm.training.Phase2Trainer` and
    :class:`~fdm.training.Phase3Trainer` (see the module's docstring for what it does for them).

    Args:
        config: the run's config (a dataclass with ``to_dict()`` and the fields ``output_dir``, ``device``,
            ``seed``, ``batch_size``, ``lr``, ``warmup_steps``, ``hole_ratio``, ``precision``, ``log_every``,
            ``checkpoint_every``, ``keep_checkpoints`` and ``progress``).
        device: the run's device when ``config.device`` is None.

    After :meth:`train`: ``step`` is the number of steps done, ``seconds`` the run's wall time (over resumes),
    ``train_seconds`` the time spent in the loop (over resumes), ``last_record`` the last ``"train"`` record.
    """

    #: The phase number written to and checked in checkpoints.
    phase: ClassVar[int]
    #: Config fields that must not change when a run is resumed.
    resume_fields: ClassVar[tuple[str, ...]]
    #: Also write a checkpoint at the run's last step (phase 3: its ``fdm/`` result can be fine-tuned further).
    checkpoint_at_end: ClassVar[bool] = False
    #: What the phase writes into ``output_dir`` besides ``run.json``, ``metrics.jsonl`` and ``checkpoints/``.
    results: ClassVar[tuple[str, ...]]

    def __init__(self, config: Any, device: str | torch.device):
        self.config = config
        self.ctx: DistContext = init_distributed(config.device if config.device is not None else device)
        self.device = self.ctx.device
        self.output_dir = Path(config.output_dir)
        self.step = 0
        self.seconds = 0.0
        self.train_seconds = 0.0
        self.last_record: dict[str, Any] | None = None
        self._unlogged: dict[str, list[float]] = {}  # this process's loss terms since the last record

    @property
    def checkpoint_dir(self) -> Path:
        """Folder of the resumable checkpoints (``<output_dir>/checkpoints``)."""
        return self.output_dir / "checkpoints"

    # --- what a phase provides ------------------------------------------------------------------------

    def prepare(self) -> RunBudget:
        """Get ready for the first step to run (after any resume) and return the run's budget."""
        raise NotImplementedError

    def train_step(self, progress: float) -> dict[str, float]:
        """Run optimiser step ``self.step`` (0-based), which brings the run to ``progress``; return its loss terms
        (``"loss"`` among them), checked finite before any update."""
        raise NotImplementedError

    def after_step(self, progress: float) -> bool:
        """Called after each step and its record; return True to stop the run early."""
        return False

    def learning_rate(self) -> float:
        """The rate of the step just run, for the records."""
        raise NotImplementedError

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """The modules whose weights a checkpoint holds, by name (DDP unwrapped)."""
        raise NotImplementedError

    def checkpoint_objects(self) -> dict[str, Any]:
        """Objects with ``state_dict`` / ``load_state_dict`` (optimisers, schedulers) a checkpoint holds, by name."""
        raise NotImplementedError

    def gradient_scalers(self) -> dict[str, torch.amp.GradScaler]:
        """The run's gradient scalers by name (restored where both runs use fp16, afresh otherwise)."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, Any]:
        """What else of the phase a checkpoint holds (plain data and tensors)."""
        return {}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` saved."""

    def run_identity(self) -> dict[str, Any]:
        """The run's :func:`~fdm.training.checkpointing.run_identity`, compared on resume."""
        raise NotImplementedError

    def finish(self, complete: bool) -> FDM:
        """The run's result once the loop has stopped (``complete``: at its end rather than at ``until``)."""
        raise NotImplementedError

    # --- the output folder ----------------------------------------------------------------------------

    def earlier_run(self) -> list[Path]:
        """What ``output_dir`` holds of an earlier run (its record, metrics, checkpoints and results); the feature
        cache, keyed by its contents, is not part of it."""
        names = (RUN_FILE, METRICS_FILE, self.checkpoint_dir.name, *self.results)
        return [self.output_dir / name for name in names if (self.output_dir / name).exists()]

    def start_point(self, *, resume: bool, overwrite: bool = False) -> Path | None:
        """Where a command's run starts (``fdm train`` / ``fdm finetune``): the latest checkpoint with ``resume``
        (None, and a log line, when there is none yet); with ``overwrite``, from scratch after removing the earlier
        run's files (:meth:`earlier_run`); otherwise from scratch in a folder without an earlier run.

        Raises:
            UsageError: ``resume`` and ``overwrite`` together.
            CheckpointError: a new run into a folder that holds an earlier run's files (its pruning would keep the
                earlier run's higher step numbers and a later resume would continue the wrong run).
        """
        if resume and overwrite:
            raise UsageError("--resume continues the run in --out and --overwrite replaces it: give one of them.")
        earlier = self.earlier_run()
        if resume:
            latest = latest_checkpoint(self.checkpoint_dir)
            if latest is None:
                logger.info("--resume: no checkpoint in %s yet, starting from scratch", self.checkpoint_dir)
            return latest
        if earlier and overwrite and self.ctx.is_main:
            logger.info("--overwrite: removing the earlier run's %s", ", ".join(p.name for p in earlier))
            for path in earlier:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        elif earlier and not overwrite:
            raise CheckpointError(f"{self.output_dir} holds an earlier run ({', '.join(p.name for p in earlier)}): "
                                  "continue it with --resume, replace it with --overwrite, or choose another --out.")
        barrier(self.ctx)
        return None

    def _run_record(self) -> dict[str, Any]:
        return {"format": "fdm-vq training run", "phase": self.phase, "config": self.config.to_dict(),
                "data": self.run_identity(), "world_size": self.ctx.world_size}

    def _check_output_dir(self) -> None:
        """Refuse to run into a folder whose ``run.json`` records another run."""
        record_file = self.output_dir / RUN_FILE
        if not record_file.exists():
            return
        try:
            saved = read_json(record_file, "the run's record")
        except ConfigError as err:
            raise CheckpointError(f"{err} Remove it, or start the run in another folder.") from err
        record = self._run_record()
        check_resumable(self.output_dir, saved, phase=self.phase, config=record["config"], fields=self.resume_fields,
                        identity=record["data"], world_size=self.ctx.world_size)

    def _write_run_record(self) -> None:
        """Write ``run.json`` (once the run is ready for its first step: a run that fails while preparing leaves
        none)."""
        if self.ctx.is_main and not (self.output_dir / RUN_FILE).exists():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / RUN_FILE).write_text(json.dumps(self._run_record(), indent=1))

    # --- the loop -------------------------------------------------------------------------------------

    def train(self, resume_from: str | Path | None = None, *, until: int | None = None) -> FDM:
        """Run (or resume) the training.

        Args:
            resume_from: a checkpoint folder written by an earlier run of the same kind (see
                :func:`~fdm.training.latest_checkpoint`); the run continues exactly where it stopped, a run with a
                time budget with the time it had left.
            until: stop after this step with a checkpoint instead of running to the end (for jobs with a time
                limit; resume later). The result is then not saved.

        Returns:
            What the phase produces (:meth:`finish`).
        """
        self._check_output_dir()
        started = time.perf_counter() - self.seconds
        if resume_from is not None:
            self.resume(resume_from)
            started = time.perf_counter() - self.seconds
        budget = self.prepare()
        self._write_run_record()
        loop_start = time.perf_counter() - self.train_seconds
        progress = self._progress(budget, self.step, loop_start)
        by_steps = budget.seconds is None
        bar = tqdm(total=budget.steps if by_steps else 100, initial=self.step if by_steps else round(100 * progress),
                   desc=f"FDM phase {self.phase}", unit="step" if by_steps else "%",
                   disable=not (self.config.progress and self.ctx.is_main))
        stopped = False
        while progress < 1.0 and not stopped and (until is None or self.step < until):
            logs = self.train_step(self._progress(budget, self.step + 1, loop_start))
            self.step += 1
            for name, value in logs.items():
                self._unlogged.setdefault(name, []).append(value)
            before, progress = progress, self._progress(budget, self.step, loop_start)
            bar.update(1 if by_steps else round(100 * progress) - round(100 * before))
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{self.learning_rate():.2e}")
            last = progress >= 1.0 or self.step == until
            if (self.config.log_every and self.step % self.config.log_every == 0) or last:
                self._record_losses(progress)
            stopped = self.after_step(progress)
            self.train_seconds = time.perf_counter() - loop_start
            self.seconds = time.perf_counter() - started
            every = self.config.checkpoint_every
            if (every and self.step % every == 0) or (last and (progress < 1.0 or self.checkpoint_at_end)):
                self.save_checkpoint()
        bar.close()
        if self._unlogged:  # stopped early by after_step
            self._record_losses(progress)
        self.seconds = time.perf_counter() - started
        return self.finish(complete=progress >= 1.0 or stopped)

    def step_seed(self, key: int) -> int:
        """Seed of the random draws (masks) of the current step for ``key`` (a view's index, a process's rank)."""
        return derived_seed(self.config.seed, self.step, key)

    def _progress(self, budget: RunBudget, steps_done: int, loop_start: float) -> float:
        """The run's progress, the same on every process (a time budget runs on each process's clock)."""
        progress = budget.progress(steps_done, time.perf_counter() - loop_start)
        if budget.seconds is None:
            return progress
        return float(all_reduce_mean(torch.tensor(progress, dtype=torch.float64), self.ctx))

    # --- records --------------------------------------------------------------------------------------

    def _record_losses(self, progress: float) -> None:
        means = {name: all_reduce_mean(torch.tensor(float(np.mean(values)), device=self.device), self.ctx).item()
                 for name, values in sorted(self._unlogged.items())}
        self._unlogged = {}
        self.last_record = {"step": self.step, "split": "train", "progress": round(progress, 4),
                            "lr": self.learning_rate(), **means}
        self.log_record(self.last_record)

    def log_record(self, record: dict[str, Any], text: str | None = None) -> None:
        """Append ``record`` (with ``step`` and ``split``) to ``metrics.jsonl`` and log it (as ``text`` when given);
        first process only."""
        if not self.ctx.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        values = "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                           if k not in ("step", "split") and isinstance(v, (int, float)))
        logger.info("%s", text or f"step {record['step']} {record['split']}: {values}")

    def training_record(self) -> dict[str, Any]:
        """The fields of the training record that every phase saves with its FDM."""
        cfg = self.config
        return {"steps": self.step, "batch_size": cfg.batch_size, "world_size": self.ctx.world_size,
                "hole_ratio": list(cfg.hole_ratio) if cfg.hole_ratio is not None else None, "lr": cfg.lr,
                "warmup_steps": cfg.warmup_steps, "seed": cfg.seed, "precision": cfg.precision,
                "seconds": round(self.seconds, 1)}

    # --- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint of the current step (first process; every process waits for it); returns
        its folder on the first process."""
        ranks = all_gather_objects({"rng": _capture_rng_state(), "unlogged": self._unlogged}, self.ctx)
        path = None
        if self.ctx.is_main:
            state = {name: obj.state_dict() for name, obj in self.checkpoint_objects().items()}
            state |= {name: scaler.state_dict() for name, scaler in self.gradient_scalers().items()}
            state |= {"phase": self.phase, "config": self.config.to_dict(), "world_size": self.ctx.world_size,
                      "data": self.run_identity(), "ranks": ranks, "seconds": self.seconds,
                      "train_seconds": self.train_seconds, "last_record": self.last_record,
                      "phase_state": self.checkpoint_state()}
            path = save_checkpoint(self.checkpoint_dir, self.step, self.checkpoint_modules(), state,
                                   keep=self.config.keep_checkpoints)
        barrier(self.ctx)
        return path

    def resume(self, path: str | Path) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` of a run of the same kind.

        ``precision`` may differ from the saved run's (e.g. a run moved to another device): the fp16 loss scale is
        restored where both runs use fp16 and starts afresh otherwise.

        Raises:
            CheckpointError: not a checkpoint of this phase, another config, data, base model or process count
                (naming what differs), or weights that do not fit.
        """
        state = load_checkpoint(path, self.checkpoint_modules(), map_location=self.device)
        check_resumable(path, state, phase=self.phase, config=self.config.to_dict(), fields=self.resume_fields,
                        identity=self.run_identity(), world_size=self.ctx.world_size)
        for name, obj in self.checkpoint_objects().items():
            obj.load_state_dict(state[name])
        for name, scaler in self.gradient_scalers().items():
            load_scaler_state(scaler, state.get(name))
        mine = state["ranks"][self.ctx.rank]
        _restore_rng_state(mine["rng"])
        self._unlogged = {name: list(values) for name, values in mine["unlogged"].items()}
        self.seconds = float(state["seconds"])
        self.train_seconds = float(state["train_seconds"])
        self.last_record = state["last_record"]
        self.load_checkpoint_state(state["phase_state"])
        self.step = int(state["step"])
