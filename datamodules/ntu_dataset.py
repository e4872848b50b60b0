"""One split of NTU RGB+D as a Dataset: which frames fill a sequence, augmentation, and reading them
from the converter's HDF5 file (datamodules/ntu_hdf5.py) a batch at a time.

Sampling, as the official IndRNN code (:func:`sample_frame_indices`): each sequence becomes ``steps``
(20) frames. Longer than 2 x steps: one random frame in each of ``steps`` equal segments; between steps
and 2 x steps: a random contiguous window; up to ``steps``: the frames at a random offset in zeros.
Training draws new frames every time; evaluation draws ``samplings`` (K) sets per sequence, seeded by
the sample's index so every evaluation sees the same ones: the batch holds the K sets of each sample as
K adjacent sequences of one group (``SequenceBatch.groups``), and the objective averages their logits.

Each DataLoader worker (and each DDP rank) opens the HDF5 file itself on its first batch: h5py
handles cannot be pickled, and only the frames of the requested samples are ever read. Every batch
read is checked for coordinates that cannot be a body (non-finite or beyond ``MAX_COORDINATE`` =
10 m), naming the sample.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.download import DataError
from datamodules.ntu_hdf5 import MAX_COORDINATE, open_hdf5, remake_command
from datamodules.ntu_skeleton import MAX_BODIES, NUM_JOINTS
from src.batch import SequenceBatch, repeat_samplings

FEATURES = MAX_BODIES * NUM_JOINTS * 3   # 150 inputs per step: 2 bodies x 25 joints x xyz
SPINE_JOINT = 1                          # 0-based: NTU's joint 2, "middle of the spine"


def sample_frame_indices(lengths, steps: int, uniforms: np.ndarray) -> np.ndarray:
    """Which frames of each sequence fill ``steps`` steps: int64 (N, steps), -1 = zero padding.

    ``lengths`` (N,) frames per sequence (>= 1); ``uniforms`` (N, steps + 1) draws in [0, 1) (the only
    randomness: the same draws give the same frames). The official IndRNN code's rules, per sequence:
      * length >= 2 * steps: ``seg = length // steps`` frames per segment, one random frame in each
        (the last segment also takes the remainder);
      * steps < length < 2 * steps: a random contiguous window, starting in [0, length - steps);
      * length <= steps: the sequence starts at a random step in [0, max(steps - length, steps // 4)),
        zeros elsewhere; when that offset leaves too few steps, a random part of the sequence that fits
        is used (so a 20-frame sequence at 20 steps starts at step 0-4, its first/last frames cut).
    """
    lengths = np.atleast_1d(np.asarray(lengths, dtype=np.int64))
    if (lengths < 1).any():
        raise ValueError(f"a sequence needs at least one frame, got length {int(lengths.min())}")
    count, step = len(lengths), np.arange(steps)

    def draw(column: int, bound: np.ndarray) -> np.ndarray:  # uniform integers in [0, bound)
        return np.minimum((uniforms[:, column] * bound).astype(np.int64), bound - 1)

    indices = np.full((count, steps), -1, dtype=np.int64)
    per_segment = lengths // steps
    # Long: one random frame in each segment; the last segment runs to the end.
    long = per_segment >= 2
    seg = per_segment[long, None]
    last = lengths[long] - seg[:, 0] * (steps - 1)
    bound = np.where(step < steps - 1, seg, last[:, None])
    indices[long] = seg * step + np.minimum((uniforms[long, :steps] * bound).astype(np.int64), bound - 1)
    # Medium: a random window.
    medium = (per_segment == 1) & (lengths > steps)
    indices[medium] = draw(0, lengths - steps)[medium, None] + step
    # Short: zero-padding at a random offset, cropped when the offset leaves too few steps.
    short = lengths <= steps
    start = draw(0, np.maximum(np.maximum(steps - lengths, int(0.25 * steps)), 1))
    overrun = start + lengths - steps
    first = np.where(overrun > 0, draw(1, np.maximum(overrun, 1)), 0)
    inside = (step >= start[:, None]) & (step < np.minimum(steps, start + lengths)[:, None])
    shifted = first[:, None] + step - start[:, None]
    indices[short] = np.where(inside, shifted, -1)[short]
    return indices


def rotate_vertical(frames: np.ndarray, angle) -> np.ndarray:
    """Rotate joints (..., 3) about the vertical (y) axis by ``angle`` radians (a number, or an array
    that broadcasts against frames[..., 0]), in place; returns ``frames``."""
    cos, sin = np.cos(angle), np.sin(angle)
    x, z = frames[..., 0].copy(), frames[..., 2].copy()
    frames[..., 0] = cos * x + sin * z
    frames[..., 2] = cos * z - sin * x
    return frames


class NTUSkeletons(Dataset):
    """One split of NTU RGB+D, read lazily from the converter's HDF5 file a batch at a time.

    ``dataset.__getitems__(indices)`` returns a :class:`SequenceBatch` of the B samples: ``inputs``
    float32 (B, T, 150), features ordered (body, joint, xyz), and ``targets`` int64 (B,) = action - 1
    (training, or ``samplings`` == 1); in evaluation with K = ``samplings`` > 1, K sets of frames per
    sample: ``inputs`` (B * K, T, 150), ``targets`` (B * K,) and ``groups`` (B * K,) = [0] * K + [1] * K
    + ... (the K sets of sample b are sequences b * K to b * K + K - 1), see :class:`SequenceBatch`.

    Args:
        path: the HDF5 file.
        rows: int64 (N,) rows of this split in the file's per-sample arrays.
        offsets, lengths, labels: the file's per-sample arrays (all rows).
        steps: T, frames per sequence (official: 20).
        train: random frames every call (training); else ``samplings`` seeded sets per sample.
        samplings: K, sets of frames per sample at evaluation (ignored in training).
        center: subtract the first frame's spine joint (first body) from every tracked joint.
        rotate_degrees: training only: rotate each sample about the vertical axis by U(-r, r) degrees.
        random_length: training only: (low, high) draws T per batch uniformly in [low, high] instead of ``steps``.
        seed: seeds the evaluation samplings.
    """

    def __init__(self, path: str, rows: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, labels: np.ndarray,
                 steps: int = 20, train: bool = True, samplings: int = 1, center: bool = False,
                 rotate_degrees: float = 0.0, random_length: tuple[int, int] | None = None, seed: int = 0) -> None:
        self.path, self.rows = str(path), np.asarray(rows, dtype=np.int64)
        self.offsets, self.lengths = offsets[self.rows], lengths[self.rows]
        self.labels = torch.as_tensor(labels[self.rows].astype(np.int64))
        self.steps, self.train, self.samplings, self.center = steps, train, samplings, center
        self.rotate_degrees, self.random_length, self.seed = rotate_degrees, random_length, seed
        self._file, self._pid, self._rng, self._frames = None, None, None, None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        # Workers get their own handle (opened on first use): an open h5py file cannot be pickled.
        return {**self.__dict__, "_file": None, "_pid": None, "_rng": None, "_frames": None}

    def _skeletons(self):
        """The ``skeletons`` frames through this process's own file handle: the h5py dataset, or for a
        contiguous dataset (compression=none) a read-only np.memmap of its bytes; either slices as (F, 2, 25, 3)."""
        if self._pid != os.getpid():
            # A 16 MB chunk cache: neighbouring samples share compressed chunks.
            self._file = open_hdf5(self.path, rdcc_nbytes=16 << 20)
            self._pid = os.getpid()
            # Seeded from torch's per-worker seed (Lightning's seed_everything(workers=True) sets it).
            self._rng = np.random.default_rng(torch.initial_seed())
            dataset = self._file["skeletons"]
            self._frames = dataset
            if dataset.chunks is None and dataset.compression is None and dataset.id.get_offset() is not None:
                # Contiguous (compression=none): slice the file's bytes directly, without h5py per sample.
                # (A plain ndarray view of the map: numpy's memmap subclass adds overhead to every index.)
                self._frames = np.memmap(self.path, dtype=dataset.dtype, mode="r", offset=dataset.id.get_offset(),
                                         shape=dataset.shape).view(np.ndarray)
        return self._frames

    def _uniforms(self, indices: list[int], count: int, steps: int) -> np.ndarray:
        """(B * count, steps + 1) draws: fresh ones in training; in evaluation seeded by each sample's
        row, so every evaluation (any batch size, any worker) samples the same frames."""
        if self.train:
            return self._rng.random((len(indices) * count, steps + 1))
        return np.concatenate([np.random.default_rng((self.seed, int(self.rows[i]))).random((count, steps + 1))
                               for i in indices])

    def __getitems__(self, indices: list[int]) -> SequenceBatch:
        frames = self._skeletons()
        steps = self.steps
        if self.train and self.random_length is not None:
            steps = int(self._rng.integers(self.random_length[0], self.random_length[1] + 1))
        count = 1 if self.train else self.samplings
        rows = np.repeat(np.asarray(indices, dtype=np.int64), count)   # (N,) = B * K sequences
        offsets, lengths = self.offsets[rows], self.lengths[rows]
        picked = sample_frame_indices(lengths, steps, self._uniforms(indices, count, steps))  # (N, T)
        valid = picked >= 0
        where = offsets[:, None] + np.maximum(picked, 0)                # (N, T) frame numbers in the file
        if isinstance(frames, np.ndarray):  # memory-mapped: one gather for the whole batch
            gathered = frames[where.ravel()].reshape(*where.shape, MAX_BODIES, NUM_JOINTS, 3)
        else:                               # h5py (compressed chunks): one read per sample
            gathered = np.stack([frames[o:o + n][p] for o, n, p in zip(offsets, lengths, np.maximum(picked, 0))])
        self._check_coordinates(gathered, rows)
        sequences = gathered.astype(np.float32) * valid[..., None, None, None]  # (N, T, 2, 25, 3), padding zeros
        if self.center or (self.train and self.rotate_degrees):
            tracked = np.any(sequences != 0, axis=(3, 4))[..., None, None]     # missing bodies stay zeros
            if self.center:
                sequences -= self._centres(frames, offsets, lengths)[:, None, None, None, :]
            if self.train and self.rotate_degrees:
                angles = np.radians(self._rng.uniform(-self.rotate_degrees, self.rotate_degrees, len(rows)))
                rotate_vertical(sequences, angles[:, None, None, None])
            sequences *= tracked
        inputs = torch.from_numpy(sequences.reshape(len(rows), steps, FEATURES))
        targets = self.labels[torch.as_tensor(rows, dtype=torch.long)]
        # K > 1: the K samplings of each sample are adjacent sequences of one group (test-time augmentation).
        return SequenceBatch(inputs, targets, groups=repeat_samplings(len(indices), count) if count > 1 else None)

    def _check_coordinates(self, gathered: np.ndarray, rows: np.ndarray) -> None:
        """One-line DataError if the frames read for this batch, (N, T, 2, 25, 3), hold a coordinate that
        cannot be a body: non-finite, or beyond MAX_COORDINATE metres (one pass over the batch; a NaN makes
        the maximum NaN, which fails the comparison)."""
        if not gathered.size:
            return
        peak = np.abs(gathered).max()
        if peak <= MAX_COORDINATE:
            return
        magnitude = np.abs(gathered.reshape(len(rows), -1).astype(np.float64))
        bad = ~(magnitude <= MAX_COORDINATE)
        sequence = int(np.flatnonzero(bad.any(axis=1))[0])
        value = gathered.reshape(len(rows), -1)[sequence][bad[sequence]][0]
        row = int(self.rows[rows[sequence]])
        with open_hdf5(self.path) as h5:
            name = h5["name"][row].decode(errors="replace")
        raise DataError(f"{self.path}: sample {name} (row {row}) has the coordinate {value:g}, "
                        f"{'not a number' if not np.isfinite(value) else f'beyond {MAX_COORDINATE:g} m'}: the file was "
                        f"changed or damaged after conversion (task.datamodule.verify=full checks every sample); make it "
                        f"again: {remake_command(self.path)}")

    @staticmethod
    def _centres(frames, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """(N, 3): the first body's spine joint in the first frame where that body is tracked."""
        centres = np.asarray(frames[offsets.tolist()] if isinstance(frames, np.ndarray) else
                             np.stack([frames[o] for o in offsets]), dtype=np.float32)[:, 0, SPINE_JOINT]
        for n in np.flatnonzero(~centres.any(axis=1)):  # rare: the first body appears later
            sample = np.asarray(frames[offsets[n]:offsets[n] + lengths[n]], dtype=np.float32)[:, 0]
            tracked = np.flatnonzero(sample.any(axis=(1, 2)))
            centres[n] = sample[tracked[0], SPINE_JOINT] if len(tracked) else 0.0
        return centres

    def __getitem__(self, index: int) -> SequenceBatch:
        """One sample: inputs (T, 150), or its K sets of frames (K, T, 150) in evaluation with K > 1;
        target () int64."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        batch = self.__getitems__([index % len(self)])
        return SequenceBatch(batch.inputs if batch.groups is not None else batch.inputs[0], batch.targets[0])
