"""What every DataModule shares: train/val/test DataLoaders over a dict of split datasets, and the
collation of samples into the one batch type every objective reads, :class:`src.batch.SequenceBatch`."""
from __future__ import annotations

from typing import Callable, Sequence

import pytorch_lightning as pl
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from src.batch import SequenceBatch
from src.checks import check_non_negative_int, check_positive_int


def collate_sequences(samples: Sequence) -> SequenceBatch:
    """DataLoader ``collate_fn``: per-sample ``(inputs, targets)`` pairs -> one :class:`SequenceBatch`.

    Sequences of one length are stacked: inputs (B, T, ...), and ``lengths`` is None. Sequences of
    different lengths T_i are padded on the right with zeros to the longest, T, and ``lengths`` (B,)
    holds each T_i; per-step targets (first dimension T_i, as inputs) are padded the same way, and
    per-sequence targets (one shape for all samples) are stacked. The objectives leave the padded
    steps out of readouts, losses and metrics.
    """
    inputs = [sample[0] for sample in samples]
    targets = [sample[1] for sample in samples]
    steps = [len(x) for x in inputs]
    if len(set(steps)) == 1:
        return SequenceBatch(torch.stack(inputs), torch.stack(targets))
    per_step = all(y.dim() > 0 and len(y) == t for y, t in zip(targets, steps))
    return SequenceBatch(pad_sequence(inputs, batch_first=True),
                         pad_sequence(targets, batch_first=True) if per_step else torch.stack(targets),
                         lengths=torch.tensor(steps, dtype=torch.int64))


def collate_batched(batch: tuple[torch.Tensor, torch.Tensor]) -> SequenceBatch:
    """DataLoader ``collate_fn`` for datasets whose ``__getitems__`` already returns a whole
    ``(inputs, targets)`` batch (e.g. MNIST): wraps it as a :class:`SequenceBatch`.

    Module-level (not a lambda) so that DataLoader workers started with spawn can pickle it.
    """
    return SequenceBatch(*batch)


class SplitDataModule(pl.LightningDataModule):
    """DataLoaders over ``self.splits`` ({"train": Dataset, "val": ..., "test": ...}).

    Subclasses fill ``self.splits`` (in ``__init__`` or ``setup``), name the benchmark in
    ``benchmark`` for error messages, and may set ``collate_fn`` (a staticmethod), e.g.
    :func:`collate_batched` for datasets that return whole batches. The training loader shuffles;
    the others keep the order. Batches: :class:`src.batch.SequenceBatch`.

    ``drop_last`` (training only): False keeps the last, short batch of each epoch (N mod B
    sequences, e.g. 8 of the 57,000 pixel-MNIST training sequences with B = 32); True drops it, so
    that every training batch has B sequences, as the official IndRNN loaders (which cycle through
    the data) give, and batch statistics (batch norm) never come from a handful of sequences.
    Validation and test always see every sequence.
    """

    benchmark = "dataset"
    collate_fn = staticmethod(collate_sequences)

    def __init__(self, batch_size: int, num_workers: int, drop_last: bool = False) -> None:
        super().__init__()
        check_positive_int(f"{self.benchmark}: batch_size", batch_size)
        check_non_negative_int(f"{self.benchmark}: num_workers", num_workers)
        if not isinstance(drop_last, bool):
            raise ValueError(f"{self.benchmark}: drop_last must be true or false, got {drop_last!r}")
        self.batch_size, self.num_workers, self.drop_last = batch_size, num_workers, drop_last
        self.splits: dict[str, Dataset] = {}

    @staticmethod
    def sized_splits(make: Callable[[int, str], Dataset], train_size: int, val_size: int,
                     test_size: int) -> dict[str, Dataset]:
        """The three splits: ``{"train": make(train_size, "train"), "val": ..., "test": ...}``."""
        sizes = {"train": train_size, "val": val_size, "test": test_size}
        return {name: make(size, name) for name, size in sizes.items()}

    def split(self, name: str) -> Dataset:
        """The dataset of split ``name`` (override to build splits lazily)."""
        return self.splits[name]

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.split(name), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=self.collate_fn, drop_last=self.drop_last and name == "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
