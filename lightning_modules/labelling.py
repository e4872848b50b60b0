"""Sequence labelling: one class label per step (e.g. copy memory, running parity).

The network runs with readout "all" and predicts every step from the steps so far (synchronous
sequence -> sequence). Per-step regression (e.g. sequence generation) needs no module of its own:
:class:`lightning_modules.regression.SequenceRegressionModule`'s MSE already averages over (B, T, O).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.base import SequenceObjective
from src.checks import check_int


class PerStepAccuracy(MulticlassAccuracy):
    """Micro accuracy over all steps: predictions (B, T, C) (or (N, C)) logits, targets (B, T) (or (N,))
    class indices.

    Steps whose target equals ``ignore_index`` count neither as right nor as wrong.
    """

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds.reshape(-1, preds.shape[-1]), target.reshape(-1))


class SequenceLabellingModule(SequenceObjective):
    """Per-step cross-entropy; logs ``{train,val,test}/loss``, ``{train,val,test}/acc`` and ``val/acc_best``.

    Batches (:class:`src.batch.SequenceBatch`): inputs (B, T, I), targets (B, T) int64 labels in
    [0, num_classes) or ``ignore_index``, optional lengths (B,). Predictions (B, T, C) come from a
    network with readout "all". The loss is the mean cross-entropy over every valid step (within
    ``lengths``) whose label is not ``ignore_index`` (all steps by default, as the copy-memory
    baseline assumes); the accuracy is the fraction of such steps labelled right.
    Where the datamodule has a ``baseline`` loss (copy memory), ``val/loss_ratio`` and
    ``test/loss_ratio`` report the loss divided by it.

    Args:
        num_classes: number of classes per step, C (the network's output_size).
        ignore_index: label of steps left out of the loss and the accuracy (default -100, as torch).
        (the rest as :class:`lightning_modules.base.SequenceObjective`)
    """

    metric_name = "acc"
    best_mode = "max"
    readouts = ("all",)

    def __init__(self, *args, num_classes: int, ignore_index: int = -100, **kwargs) -> None:
        check_int("sequence labelling: num_classes", num_classes, minimum=2)
        if check_int("sequence labelling: ignore_index", ignore_index) in range(num_classes):
            raise ValueError(f"sequence labelling: ignore_index must be an integer outside [0, {num_classes}), "
                             f"got {ignore_index!r}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        super().__init__(*args, **kwargs)

    def readout_error(self, readout: str) -> str:
        return f"sequence labelling: a label at every step needs task.readout=all, not {readout!r}"

    def make_metric(self) -> Metric:
        return PerStepAccuracy(num_classes=self.num_classes, average="micro", ignore_index=self.ignore_index)

    def _log_baseline_ratio(self, stage: str) -> None:
        """Log ``{stage}/loss_ratio`` = loss / the datamodule's ``baseline`` loss, where it has one
        (copy memory: the memoryless strategy's cross-entropy; below 1 means the network remembers)."""
        baseline = getattr(getattr(self.trainer, "datamodule", None), "baseline", None)
        if baseline:
            ratio = float(self.losses[f"{stage}_loss"].compute()) / float(baseline)
            self.log(f"{stage}/loss_ratio", ratio, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_baseline_ratio("val")

    def on_test_epoch_end(self) -> None:
        self._log_baseline_ratio("test")

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """predictions (B, T, C) and targets (B, T), or the valid steps' (N, C) and (N,)."""
        if predictions.dim() < 2 or predictions.shape[:-1] != targets.shape:
            raise ValueError(f"sequence labelling needs predictions (B, T, C) and targets (B, T) "
                             f"(network readout 'all'), got {tuple(predictions.shape)} and {tuple(targets.shape)}")
        return F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1),
                               ignore_index=self.ignore_index)
