"""Online training with real-time recurrent learning (RTRL), and the objective of unbounded streams.

``learning=rtrl`` (conf/learning/rtrl.yaml) replaces the task's objective class with
:func:`rtrl_objective`, which builds the same objective (same loss, metrics, validation and test)
trained by :class:`OnlineLearning`: Lightning's manual optimization runs each training sequence
forward in chunks through :class:`src.learning.RTRL`; the loss of every chunk turns into exact
parameter gradients at once (no past state stored, nothing truncated), and the optimizer steps every
``update_every`` steps inside the sequence, or once at its end (null: then the gradient equals
BPTT's). Memory does not grow with the sequence length.

:class:`StreamRegressionModule` is the objective of the streaming tasks (conf/task/streaming_adding.yaml):
per-step regression where only the steps with a finite target count, on B parallel streams cut
into consecutive segments. Trained by backpropagation it is truncated BPTT: the state is carried
from one segment to the next, detached, so no gradient crosses a segment boundary. Trained with
``learning=rtrl`` it is exact through the whole stream.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch.nn import functional as F

from lightning_modules.base import SequenceObjective
from lightning_modules.carried_state import HostResetFlags, host_resets
from lightning_modules.regression import SequenceRegressionModule
from src.batch import SequenceBatch, as_batch
from src.checks import check_positive_int
from src.layers.common import apply_constraints
from src.learning import RTRL
from src.state import detach_state


class StreamRegressionModule(HostResetFlags, SequenceRegressionModule):
    """Per-step MSE over the steps with a finite target, on consecutive segments of B streams.

    Batches (:class:`src.batch.SequenceBatch`): inputs (B, T, I), targets (B, T, O) float, NaN at
    steps without a target, ``reset`` (B,) bool where a stream starts afresh. The network's state
    is carried across batches of each stage (truncated BPTT in training: detached at every segment
    boundary) and restarted where ``reset`` is set. Logs ``{stage}/loss`` and ``{stage}/mse`` over the
    target steps. (Other arguments as :class:`lightning_modules.regression.SequenceRegressionModule`.)
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["per_step_targets"] = True
        super().__init__(*args, **kwargs)
        self.carried: dict[str, object] = {}

    @staticmethod
    def target_steps(predictions: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, O) predictions and targets -> those of the steps with a finite target, (N, O) each."""
        mask = torch.isfinite(targets).all(dim=-1)
        return predictions[mask], targets[mask]

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """MSE over the target steps; 0 (still connected to the graph) when a segment has none."""
        predictions, targets = self.target_steps(predictions, targets)
        if targets.numel() == 0:
            return predictions.sum() * 0.0
        return F.mse_loss(predictions, targets)

    def _carried_state(self, batch: SequenceBatch, stage: str):
        state = self.carried.get(stage)
        all_reset, any_reset = self.reset_flags(batch.reset)
        if state is None or batch.reset is None or all_reset:
            return None
        if any_reset:  # restart the streams that begin here
            keep = (~batch.reset).to(batch.inputs.dtype).view(1, -1, 1)
            state = [h * keep.to(h.device) for h in state]
        return state

    def _step(self, batch, stage: str) -> torch.Tensor:
        batch = as_batch(batch)
        predictions, state = self.net(batch.inputs, self._carried_state(batch, stage))
        self.carried[stage] = detach_state(state)
        loss = self.loss(predictions, batch.targets)
        if stage == "train":
            self.check_training_loss(loss)
        scored = self.target_steps(predictions.detach(), batch.targets)
        metric = self.metrics[f"{stage}_metric"]
        if scored[1].numel():
            metric.update(*scored)
        self.log_loss(stage, loss, batch.inputs.shape[0])
        if stage != "train" and metric.update_count:
            self.log(f"{stage}/{self.metric_name}", metric, on_epoch=True, prog_bar=True,
                     batch_size=batch.inputs.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self.carried.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self.carried.pop("test", None)


class OnlineLearning:
    """Mixin that trains an objective with RTRL (put it before the objective class in the bases).

    Args:
        rtrl_mode: "exact" or "layer_local" (see :mod:`src.learning.rtrl`).
        update_every: optimizer step every k steps inside a sequence (k >= 1), or None: once per
            sequence, at its end (the exact gradient of the whole sequence's loss).
        chunk_size: steps processed together (memory ~ chunk_size * B * H, independent of T).
        sensitivity_backend: "auto", "torch", "cpu" (numba) or "triton".
        (the rest: the objective's own arguments)

    Supports the readouts "last" (a loss at the sequence's end) and "all" (a loss at every step,
    each chunk weighted by its share of the steps, so the sum equals the objective's mean loss).
    Sequences must have equal lengths (no ``lengths``). A stream objective
    (:class:`StreamRegressionModule`) keeps RTRL's state and sensitivities across batches.
    """

    def __init__(self, *args, rtrl_mode: str = "exact", update_every: int | None = None, chunk_size: int = 100,
                 sensitivity_backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.update_every = None if update_every is None else check_positive_int("learning.update_every", update_every)
        self.chunk_size = check_positive_int("learning.chunk_size", chunk_size)
        readout = getattr(self.net, "readout", None)
        if readout not in ("last", "all"):
            raise ValueError(f"learning=rtrl supports task.readout 'last' or 'all', got {readout!r}")
        self.automatic_optimization = False
        self.rtrl = RTRL(self.net, mode=rtrl_mode, backend=sensitivity_backend)
        self.streaming = isinstance(self, StreamRegressionModule)

    def _start(self, batch: SequenceBatch) -> None:
        batch_size = batch.inputs.shape[0]
        fresh = self.rtrl.hidden is None or self.rtrl.hidden[0].shape[0] != batch_size
        all_reset, any_reset = self.reset_flags(batch.reset) if isinstance(self, HostResetFlags) else host_resets(batch.reset)
        if not self.streaming or fresh or batch.reset is None or all_reset:
            self.rtrl.reset(batch_size)
        elif any_reset:
            self.rtrl.reset_rows(batch.reset)

    def _chunk_loss(self, targets: torch.Tensor, start: int, steps: int, total: int) -> Callable:
        """loss_fn for the chunk of steps [start, start + steps) of a sequence of ``total`` steps."""
        metric = self.metrics["train_metric"]
        if self.net.readout == "last":
            def last(predictions):
                if start + steps < total:
                    return None
                metric.update(predictions[:, -1].detach(), targets)
                return self.loss(predictions[:, -1], targets)
            return last
        chunk_targets = targets[:, start:start + steps]
        if self.streaming:
            def stream(predictions):
                scored = self.target_steps(predictions, chunk_targets)
                if scored[1].numel() == 0:
                    return None
                metric.update(scored[0].detach(), scored[1])
                return self.loss(predictions, chunk_targets)
            return stream

        def every_step(predictions):
            metric.update(predictions.detach(), chunk_targets)
            return self.loss(predictions, chunk_targets) * (steps / total)
        return every_step

    def _update(self) -> None:
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad()
        apply_constraints(self.net)
        scheduler = self.lr_schedulers()
        if scheduler is not None and self.hparams.scheduler_interval == "step":
            scheduler.step()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        batch = as_batch(batch)
        if batch.lengths is not None:
            raise ValueError("learning=rtrl needs sequences of equal length (the batch has `lengths`)")
        self._start(batch)
        total_steps = batch.inputs.shape[1]
        span = min(self.update_every or total_steps, self.chunk_size)
        total_loss, since_update, pending = batch.inputs.new_zeros(()), 0, False
        for start in range(0, total_steps, span):
            chunk = batch.inputs[:, start:start + span]
            loss, _ = self.rtrl.accumulate(chunk, self._chunk_loss(batch.targets, start, chunk.shape[1], total_steps))
            if loss is not None:
                self.check_training_loss(loss)
                total_loss, pending = total_loss + loss, True
            since_update += chunk.shape[1]
            # No step where no loss has arrived since the last one (e.g. a "last" readout mid-sequence).
            if pending and self.update_every is not None and since_update >= self.update_every:
                self._update()
                since_update, pending = 0, False
        if pending:
            self._update()
        batch_size = batch.inputs.shape[0]
        metric = self.metrics["train_metric"]
        if self.logging_step():  # computing a metric reads it back: only on the steps that write it
            self.log("train/loss", total_loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
            if metric.update_count:
                self.log(f"train/{self.metric_name}", metric.compute(), on_step=True, on_epoch=False,
                         batch_size=batch_size)
        metric.reset()
        return total_loss

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # Manual optimization: Lightning steps no scheduler, so the epoch-interval ones step here.
        scheduler = self.lr_schedulers()
        if scheduler is None or self.hparams.scheduler_interval != "epoch":
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            value = self.trainer.callback_metrics.get(self.hparams.monitor)
            if value is not None:
                scheduler.step(value)
        else:
            scheduler.step()


_BASES = {
    "regression": "lightning_modules.regression.SequenceRegressionModule",
    "labelling": "lightning_modules.labelling.SequenceLabellingModule",
    "classification": "lightning_modules.classification.SequenceClassificationModule",
    "stream_regression": "lightning_modules.rtrl.StreamRegressionModule",
}
_CLASSES: dict[type, type] = {}


def _infer_base(kwargs: dict, stream: bool) -> str:
    """The objective a config's arguments belong to (its ``_target_`` was replaced by learning=rtrl)."""
    if "vocab_size" in kwargs or "encoder" in kwargs:
        raise ValueError("learning=rtrl: language models and encoder-decoders are not supported; "
                         "use it on regression, labelling, classification or stream tasks")
    if "num_classes" in kwargs:
        return _BASES["labelling" if "ignore_index" in kwargs else "classification"]
    return _BASES["stream_regression" if stream else "regression"]


def rtrl_objective(*args, base: str | None = None, stream: bool = False, **kwargs) -> SequenceObjective:
    """The objective ``base`` (a dotted class path, or None: inferred) trained with RTRL.

    Inference, from the objective config's arguments: ``num_classes`` with ``ignore_index`` ->
    sequence labelling, ``num_classes`` alone -> classification, else regression, or
    :class:`StreamRegressionModule` where ``stream`` (the task's ``stream`` flag) is true.

    Called by the run driver as ``objective(net=..., optimizer=..., ...)`` with the objective
    config's arguments and those of :class:`OnlineLearning`. The class is built once per base, as
    ``RTRL<Base>``, a subclass of both.
    """
    path = base or _infer_base(kwargs, stream)
    module_name, _, class_name = path.rpartition(".")
    try:
        objective_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"learning=rtrl: objective.base {path!r} is not an importable class ({err})") from err
    if objective_class not in _CLASSES:
        _CLASSES[objective_class] = type(f"RTRL{objective_class.__name__}", (OnlineLearning, objective_class),
                                         {"__module__": __name__})
    return _CLASSES[objective_class](*args, **kwargs)


__all__ = ["OnlineLearning", "StreamRegressionModule", "rtrl_objective"]
