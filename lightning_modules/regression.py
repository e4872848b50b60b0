"""Sequence regression: one real-valued target vector per sequence (e.g. the adding problem)."""
from __future__ import annotations

import torch
from torch.nn import functional as F
from torchmetrics import MeanSquaredError, Metric

from lightning_modules.base import SequenceObjective


class SequenceRegressionModule(SequenceObjective):
    """MSE loss; logs ``{train,val,test}/loss``, ``{train,val,test}/mse`` and ``val/mse_best``.

    Batches are ``(inputs, targets)``: inputs (B, T, I), targets (B, O) float.
    """

    metric_name = "mse"
    best_mode = "min"

    def make_metric(self) -> Metric:
        return MeanSquaredError()

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(predictions, targets)
