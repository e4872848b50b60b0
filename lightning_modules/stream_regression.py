"""The objective of unbounded streams (conf/task/streaming_adding.yaml): per-step regression where only
the steps with a finite target count, on B parallel streams cut into consecutive segments.

Trained by backpropagation (``learning=bptt``) it is truncated BPTT: the state is carried from one
segment to the next, detached, so no gradient crosses a segment boundary. Trained with
``learning=rtrl`` it is exact through the whole stream (:mod:`lightning_modules.learning.rtrl`).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from lightning_modules.carried_state import CarriedState, refuse_samplings
from lightning_modules.regression import SequenceRegressionModule
from src.batch import SequenceBatch, as_batch
from src.state import detach_state


class StreamRegressionModule(CarriedState, SequenceRegressionModule):
    """Per-step MSE over the steps with a finite target, on consecutive segments of B streams.

    Batches (:class:`src.batch.SequenceBatch`): inputs (B, T, I), targets (B, T, O) float, NaN at
    steps without a target, ``reset`` (B,) bool where a stream starts afresh. The network's state
    is carried across batches of each stage (truncated BPTT in training: detached at every segment
    boundary) and restarted stream by stream where ``reset`` is set (every stream where a batch has no
    ``reset``). Batches with ``groups`` (test-time samplings) are refused. Logs ``{stage}/loss`` and
    ``{stage}/mse`` over the target steps. (Other arguments as
    :class:`lightning_modules.regression.SequenceRegressionModule`.)
    """

    carries_state = True  # learning rules keep their own carried state across batches too (RTRL)

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
        """The state this stage's batch starts from: a batch without ``reset`` holds new sequences."""
        state = self.restart(self.carried.get(stage), batch.reset)
        return None if batch.reset is None else state

    def _step(self, batch, stage: str) -> torch.Tensor:
        batch = as_batch(batch)
        refuse_samplings(batch, type(self).__name__, "each stream carries its own state from segment to segment")
        predictions, state = self.net(batch.inputs, self._carried_state(batch, stage))
        self.carried[stage] = detach_state(state)
        loss = self.loss(predictions, batch.targets)
        if stage == "train":
            self.check_training_loss(loss, inputs=batch.inputs)  # NaN targets mark steps without one
        elif stage == "val":
            self.note_validation_batch(batch.inputs)
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


__all__ = ["StreamRegressionModule"]
