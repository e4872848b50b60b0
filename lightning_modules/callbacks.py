"""Callbacks beyond Lightning's own: the run's one "best validation" and the one plateau schedule.

"Best" is decided in one place, :class:`BestValidation`, and every consumer reads it:

* it compares the monitored metric with the best so far after each validation (strictly better,
  finite values only) and logs ``<monitor>_best`` (e.g. ``val/mse_best``) with the validation's
  metrics, so TensorBoard, the progress lines, ``ModelCheckpoint`` and ``EarlyStopping`` (both
  configured to monitor ``<monitor>_best``, conf/callbacks/default.yaml) see the same value: the
  best rises exactly when the monitored metric beats it, so a checkpoint is saved and the patience
  restarts exactly then;
* it keeps that validation's metrics with its step and epoch (:attr:`BestValidation.best`), which
  the run recorder writes into results.json, and carries them in checkpoints (its state);
* :class:`PlateauReloadBest`, the plateau schedule, *is* a BestValidation: it counts the
  validations that did not improve it. A run has exactly one BestValidation: the configured
  plateau schedule when there is one, else the run driver's (or, outside the driver, the one the
  objective adds for its own metric, :meth:`SequenceObjective.configure_callbacks`).
"""
from __future__ import annotations

import copy
import logging
import math

import pytorch_lightning as pl
import torch

from src.checks import check_choice

log = logging.getLogger(__name__)


def best_validation_of(trainer: pl.Trainer) -> "BestValidation | None":
    """The run's BestValidation among ``trainer.callbacks`` (None if it has none)."""
    return next((cb for cb in getattr(trainer, "callbacks", ()) if isinstance(cb, BestValidation)), None)


class BestValidation(pl.Callback):
    """The best validation of a run: its monitored value, its metrics, its step and epoch.

    After each validation (not the sanity check) the monitored value ``trainer.callback_metrics[
    monitor]`` is compared with the best so far: an improvement is a finite value strictly lower
    ("min") or higher ("max"). A non-finite value never improves and stops the run (as Lightning's
    ``EarlyStopping(check_finite=True)`` did on the raw metric). The decision is made in
    ``on_validation_epoch_end``, where ``<monitor>_best`` is logged like any metric, so every other
    callback's ``on_validation_end`` reads it; the validation's metrics (all scalar ``val/*``,
    including those an objective logs at the epoch's end) are kept in ``on_validation_end``.

    Args:
        monitor: the metric, e.g. "val/acc" (the task's ``task.monitor``).
        mode: "min" or "max".

    Attributes:
        best: ``{"step": ..., "epoch": ..., "val/...": value, ...}`` of the best validation, or None.
        improved: whether the latest validation improved the best.
    """

    def __init__(self, monitor: str, mode: str = "min") -> None:
        check_choice("mode", mode, ("min", "max"))
        self.monitor, self.mode = monitor, mode
        self.best: dict | None = None
        self.improved = False
        self._decided = False  # this validation's comparison is made (on_validation_epoch_end)

    @property
    def best_value(self) -> float | None:
        """The best monitored value so far (None before the first validation)."""
        return None if self.best is None else self.best[self.monitor]

    @property
    def best_name(self) -> str:
        """The logged name of the best value, e.g. ``val/mse_best``."""
        return f"{self.monitor}_best"

    def is_better(self, value: float) -> bool:
        """Whether ``value`` improves on the best so far (finite and strictly better)."""
        if not math.isfinite(value):
            return False
        best = self.best_value
        return best is None or (value < best if self.mode == "min" else value > best)

    def decide(self, trainer: pl.Trainer) -> None:
        """Compare this validation's monitored value with the best (once per validation)."""
        if self._decided:
            return
        if self.monitor not in trainer.callback_metrics:
            logged = ", ".join(sorted(k for k in trainer.callback_metrics if k.startswith("val/"))) or "nothing"
            raise ValueError(f"the monitored metric {self.monitor} was not logged by the validation (it logged "
                             f"{logged}): set task.monitor to one of them")
        value = float(trainer.callback_metrics[self.monitor])
        self.improved, self._decided = self.is_better(value), True
        if self.improved:  # metrics, step and epoch are filled in at on_validation_end
            self.best = {self.monitor: value}
        elif not math.isfinite(value):
            log.warning("%s = %s is not finite (best %s): stopping", self.monitor, value, self.best_value)
            trainer.should_stop = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.decide(trainer)  # the epoch's metrics are computed by now (Lightning reached the epoch end)
        if self.best is not None:
            pl_module.log(self.best_name, self.best_value, prog_bar=True, sync_dist=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.decide(trainer)  # a no-op after on_validation_epoch_end; here when called on its own
        self._decided = False
        if self.improved:
            metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
                       if key.startswith("val/") and not key.endswith("_best") and torch.as_tensor(value).numel() == 1}
            self.best = {"step": getattr(trainer, "global_step", None), "epoch": getattr(trainer, "current_epoch", None),
                         **metrics}

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict["best"]


