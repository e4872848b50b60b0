"""Progress reporting that suits where the output goes: a live bar on a terminal, plain lines in a log.

A tqdm bar written to a file (a SLURM job's log, ``python train.py > run.log``) becomes one physical
line holding hundreds of carriage-return updates, which ``less``, ``tail`` and ``grep`` cannot read.
``progress_bar()`` picks the bar on a terminal and :class:`LineProgress` otherwise.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from numbers import Number

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, TQDMProgressBar

from src.checks import check_positive_int

log = logging.getLogger(__name__)


def progress_bar(refresh_rate: int = 20, every_n_steps: int = 50, terminal: bool | None = None) -> ProgressBar:
    """The progress callback for this process's output.

    Args:
        refresh_rate: batches between redraws of the tqdm bar (terminal).
        every_n_steps: optimizer steps between two plain lines (not a terminal).
        terminal: force one or the other (None: ``sys.stdout.isatty()``).
    """
    if terminal is None:
        terminal = sys.stdout.isatty()
    if terminal:
        return TQDMProgressBar(refresh_rate=refresh_rate)
    return LineProgress(every_n_steps=every_n_steps)


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m05s"``; ``"?"`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _scalars(metrics: dict, prefixes: tuple[str, ...]) -> str:
    shown = []
    for name in sorted(metrics):
        if not name.startswith(prefixes):
            continue
        value = metrics[name]
        value = value.item() if hasattr(value, "numel") and value.numel() == 1 else value
        if isinstance(value, Number):
            shown.append(f"{name}={value:.4g}")
    return " ".join(shown)


class LineProgress(ProgressBar):
    """One plain, self-contained log line every ``every_n_steps`` optimizer steps, e.g.

        epoch 3 step 1200/6000 (20%) | 14.2 steps/s | ETA 5m38s | train/loss=0.0123 val/mse=0.0011

    plus one line after each validation and at the end of testing. Lines go through logging, so they
    reach the console and the run's train.log, with a timestamp. Only rank 0 writes.

    Args:
        every_n_steps: optimizer steps between two lines (positive).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self._enabled = True
        self._last_time: float | None = None
        self._last_step = 0
        self._validation_start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _write(self, line: str) -> None:
        if self._enabled:
            log.info(line)

    def _total_steps(self, trainer: pl.Trainer) -> float:
        try:
            total = float(trainer.estimated_stepping_batches)
        except Exception:  # e.g. an iterable dataset of unknown length
            return math.inf
        return total if total > 0 else math.inf

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_time, self._last_step = time.monotonic(), trainer.global_step
        total = self._total_steps(trainer)
        budget = f"{int(total)} steps" if math.isfinite(total) else "an open number of steps"
        self._write(f"training from step {trainer.global_step}: {budget}, a line every {self.every_n_steps} steps")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:
            return
        now = time.monotonic()
        rate = (step - self._last_step) / max(now - (self._last_time or now), 1e-9)
        self._last_time, self._last_step = now, step
        total = self._total_steps(trainer)
        position = f"step {step}/{int(total)} ({100 * step / total:.0f}%)" if math.isfinite(total) else f"step {step}"
        eta = format_duration((total - step) / rate) if math.isfinite(total) and rate > 0 else "?"
        metrics = _scalars(trainer.callback_metrics, ("train/", "val/"))
        self._write(f"epoch {trainer.current_epoch} {position} | {rate:.3g} steps/s | ETA {eta} | {metrics}".rstrip())

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_time is not None:  # the training rate excludes the time spent validating
            self._last_time += time.monotonic() - self._validation_start
        if trainer.sanity_checking:
            return
        self._write(f"validation at epoch {trainer.current_epoch} step {trainer.global_step}: "
                    f"{_scalars(trainer.callback_metrics, ('val/',))}")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(f"test: {_scalars(trainer.callback_metrics, ('test/',))}")
