"""Sequence regression: one real-valued target vector per sequence (e.g. the adding problem), or one
per step (e.g. sequence generation)."""
from __future__ import annotations

import torch
from torch.nn import functional as F
from torchmetrics import MeanSquaredError, Metric

from lightning_modules.base import SequenceObjective


class SequenceRegressionModule(SequenceObjective):
    """MSE loss; logs ``{train,val,test}/loss``, ``{train,val,test}/mse`` and ``val/mse_best``.

    Batches (:class:`src.batch.SequenceBatch`): inputs (B, T, I) and float targets, (B, O) per
    sequence (network readout "last" or "mean") or (B, T, O) per step (readout "all"; with
    ``lengths``, the MSE averages over the valid steps only).

    Args:
        per_step_targets: a target at every step (``task.per_step_targets``): the network's readout
            must be "all"; otherwise "last" or "mean".
        (the rest as :class:`lightning_modules.base.SequenceObjective`)
    """

    metric_name = "mse"
    best_mode = "min"

    def __init__(self, *args, per_step_targets: bool = False, **kwargs) -> None:
        self.per_step_targets = bool(per_step_targets)
        self.readouts = ("all",) if per_step_targets else ("last", "mean")
        super().__init__(*args, **kwargs)

    def readout_error(self, readout: str) -> str:
        if self.per_step_targets:
            return f"sequence regression: a target at every step needs task.readout=all, not {readout!r}"
        return (f"sequence regression: one target per sequence, so task.readout must be 'last' or 'mean', "
                f"not {readout!r} (per-step targets: task.per_step_targets=true)")

    def make_metric(self) -> Metric:
        return MeanSquaredError()

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(predictions, targets)
