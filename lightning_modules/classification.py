"""Sequence classification: one class label per sequence (e.g. sequential MNIST)."""
from __future__ import annotations

import torch
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.base import SequenceObjective


class SequenceClassificationModule(SequenceObjective):
    """Cross-entropy loss; logs ``{train,val,test}/loss``, ``{train,val,test}/acc`` and ``val/acc_best``.

    Batches are ``(inputs, labels)``: inputs (B, T, I), labels (B,) int64 in [0, num_classes).

    Args:
        num_classes: number of classes, C (the network's output_size).
        (the rest as :class:`lightning_modules.base.SequenceObjective`)
    """

    metric_name = "acc"
    best_mode = "max"

    def __init__(self, *args, num_classes: int, **kwargs) -> None:
        self.num_classes = num_classes
        super().__init__(*args, **kwargs)

    def make_metric(self) -> Metric:
        return MulticlassAccuracy(num_classes=self.num_classes, average="micro")

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(predictions, targets)
