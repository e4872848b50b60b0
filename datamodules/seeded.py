"""Datasets generated on demand: sample ``index`` of a split is built from a generator seeded with
``(seed, split, index)`` alone.

So every sample is identical across calls, DataLoader workers, DDP ranks and resumed runs, and no
set is ever stored (the adding problem at T=5000 x 100k samples would be 4 GB). The adding problem,
copy memory, running parity and the transduction tasks build on :class:`SeededDataset`; the first
three are a :class:`SeededDataModule` naming their dataset type.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.splits import SplitDataModule
from src.checks import check_choice, check_non_negative_int, check_positive_int

# The split's part of the seed: the same (seed, index) gives different samples in train, val and test.
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class SeededDataset(Dataset):
    """``size`` samples; subclasses implement :meth:`sample`, which builds one from a seeded generator.

    Args:
        seq_len: T, the steps of a sequence (checked by the subclass, which knows its minimum).
        size: samples in the split (>= 1).
        seed: the data seed (>= 0); the same seed gives the same set everywhere.
        split: "train", "val" or "test".

    Subclasses name themselves in ``benchmark`` for error messages.
    """

    benchmark = "synthetic data"

    def __init__(self, seq_len: int, size: int, seed: int, split: str = "train") -> None:
        check_choice("split", split, tuple(SPLIT_CODES))
        check_positive_int(f"{self.benchmark}: {split} size", size)
        check_non_negative_int(f"{self.benchmark}: seed", seed)
        self.seq_len, self.size, self.seed, self.split = seq_len, size, seed, split

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        return self.sample(np.random.default_rng((self.seed, SPLIT_CODES[self.split], index)))

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``(inputs, targets)`` pair drawn from ``rng`` (shapes: see the subclass)."""
        raise NotImplementedError


class SeededDataModule(SplitDataModule):
    """Train/val/test splits of one :class:`SeededDataset` type, nothing to download; a subclass names
    it in ``dataset`` (built as ``dataset(seq_len, size, seed, split)``) and the task in ``benchmark``.

    Args:
        seq_len: T, the steps of a sequence (checked by the dataset, which knows its minimum).
        train_size, val_size, test_size: samples per split (conf/task/*.yaml: the papers' sizes).
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (0: load in the training process).
        seed: the data seed; the same seed gives the same sets everywhere.
    """

    dataset: type[SeededDataset] = SeededDataset

    def __init__(self, seq_len: int = 100, train_size: int = 10_000, val_size: int = 1_000, test_size: int = 1_000,
                 batch_size: int = 32, num_workers: int = 0, seed: int = 1234) -> None:
        super().__init__(batch_size, num_workers)
        self.seq_len = seq_len
        self.splits = self.sized_splits(lambda size, name: self.dataset(seq_len, size, seed, name),
                                        train_size, val_size, test_size)
