"""Unbounded streams: the continuous adding problem, cut into consecutive segments.

B independent streams of (value, marker) steps: values from U(0, 1), markers that keep coming,
consecutive markers ``min_gap`` to ``max_gap`` steps apart (uniform). Markers pair up in order: at
every second marker the target is the sum of the two marked values (first + second); every other
step has no target (NaN). A learner must hold the first value for up to ``max_gap`` steps, across
segment boundaries: truncated BPTT over segments shorter than the gaps cannot learn that, RTRL can.

A batch is the next ``segment_len`` steps of all B streams (:class:`src.batch.SequenceBatch`:
inputs (B, segment_len, 2), targets (B, segment_len, 1), ``reset`` (B,) True on the first segment
of an epoch, where every stream starts afresh). Training streams differ every epoch; validation
and test streams are the same every time (seeded by split only).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.seeded import SPLIT_CODES
from datamodules.splits import SplitDataModule
from src.batch import SequenceBatch
from src.checks import check_choice, check_int, check_non_negative_int, check_positive_int


class AddingStreams:
    """B continuous adding streams; :meth:`segment` returns their next steps.

    Args:
        batch_size: B streams. min_gap, max_gap: steps between consecutive markers (1 <= min <= max).
        rng: numpy generator, advanced by every segment.
    """

    def __init__(self, batch_size: int, min_gap: int, max_gap: int, rng: np.random.Generator) -> None:
        self.batch_size, self.min_gap, self.max_gap, self.rng = batch_size, min_gap, max_gap, rng
        self.next_marker = rng.integers(0, max_gap, size=batch_size)  # steps until each stream's next marker
        self.pending = np.full(batch_size, np.nan, dtype=np.float32)  # first value of an open pair, else NaN

    def segment(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``steps`` steps: inputs (B, steps, 2) [value, marker], targets (B, steps, 1) (NaN: none)."""
        values = self.rng.random((self.batch_size, steps), dtype=np.float32)
        markers = np.zeros((self.batch_size, steps), dtype=np.float32)
        targets = np.full((self.batch_size, steps, 1), np.nan, dtype=np.float32)
        for stream in range(self.batch_size):
            t = int(self.next_marker[stream])
            while t < steps:
                markers[stream, t] = 1.0
                if np.isnan(self.pending[stream]):
                    self.pending[stream] = values[stream, t]
                else:
                    targets[stream, t, 0] = self.pending[stream] + values[stream, t]
                    self.pending[stream] = np.nan
                t += int(self.rng.integers(self.min_gap, self.max_gap + 1))
            self.next_marker[stream] = t - steps
        inputs = np.stack([values, markers], axis=-1)
        return torch.from_numpy(inputs), torch.from_numpy(targets)


class AddingStreamSegments(IterableDataset):
    """``segments`` consecutive segments of B fresh streams per pass (one pass = one epoch).

    Yields :class:`src.batch.SequenceBatch` batches (see the module docstring). The streams of pass
    e of the training split come from the seed (seed, split, e); validation and test use (seed, split).
    """

    def __init__(self, batch_size: int, segment_len: int, segments: int, min_gap: int, max_gap: int,
                 seed: int, split: str) -> None:
        self.batch_size, self.segment_len, self.segments = batch_size, segment_len, segments
        self.min_gap, self.max_gap, self.seed, self.split = min_gap, max_gap, seed, split
        self.passes = 0

    def __len__(self) -> int:
        return self.segments

    def __iter__(self):
        key = (self.seed, SPLIT_CODES[self.split]) + ((self.passes,) if self.split == "train" else ())
        self.passes += 1
        streams = AddingStreams(self.batch_size, self.min_gap, self.max_gap, np.random.default_rng(key))
        for index in range(self.segments):
            inputs, targets = streams.segment(self.segment_len)
            yield SequenceBatch(inputs, targets, reset=torch.full((self.batch_size,), index == 0))


class StreamingAddingDataModule(SplitDataModule):
    """The continuous adding problem as train/val/test streams.

    Args:
        segment_len: steps per batch (the truncation window of BPTT).
        batch_size: B parallel streams.
        train_segments, val_segments, test_segments: segments per epoch / evaluation.
        min_gap, max_gap: steps between consecutive markers.
        seed: the data seed.
    """

    benchmark = "streaming adding"

    def __init__(self, segment_len: int = 50, batch_size: int = 32, train_segments: int = 200,
                 val_segments: int = 40, test_segments: int = 100, min_gap: int = 10, max_gap: int = 100,
                 seed: int = 1234) -> None:
        super().__init__(batch_size, num_workers=0)
        check_positive_int(f"{self.benchmark}: segment_len", segment_len)
        check_positive_int(f"{self.benchmark}: min_gap", min_gap)
        check_int(f"{self.benchmark}: max_gap", max_gap, minimum=min_gap)
        check_non_negative_int(f"{self.benchmark}: seed", seed)
        sizes = {"train": train_segments, "val": val_segments, "test": test_segments}
        for name, size in sizes.items():
            check_positive_int(f"{self.benchmark}: {name}_segments", size)
        self.splits = {name: AddingStreamSegments(batch_size, segment_len, size, min_gap, max_gap, seed, name)
                       for name, size in sizes.items()}

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        check_choice("split", name, tuple(self.splits))
        # The dataset yields whole batches in stream order: no batching, no shuffling, no workers.
        return DataLoader(self.split(name), batch_size=None, num_workers=0)
