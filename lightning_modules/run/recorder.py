"""What keeps a run's record whole: ``last.ckpt`` always the latest state, random-number states for an
exact resume, and a results.json that says how far the run got (with the best validation, read from
the run's one :class:`~lightning_modules.callbacks.BestValidation`).

The run driver adds :class:`RunRecorder` to every training run (it is not a config choice: a run
without it could not be resumed or reported).
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from lightning_modules.callbacks import BestValidation
from lightning_modules.run.record import RUNNING, write_record
from lightning_modules.run.rundir import CHECKPOINT_DIR, LAST_CHECKPOINT
from storage.atomic import replace_atomically


def rng_states() -> dict:
    """Python, numpy and torch random states as types that load under ``torch.load(weights_only=True)``."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                        float(cached_gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Inverse of :func:`rng_states`."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint_atomically(trainer: pl.Trainer, target: Path) -> None:
    """``trainer.save_checkpoint`` through :func:`storage.atomic.replace_atomically`: a crash while
    writing never leaves a broken checkpoint under ``target``, and a failed write (a full disk) leaves
    the previous ``target`` as it was. Every rank must call it (Lightning synchronises); rank 0 writes."""
    if not trainer.is_global_zero:  # under DDP only rank 0 writes; the others join its collectives
        trainer.save_checkpoint(target, weights_only=False)
        return
    with replace_atomically(target) as temporary:
        trainer.save_checkpoint(temporary, weights_only=False)


class RunRecorder(pl.Callback):
    """Keeps ``<run>/checkpoints/last.ckpt`` and ``<run>/results.json`` current during training.

    * ``last.ckpt`` is written after every validation and at the end of every epoch (atomically),
      and once more when a stop was requested (SIGINT/SIGTERM): it is always the latest state.
    * The best validation's metrics, step and epoch (``best.best``, the run's one
      :class:`~lightning_modules.callbacks.BestValidation`) go into results.json.
    * Random states go into every checkpoint and come back on resume, so a run resumed from an
      end-of-epoch ``last.ckpt`` continues exactly as it would have without the interruption.
    * results.json is rewritten (status ``running``) after every validation, so a run killed without
      warning still says how far it got; the driver writes the final status.

    Args:
        output_dir: the run directory.
        best: the run's BestValidation (its ``on_validation_end`` runs before this one's).
        record: the driver's results dict, updated in place and written as results.json.
        seconds_before: training time of earlier sessions of this run (resumes), added to this one's.
    """

    def __init__(self, output_dir: str | os.PathLike, best: BestValidation, record: dict,
                 seconds_before: float = 0.0) -> None:
        self.output_dir, self.best_validation = Path(output_dir), best
        self.record, self.seconds_before, self.started = record, seconds_before, time.time()
        self.saved_step: int | None = None
        self.stop_requested = False
        self.training_started = False  # Lightning restored the checkpoint (if any) and began to train
        self.signal_guard = None  # the driver's GracefulStop, re-armed once Lightning has set its handlers

    @property
    def last_checkpoint(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR / LAST_CHECKPOINT

    def seconds(self) -> float:
        return round(self.seconds_before + time.time() - self.started, 2)

    def save_last(self, trainer: pl.Trainer) -> None:
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        self.last_checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint_atomically(trainer, self.last_checkpoint)
        self.saved_step = trainer.global_step

    @property
    def best(self) -> dict | None:
        """The best validation: ``{"step", "epoch", "val/...": value}`` (None before the first)."""
        return self.best_validation.best

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.signal_guard is not None:
            self.signal_guard.reinstall()
        # From here this session owns the record (a resumed run's earlier record is in resume_history).
        self.training_started = True
        if trainer.is_global_zero and not getattr(trainer, "fast_dev_run", False):
            self.record.update(status=RUNNING, steps=trainer.global_step, epochs=trainer.current_epoch,
                               seconds=self.seconds(), best=self.best)
            write_record(self.output_dir, self.record)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
                   if key.startswith("val/") and not key.endswith("_best") and torch.as_tensor(value).numel() == 1}
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # epoch ends save in on_train_epoch_end
            self.save_last(trainer)
        self.write_progress(trainer, metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop_requested and self.saved_step != trainer.global_step:
            self.save_last(trainer)

    def write_progress(self, trainer: pl.Trainer, last_metrics: dict) -> None:
        if not trainer.is_global_zero or getattr(trainer, "fast_dev_run", False):
            return
        self.record.update(status=RUNNING, steps=trainer.global_step, epochs=trainer.current_epoch,
                           seconds=self.seconds(), best=self.best,
                           **{f"last_{key}": value for key, value in last_metrics.items()})
        write_record(self.output_dir, self.record)

    # Random states travel with every checkpoint (the best validation in BestValidation's state).
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states()
        checkpoint["run_seconds"] = self.seconds()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
