"""Backpropagation through time: the objective's own forward and backward pass over each batch."""
from __future__ import annotations

import torch

from lightning_modules.learning.base import LearningRule


class BPTT(LearningRule):
    """One forward pass over the batch's sequences and one backward pass (Lightning's automatic
    optimization). Objectives that carry their state across batches make it truncated BPTT."""

    name = "bptt"

    def training_step(self, objective, batch) -> torch.Tensor:
        return objective.bptt_training_step(batch)
