"""Stop on SIGINT/SIGTERM (and SIGUSR1 outside SLURM) without losing the run.

Python's default turns SIGINT into a KeyboardInterrupt, on which Lightning tears the run down and
exits with status 1, before anything is saved. Here a signal only asks the Trainer to stop: the
current step finishes, Lightning validates (it does when asked to stop early), the run recorder
writes ``last.ckpt``, and the driver writes results.json with status ``interrupted`` and exits with
128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second SIGINT interrupts at once.

Lightning registers its own SIGTERM handler when fit starts (it raises an exception at the next
batch, before anything is saved); :meth:`GracefulStop.reinstall` puts this one back once training
starts (the run recorder calls it from ``on_train_start``). Under SLURM with Lightning's
auto-requeue, SIGUSR1 and SIGTERM are left to Lightning (it saves a checkpoint and requeues the job).
"""
from __future__ import annotations

import logging
import os
import signal
from types import FrameType

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class GracefulStop:
    """Context manager around ``trainer.fit``: ``received`` is the signal number that stopped the run."""

    def __init__(self, trainer: pl.Trainer, recorder=None) -> None:
        self.trainer, self.recorder = trainer, recorder
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _signals(self) -> list[int]:
        on_slurm = "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")
        wanted = [signal.SIGINT] if on_slurm else [signal.SIGINT, signal.SIGTERM]
        if hasattr(signal, "SIGUSR1") and not on_slurm:
            wanted.append(signal.SIGUSR1)
        return wanted

    def reinstall(self) -> None:
        """Take the signals back from the handlers Lightning installed when fit started."""
        for signum in self._previous:
            try:
                signal.signal(signum, self._handle)
            except ValueError:
                return

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum
        self.trainer.should_stop = True
        if self.recorder is not None:
            self.recorder.stop_requested = True
        log.warning("received %s: stopping after this step; last.ckpt and results.json will be written "
                    "(press Ctrl-C again to stop at once)", signal.Signals(signum).name)

    def __enter__(self) -> "GracefulStop":
        for signum in self._signals():
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a launcher's worker thread): keep the defaults
                break
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    @property
    def exit_code(self) -> int | None:
        return None if self.received is None else 128 + int(self.received)
