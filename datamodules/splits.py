"""What every DataModule shares: train/val/test DataLoaders over a dict of split datasets."""
from __future__ import annotations

from typing import Callable

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SplitDataModule(pl.LightningDataModule):
    """DataLoaders over ``self.splits`` ({"train": Dataset, "val": ..., "test": ...}).

    Subclasses fill ``self.splits`` (in ``__init__`` or ``setup``), name themselves in ``task`` for
    error messages, and may set ``collate_fn`` (a staticmethod) for datasets that return whole batches.
    The training loader shuffles; the others keep the order. Batches: whatever the datasets yield.
    """

    task = "dataset"
    collate_fn = None

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"{self.task}: batch_size must be a positive integer, got {batch_size!r}")
        if not _is_int(num_workers) or num_workers < 0:
            raise ValueError(f"{self.task}: num_workers must be a non-negative integer, got {num_workers!r}")
        self.batch_size, self.num_workers = batch_size, num_workers
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
                          collate_fn=self.collate_fn)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