class PlateauReloadBest(BestValidation):
    """The one plateau schedule: after ``patience`` validations without a new best, lower the
    learning rate (optionally going back to the best weights first); stop, or hold, below ``min_lr``.

    It is the run's :class:`BestValidation` (a validation is "bad" when it does not improve the best),
    so checkpointing, early stopping, the schedule and results.json agree on every improvement.
    ``scheduler=plateau`` configures it as torch's ReduceLROnPlateau (no reload, fixed patience, the
    rate held at ``min_lr``); ``callbacks=official_indrnn`` as the IndRNN papers' code (reload the best
    weights and optimizer state, patience halved at each reduction, stop below ``min_lr``).

    Each reduction multiplies every parameter group's learning rate by ``factor`` (the rates before a
    reload: a reload brings back the optimizer state of the best validation, whose rates may be higher).
    The counters and the remembered best weights travel in every checkpoint (this callback's state),
    so a resumed run reduces, and goes back to the same weights, exactly as an uninterrupted run.

    Args:
        monitor: metric name, e.g. "val/acc" (the task's ``task.monitor``).
        mode: "min" or "max".
        factor: learning-rate multiplier at each reduction, in (0, 1) (papers: 0.1 or 0.2).
        patience: bad validations tolerated before the first reduction.
        min_lr: the lowest learning rate (paper: 1e-6).
        shrink_patience: halve the patience at every reduction (official code's ``pThre / reduced``).
        official_count: reduce on the (patience + 2)-th consecutive bad validation, as the official
            loop does (its test runs before the counter is incremented); False: the (patience + 1)-th.
        reload_best: go back to the best weights and optimizer state before lowering the rate.
        stop_below_min_lr: stop training once a reduction takes the rate below ``min_lr`` (official);
            False: the rate is held at ``min_lr`` and training goes on (torch's ReduceLROnPlateau).
    """

    def __init__(self, monitor: str, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 min_lr: float = 1e-6, shrink_patience: bool = True, official_count: bool = False,
                 reload_best: bool = True, stop_below_min_lr: bool = True) -> None:
        super().__init__(monitor, mode)
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {patience!r}")
        self.factor, self.patience, self.min_lr = factor, patience, min_lr
        self.shrink_patience, self.official_count = shrink_patience, official_count
        self.reload_best, self.stop_below_min_lr = reload_best, stop_below_min_lr
        self.best_state: dict | None = None  # {"model", "optimizer"} state dicts at the best validation
        self.bad_validations, self.reductions = 0, 0

    def current_patience(self) -> int:
        return int(self.patience / 2 ** self.reductions + 0.5) if self.shrink_patience else self.patience

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        super().on_validation_end(trainer, pl_module)
        optimizer = trainer.optimizers[0]
        if self.improved:
            self.bad_validations = 0
            if self.reload_best:
                self.best_state = {"model": copy.deepcopy(pl_module.state_dict()),
                                   "optimizer": copy.deepcopy(optimizer.state_dict())}
            return
        self.bad_validations += 1
        if self.bad_validations <= self.current_patience() + (1 if self.official_count else 0):
            return
        rates = [group["lr"] * self.factor for group in optimizer.param_groups]
        if self.reload_best and self.best_state is not None:
            pl_module.load_state_dict(self.best_state["model"])
            optimizer.load_state_dict(self.best_state["optimizer"])
        if not self.stop_below_min_lr:
            rates = [max(rate, self.min_lr) for rate in rates]
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        self.reductions += 1
        self.bad_validations = 0
        log.info("%s plateaued at %.5g: %slearning rate now %.3g", self.monitor, self.best_value,
                 "best weights reloaded, " if self.reload_best else "", rates[0])
        if self.stop_below_min_lr and rates[0] < self.min_lr:
            log.info("learning rate %.3g < %.3g: stopping", rates[0], self.min_lr)
            trainer.should_stop = True

    def state_dict(self) -> dict:
        # The best weights go with the counters: best.ckpt need not hold them (a run may keep no best
        # checkpoint), and without them a resumed run's first plateau could not go back.
        return {**super().state_dict(), "bad_validations": self.bad_validations, "reductions": self.reductions,
                "best_state": self.best_state}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.bad_validations, self.reductions = state_dict["bad_validations"], state_dict["reductions"]
        self.best_state = state_dict["best_state"]
