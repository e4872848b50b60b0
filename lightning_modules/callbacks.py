"""Callbacks beyond Lightning's own."""
from __future__ import annotations

import copy
import logging

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class PlateauReloadBest(pl.Callback):
    """The IndRNN papers' schedule: on a plateau, go back to the best weights and lower the LR.

    After each validation: if ``monitor`` improved, remember the weights and optimizer state;
    otherwise count a bad validation. After more than ``patience`` bad validations, reload
    the best weights and optimizer state, multiply the learning rate by ``factor`` and (as the
    official code's ``pThre / reduced``) halve the patience. Training stops once the learning rate
    falls below ``min_lr``.

    The remembered best weights and optimizer state travel in every checkpoint (this callback's
    state), so a resumed run goes back to the same best weights at its next plateau as an
    uninterrupted run would.

    Args:
        monitor: metric name, e.g. "val/acc".
        mode: "min" or "max".
        factor: learning-rate multiplier at each reduction (paper: 0.1).
        patience: bad validations tolerated before the first reduction.
        min_lr: stop when the learning rate falls below this (paper: 1e-6).
        shrink_patience: halve the patience at every reduction (official code).
        official_count: reduce on the (patience + 2)-th consecutive bad validation, as the official
            loop does (its test runs before the counter is incremented); False: the (patience + 1)-th.
    """

    def __init__(self, monitor: str, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 min_lr: float = 1e-6, shrink_patience: bool = True, official_count: bool = False) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        self.monitor, self.mode, self.factor, self.patience = monitor, mode, factor, patience
        self.min_lr, self.shrink_patience, self.official_count = min_lr, shrink_patience, official_count
        self.best: float | None = None
        self.best_state: dict | None = None
        self.bad_validations, self.reductions = 0, 0

    def current_patience(self) -> int:
        return int(self.patience / 2 ** self.reductions + 0.5) if self.shrink_patience else self.patience

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        optimizer = trainer.optimizers[0]
        if self._improved(value):
            self.best, self.bad_validations = value, 0
            self.best_state = {"model": copy.deepcopy(pl_module.state_dict()),
                               "optimizer": copy.deepcopy(optimizer.state_dict())}
            return
        self.bad_validations += 1
        if self.bad_validations <= self.current_patience() + (1 if self.official_count else 0):
            return
        new_lr = optimizer.param_groups[0]["lr"] * self.factor
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state["model"])
            optimizer.load_state_dict(self.best_state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = new_lr
        self.reductions += 1
        self.bad_validations = 0
        log.info("%s plateaued at %.5g: best weights reloaded, learning rate now %.3g", self.monitor, self.best, new_lr)
        if new_lr < self.min_lr:
            log.info("learning rate %.3g < %.3g: stopping", new_lr, self.min_lr)
            trainer.should_stop = True

    def state_dict(self) -> dict:
        # The best weights go with the counters: best.ckpt need not hold them (another monitor, another
        # callback's choice), and without them a resumed run's first plateau could not go back.
        return {"best": self.best, "bad_validations": self.bad_validations, "reductions": self.reductions,
                "best_state": self.best_state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict["best"]
        self.bad_validations, self.reductions = state_dict["bad_validations"], state_dict["reductions"]
        # Checkpoints written before the best weights were saved: the next improvement sets them again.
        self.best_state = state_dict.get("best_state")

