"""Sequence classification: one class label per sequence (e.g. sequential MNIST)."""
from __future__ import annotations

import torch
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.base import SequenceObjective
from src.checks import check_int


class SequenceClassificationModule(SequenceObjective):
    """Cross-entropy loss; logs ``{train,val,test}/loss``, ``{train,val,test}/acc`` and ``val/acc_best``.

    Batches (:class:`src.batch.SequenceBatch`): inputs (B, T, I), targets (B,) int64 labels in
    [0, num_classes), optional lengths (B,). The network's readout is "last" or "mean" (one
    prediction (B, C) per sequence, read at each sequence's last valid step or averaged over them).
    Test-time augmentation (``groups`` (B,), e.g. NTU's K samplings of frames per sequence): the
    logits of each example's samplings are averaged, (G, C), before the loss and the accuracy.

    Args:
        num_classes: number of classes, C (the network's output_size).
        (the rest as :class:`lightning_modules.base.SequenceObjective`)
    """

    metric_name = "acc"
    best_mode = "max"
    readouts = ("last", "mean")

    def __init__(self, *args, num_classes: int, **kwargs) -> None:
        self.num_classes = check_int("sequence classification: num_classes", num_classes, minimum=2)
        super().__init__(*args, **kwargs)

    def readout_error(self, readout: str) -> str:
        return (f"sequence classification: one label per sequence, so task.readout must be 'last' or 'mean', "
                f"not {readout!r}")

    def make_metric(self) -> Metric:
        return MulticlassAccuracy(num_classes=self.num_classes, average="micro")

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(predictions, targets)
