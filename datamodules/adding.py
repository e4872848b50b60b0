"""The adding problem (Hochreiter & Schmidhuber 1997; as set up in the uRNN and IndRNN papers).

Each step carries two channels: a value drawn from U(0, 1) and a marker that is 1 at exactly two
steps, one in each half of the sequence. The target is the sum of the two marked values. Always
predicting the mean (1.0) gives MSE = Var(U1 + U2) = 1/6 ~ 0.167, the do-nothing baseline.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.splits import SplitDataModule

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
BASELINE_MSE = 1.0 / 6.0


class AddingProblemDataset(Dataset):
    """A fixed set of adding-problem sequences, each generated on demand from (seed, split, index).

    Generating from the index alone makes every sample identical across calls, DataLoader workers
    and DDP ranks without storing the set (T=5000 x 100k samples would be 4 GB).

    Returns ``(inputs, target)``: inputs (T, 2) float32 [value, marker]; target (1,) float32.
    """

    def __init__(self, seq_len: int, size: int, seed: int, split: str = "train") -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"adding problem: seq_len must be an integer >= 2 (one marker per half), got {seq_len!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"adding problem: {split} size must be a positive integer, got {size!r}")
        if split not in SPLIT_CODES:
            raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLIT_CODES)}")
        self.seq_len, self.size, self.seed, self.split = seq_len, size, seed, split

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = np.random.default_rng((self.seed, SPLIT_CODES[self.split], index))
        half = self.seq_len // 2
        values = rng.random(self.seq_len, dtype=np.float32)
        first, second = rng.integers(0, half), rng.integers(half, self.seq_len)
        inputs = np.zeros((self.seq_len, 2), dtype=np.float32)
        inputs[:, 0] = values
        inputs[[first, second], 1] = 1.0
        target = np.array([values[first] + values[second]], dtype=np.float32)
        return torch.from_numpy(inputs), torch.from_numpy(target)


class AddingProblemDataModule(SplitDataModule):
    """Train/val/test splits of the adding problem; nothing to download.

    Args:
        seq_len: T, steps per sequence (>= 2; the papers use 100 to 5000).
        train_size, val_size, test_size: samples per split.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (0: load in the training process).
        seed: the data seed; the same seed gives the same sets everywhere.
    """

    task = "adding problem"

    def __init__(self, seq_len: int = 100, train_size: int = 20_000, val_size: int = 1_000, test_size: int = 5_000,
                 batch_size: int = 50, num_workers: int = 0, seed: int = 1234) -> None:
        super().__init__(batch_size, num_workers)
        self.splits = self.sized_splits(lambda size, name: AddingProblemDataset(seq_len, size, seed, name),
                                       train_size, val_size, test_size)
