"""Real-time recurrent learning as a learning rule: exact gradients computed forward in time.

Each training sequence runs forward in chunks through :class:`src.learning.RTRL`; the loss of every
chunk turns into exact parameter gradients at once (no past state stored, nothing truncated), and the
optimizer steps every ``update_every`` steps inside the sequence, or once at its end (None: then the
gradient equals BPTT's). Memory does not grow with the sequence length. The objective keeps its loss,
metrics, validation and test; with an objective that carries its state across batches (the stream
objective) RTRL keeps its hidden states and sensitivities across batches too, exact through the
whole stream.
"""
from __future__ import annotations

from typing import Callable

import torch

from lightning_modules.carried_state import host_resets
from lightning_modules.learning.base import LearningRule
from src.batch import SequenceBatch, as_batch
from src.checks import check_positive_int
from src.learning import RTRL


class RealTimeRecurrentLearning(LearningRule):
    """Train with RTRL (Lightning's manual optimization).

    Args:
        mode: "exact" or "layer_local" (see :mod:`src.learning.rtrl`).
        update_every: optimizer step every k steps inside a sequence (k >= 1), or None: once per
            sequence, at its end (the exact gradient of the whole sequence's loss).
        chunk_size: steps processed together (memory ~ chunk_size * B * H, independent of T).
        sensitivity_backend: the sensitivity loop, one of :data:`src.kernels.rtrl.SENSITIVITY_BACKENDS`.

    Supports the readouts "last" (a loss at the sequence's end) and "all" (a loss at every step, each
    chunk weighted by its share of the steps, so the sum equals the objective's mean loss). Sequences
    must have equal lengths (no ``lengths``). Networks: diagonal recurrences (see
    :class:`src.learning.RTRL`); the objective must list "rtrl" in its ``learning_rules``.
    """

    name = "rtrl"

    def __init__(self, mode: str = "exact", update_every: int | None = None, chunk_size: int = 100,
                 sensitivity_backend: str = "auto") -> None:
        self.mode, self.sensitivity_backend = mode, sensitivity_backend
        self.update_every = None if update_every is None else check_positive_int("learning.update_every", update_every)
        self.chunk_size = check_positive_int("learning.chunk_size", chunk_size)
        self.sensitivities: RTRL | None = None

    def attach(self, objective) -> None:
        readout = getattr(objective.net, "readout", None)
        if readout not in ("last", "all"):
            raise ValueError(f"learning=rtrl supports task.readout 'last' or 'all', got {readout!r}")
        objective.automatic_optimization = False
        self.sensitivities = RTRL(objective.net, mode=self.mode, backend=self.sensitivity_backend)

    def _start(self, objective, batch: SequenceBatch) -> None:
        """New sequences start from zero state and sensitivities; a stream goes on where it was."""
        batch_size = batch.inputs.shape[0]
        rtrl = self.sensitivities
        fresh = rtrl.hidden is None or rtrl.hidden[0].shape[0] != batch_size
        carries = getattr(objective, "carries_state", False)
        all_reset, any_reset = objective.reset_flags(batch.reset) if carries else host_resets(batch.reset)
        if not carries or fresh or batch.reset is None or all_reset:
            rtrl.reset(batch_size)
        elif any_reset:
            rtrl.reset_streams(batch.reset)

    def _chunk_loss(self, objective, targets: torch.Tensor, start: int, steps: int, total: int) -> Callable:
        """loss_fn for the chunk of steps [start, start + steps) of a sequence of ``total`` steps."""
        metric = objective.metrics["train_metric"]
        if objective.net.readout == "last":
            def last(predictions):
                if start + steps < total:
                    return None
                metric.update(predictions[:, -1].detach(), targets)
                return objective.loss(predictions[:, -1], targets)
            return last
        chunk_targets = targets[:, start:start + steps]
        if getattr(objective, "carries_state", False):
            def stream(predictions):
                scored = objective.target_steps(predictions, chunk_targets)
                if scored[1].numel() == 0:
                    return None
                metric.update(scored[0].detach(), scored[1])
                return objective.loss(predictions, chunk_targets)
            return stream

        def every_step(predictions):
            metric.update(predictions.detach(), chunk_targets)
            return objective.loss(predictions, chunk_targets) * (steps / total)
        return every_step

    @staticmethod
    def _update(objective) -> None:
        optimizer = objective.optimizers()
        optimizer.step()
        optimizer.zero_grad()
        objective.apply_constraints()
        scheduler = objective.lr_schedulers()
        if scheduler is not None and objective.hparams.scheduler_interval == "step":
            scheduler.step()

    def training_step(self, objective, batch) -> torch.Tensor:
        batch = as_batch(batch)
        if batch.lengths is not None:
            raise ValueError("learning=rtrl needs sequences of equal length (the batch has `lengths`)")
        self._start(objective, batch)
        total_steps = batch.inputs.shape[1]
        span = min(self.update_every or total_steps, self.chunk_size)
        total_loss, since_update, pending = batch.inputs.new_zeros(()), 0, False
        for start in range(0, total_steps, span):
            chunk = batch.inputs[:, start:start + span]
            loss, _ = self.sensitivities.accumulate(
                chunk, self._chunk_loss(objective, batch.targets, start, chunk.shape[1], total_steps))
            if loss is not None:
                objective.check_training_loss(loss, inputs=chunk)
                total_loss, pending = total_loss + loss, True
            since_update += chunk.shape[1]
            # No step where no loss has arrived since the last one (e.g. a "last" readout mid-sequence).
            if pending and self.update_every is not None and since_update >= self.update_every:
                self._update(objective)
                since_update, pending = 0, False
        if pending:
            self._update(objective)
        batch_size = batch.inputs.shape[0]
        metric = objective.metrics["train_metric"]
        if objective.logging_step():  # computing a metric reads it back: only on the steps that write it
            objective.log("train/loss", total_loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
            if metric.update_count:
                objective.log(f"train/{objective.metric_name}", metric.compute(), on_step=True, on_epoch=False,
                              batch_size=batch_size)
        metric.reset()
        return total_loss

    def on_train_epoch_end(self, objective) -> None:
        # Manual optimization: Lightning steps no scheduler, so the epoch-interval ones step here.
        scheduler = objective.lr_schedulers()
        if scheduler is None or objective.hparams.scheduler_interval != "epoch":
            return
        scheduler.step()  # plateau schedules are the PlateauReloadBest callback, never a torch scheduler
