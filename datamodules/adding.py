"""The adding problem (Hochreiter & Schmidhuber 1997; as set up in the uRNN and IndRNN papers).

Each step carries two channels: a value drawn from U(0, 1) and a marker that is 1 at exactly two
steps, one in each half of the sequence. The target is the sum of the two marked values. Always
predicting the mean (1.0) gives MSE = Var(U1 + U2) = 1/6 ~ 0.167, the do-nothing baseline.
"""
from __future__ import annotations

import numpy as np
import torch

from datamodules.seeded import SeededDataModule, SeededDataset
from src.checks import check_int

BASELINE_MSE = 1.0 / 6.0


class AddingProblemDataset(SeededDataset):
    """A fixed set of adding-problem sequences, each generated on demand from (seed, split, index)
    (see :class:`datamodules.seeded.SeededDataset`).

    Returns ``(inputs, target)``: inputs (T, 2) float32 [value, marker]; target (1,) float32.
    """

    benchmark = "adding problem"

    def __init__(self, seq_len: int, size: int, seed: int, split: str = "train") -> None:
        check_int("adding problem: seq_len", seq_len, minimum=2)  # one marker in each half
        super().__init__(seq_len, size, seed, split)

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.seq_len // 2
        values = rng.random(self.seq_len, dtype=np.float32)
        first, second = rng.integers(0, half), rng.integers(half, self.seq_len)
        inputs = np.zeros((self.seq_len, 2), dtype=np.float32)
        inputs[:, 0] = values
        inputs[[first, second], 1] = 1.0
        target = np.array([values[first] + values[second]], dtype=np.float32)
        return torch.from_numpy(inputs), torch.from_numpy(target)


class AddingProblemDataModule(SeededDataModule):
    """Train/val/test splits of the adding problem (:class:`AddingProblemDataset`, seq_len T >= 2);
    the arguments are :class:`datamodules.seeded.SeededDataModule`'s (the papers' sizes:
    conf/task/adding.yaml)."""

    benchmark = "adding problem"
    dataset = AddingProblemDataset
