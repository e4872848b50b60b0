"""NTU RGB+D skeleton action recognition (60 and 120 classes), read lazily from the converter's HDF5 file.

Make the file once with ``python prepare_ntu.py raw=PATH out=data/ntu/ntu60.h5`` (datamodules/ntu_convert.py).

Splits (the datasets' own protocols): NTU-60 ``cross_subject`` (20 training performers, listed in
:data:`NTU60_TRAIN_PERFORMERS`) and ``cross_view`` (cameras 2 and 3 train, camera 1 tests); NTU-120
``cross_subject120`` (53 training performers) and ``cross_setup120`` (even setups train). The NTU-60
splits use only setups 1-17 and actions 1-60, so they also work on an NTU-120 file. Validation is a
seeded ``val_fraction`` of the training samples (ceil, as the official code's 5%).

Sampling, as the official IndRNN code (:func:`sample_frame_indices`): each sequence becomes ``steps``
(20) frames. Longer than 2 x steps: one random frame in each of ``steps`` equal segments; between steps
and 2 x steps: a random contiguous window; up to ``steps``: the frames at a random offset in zeros.
Training draws new frames every time; evaluation draws ``samplings`` (K) sets per sequence, seeded by
the sample's index so every evaluation sees the same ones: the batch holds the K sets of each sample as
K adjacent sequences of one group (``SequenceBatch.groups``), and the objective averages their logits.

Each DataLoader worker (and each DDP rank) opens the HDF5 file itself on its first batch: h5py
handles cannot be pickled, and only the frames of the requested samples are ever read.

A damaged file is one line naming it and the fix (a :class:`DataError`), never a traceback: setup
checks the layout (datasets, offsets, labels) and what the converter recorded in the manifest (the
per-sample CRC-32s and the coordinates' range; ``verify="quick"`` checks 16 samples' CRCs,
``"full"`` every sample's), and every batch read is checked for coordinates that cannot be a body
(non-finite or beyond ``MAX_COORDINATE`` = 10 m), naming the sample.
"""
from __future__ import annotations

import json
import logging
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.download import DataError, DownloadError
from datamodules.ntu_convert import FORMAT, MAX_COORDINATE, sample_checksum
from datamodules.ntu_skeleton import MAX_BODIES, META_FIELDS, NUM_JOINTS
from datamodules.splits import SplitDataModule, collate_batched
from src.batch import SequenceBatch, repeat_samplings
from src.checks import check_choice, check_fraction, check_non_negative_int, check_positive_int

log = logging.getLogger(__name__)

FEATURES = MAX_BODIES * NUM_JOINTS * 3   # 150 inputs per step: 2 bodies x 25 joints x xyz
SPINE_JOINT = 1                          # 0-based: NTU's joint 2, "middle of the spine"
NTU60_TRAIN_PERFORMERS = (1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38)
NTU120_TRAIN_PERFORMERS = NTU60_TRAIN_PERFORMERS + (
    45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82, 83, 84, 85, 86, 89, 91, 92, 93,
    94, 95, 97, 98, 100, 103)
NTU60_TRAIN_CAMERAS = (2, 3)
SPLITS = ("cross_subject", "cross_view", "cross_subject120", "cross_setup120")
NUM_CLASSES = {"cross_subject": 60, "cross_view": 60, "cross_subject120": 120, "cross_setup120": 120}
# Published (train, test) sizes, which count the 302 NTU-60 samples without a skeleton, and the sizes
# once those are gone (train includes validation; the official code's logs: 38086 + 2005 / 16487 and
# 35763 + 1883 / 18932).
PUBLISHED_SIZES = {"cross_subject": (40320, 16560), "cross_view": (37920, 18960)}
WITHOUT_MISSING_SIZES = {"cross_subject": (40091, 16487), "cross_view": (37646, 18932)}
DEFAULT_RAW = "nturgbd_skeletons_s001_to_s017.zip"
MAX_ACTIONS = 120                        # NTU-120's actions; labels are action - 1
VERIFY = ("quick", "full")
QUICK_CHECKSUMS = 16                     # samples whose CRC-32 the quick check compares (first, last, spread)
PER_SAMPLE_DATASETS = ("name", "offset", "length", "label", *META_FIELDS)


def remake_command(path: str | Path) -> str:
    """The command that writes the file again."""
    return f"`python prepare_ntu.py raw=<folder of .skeleton files or {DEFAULT_RAW}> out={path} overwrite=true`"


def open_hdf5(path: str | Path, **options):
    """``h5py.File(path, "r")``; a file that HDF5 cannot open (truncated, damaged) or a converter's
    temporary ``.partial`` file is a one-line DataError naming the file and the fix."""
    import h5py

    path = Path(path)
    if path.name.startswith(".") and path.name.endswith((".partial", ".partial.frames")):
        final = path.with_name(path.name[1:].split(".partial")[0])
        raise DataError(f"{path} is the temporary file of a prepare_ntu.py conversion (still running, or interrupted); "
                        f"set task.datamodule.path={final}, the file the conversion writes when it ends")
    try:
        return h5py.File(path, "r", **options)
    except OSError as error:
        raise DataError(f"{path}: HDF5 cannot read it ({' '.join(str(error).split())}): the file is truncated or "
                        f"damaged (an interrupted copy?); copy it again or make it again: {remake_command(path)}") from None


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


def read_verified_metadata(path: str | Path, full: bool = False) -> dict[str, np.ndarray]:
    """The file's per-sample arrays (offset, length, label, setup, camera, performer, ...) after checking
    the file against its layout and against what the converter recorded.

    Always: every per-sample dataset is there with one entry per sample, ``skeletons`` is (F, 2, 25, 3),
    the samples' frames tile it back to back, labels are actions - 1 within NTU's 120; with a content
    record in the manifest (converter version 2): the counts, the range of the coordinates within
    +-MAX_COORDINATE metres, the CRC-32 of the per-sample checksums, and the CRC-32 of
    ``QUICK_CHECKSUMS`` samples (``full``: of every sample, reading the whole file once).

    Raises:
        DataError: one line naming the file, what is wrong (the first bad sample) and the fix.
    """
    path = Path(path)
    remake = f"make it again: {remake_command(path)}"
    with open_hdf5(path) as h5:
        missing = [key for key in ("skeletons", *PER_SAMPLE_DATASETS) if key not in h5]
        if missing:
            raise DataError(f"{path}: no {', '.join(repr(k) for k in missing)} dataset (it has {sorted(h5.keys())}): "
                            f"the file is damaged or not from prepare_ntu.py; {remake}")
        meta = {key: h5[key][:] for key in PER_SAMPLE_DATASETS}
        skeletons = h5["skeletons"]
        names = meta.pop("name")
        count = len(names)
        uneven = {key: len(values) for key, values in meta.items() if len(values) != count}
        if uneven:
            raise DataError(f"{path}: {count} sample names but {uneven}: the file is damaged; {remake}")
        if skeletons.ndim != 4 or skeletons.shape[1:] != (MAX_BODIES, NUM_JOINTS, 3):
            raise DataError(f"{path}: skeletons has shape {skeletons.shape}, expected (frames, {MAX_BODIES}, "
                            f"{NUM_JOINTS}, 3): the file is damaged; {remake}")

        def where(row: int) -> str:
            return f"sample {names[row].decode(errors='replace')} (row {row})"

        lengths, offsets = meta["length"].astype(np.int64), meta["offset"].astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if count else lengths
        wrong = np.flatnonzero((lengths < 1) | (offsets != starts))
        if len(wrong) or (count and int(starts[-1] + lengths[-1]) != skeletons.shape[0]):
            detail = (f"{where(int(wrong[0]))} has offset {offsets[wrong[0]]} and length {lengths[wrong[0]]}"
                      if len(wrong) else f"the samples end at frame {int(starts[-1] + lengths[-1])} of {skeletons.shape[0]}")
            raise DataError(f"{path}: the samples' frames do not tile the skeletons ({detail}): the file is damaged; {remake}")
        labels = meta["label"].astype(np.int64)
        wrong = np.flatnonzero((labels < 0) | (labels >= MAX_ACTIONS) | (labels != meta["action"].astype(np.int64) - 1))
        if len(wrong):
            row = int(wrong[0])
            raise DataError(f"{path}: {where(row)} has label {labels[row]} for action {meta['action'][row]} (labels are "
                            f"action - 1, 0 to {MAX_ACTIONS - 1}): the file is damaged; {remake}")
        _verify_content(path, h5, names, offsets, lengths, full, remake)
    return meta


def _verify_content(path: Path, h5, names: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, full: bool,
                    remake: str) -> None:
    """Compare the file with the manifest's content record (see :func:`read_verified_metadata`)."""
    try:
        manifest = json.loads(h5.attrs.get("manifest", "{}"))
    except (TypeError, ValueError):
        raise DataError(f"{path}: its manifest is not JSON: the file is damaged; {remake}") from None
    content = manifest.get("content") if isinstance(manifest, dict) else None
    if not isinstance(content, dict) or "checksum" not in h5:
        log.warning("%s was written by an older prepare_ntu.py (no checksums): its content cannot be verified; "
                    "convert again to add them: %s", path, remake_command(path))
        return
    counts, skeletons = manifest.get("counts", {}), h5["skeletons"]
    for key, actual in (("samples", len(names)), ("frames", skeletons.shape[0])):
        if key in counts and counts[key] != actual:
            raise DataError(f"{path}: {actual} {key} where prepare_ntu.py wrote {counts[key]}: the file was changed "
                            f"or damaged after conversion; {remake}")
    low, high = content.get("min"), content.get("max")
    if low is not None and not (-MAX_COORDINATE <= low <= high <= MAX_COORDINATE):
        raise DataError(f"{path}: prepare_ntu.py recorded coordinates from {low} to {high} m, beyond +-{MAX_COORDINATE:g} m: "
                        f"not NTU skeletons in metres; {remake}")
    checksums = h5["checksum"][:].astype("<u4")
    if len(checksums) != len(names) or zlib.crc32(checksums.tobytes()) != content.get("checksum_of_checksums"):
        raise DataError(f"{path}: its per-sample checksums differ from those prepare_ntu.py wrote: the file was changed "
                        f"or damaged after conversion; {remake}")
    if full:
        rows = np.arange(len(names))
    else:
        rows = np.unique(np.linspace(0, len(names) - 1, min(QUICK_CHECKSUMS, len(names))).round().astype(np.int64))
    # Read in blocks of consecutive samples (at most ~64k frames, ~40 MB in float32, or one sample).
    block_start = 0
    while block_start < len(rows):
        block_end = block_start + 1
        if full:
            while (block_end < len(rows) and rows[block_end] == rows[block_end - 1] + 1
                   and offsets[rows[block_end]] + lengths[rows[block_end]] - offsets[rows[block_start]] <= 1 << 16):
                block_end += 1
        first, last = rows[block_start], rows[block_end - 1]
        frames = skeletons[offsets[first]:offsets[last] + lengths[last]]
        for row in rows[block_start:block_end]:
            sample = frames[offsets[row] - offsets[first]:offsets[row] - offsets[first] + lengths[row]]
            actual = sample_checksum(sample)
            if actual != int(checksums[row]):
                option = "" if full else " (task.datamodule.verify=full checks every sample)"
                raise DataError(f"{path}: sample {names[row].decode(errors='replace')} (row {row}) differs from what "
                                f"prepare_ntu.py wrote (CRC-32 {actual:08x}, recorded {int(checksums[row]):08x}): the file "
                                f"was changed or damaged after conversion{option}; {remake}")
        block_start = block_end


def missing_file_message(path: str | Path) -> str:
    """One line: where the HDF5 file was expected and the command that makes it."""
    return (f"NTU RGB+D skeletons not found: expected the HDF5 file {path}; make it with "
            f"`python prepare_ntu.py raw=<folder of .skeleton files or {DEFAULT_RAW}> out={path}`")


class NTUDataModule(SplitDataModule):
    """NTU RGB+D splits from the converter's HDF5 file, sampled as the official IndRNN code does.

    Args:
        path: the HDF5 file written by ``prepare_ntu.py``.
        split: "cross_subject", "cross_view" (NTU-60), "cross_subject120" or "cross_setup120" (NTU-120).
        steps: T, frames sampled per sequence (official: 20).
        val_fraction: share of the training samples held out for validation (official: 0.05).
        split_seed: seed of that hold-out and of the evaluation samplings.
        val_samplings: K for validation: logits averaged over K sampled sets (1: one set, as the
            official code's validation).
        test_samplings: K for testing (official: 20).
        center: subtract the first frame's spine joint (an option, off in the official recipe).
        rotate_degrees: random rotation about the vertical axis in training, U(-r, r) degrees (0: off).
        random_length: [low, high]: training T drawn per batch in [low, high] (the papers' 10-30); null: off.
        batch_size: sequences per batch (official: 128).
        num_workers: DataLoader worker processes; each opens the file itself.
        verify: how setup checks the file against the converter's manifest: "quick" (the layout, the
            recorded range and the CRC-32 of 16 samples: milliseconds) or "full" (every sample's CRC-32:
            reads the whole file once). Batches are always checked for impossible coordinates.
        drop_last: drop each epoch's last, short training batch (the official loader: every batch full).
    """

    benchmark = "NTU RGB+D"
    collate_fn = staticmethod(collate_batched)  # the dataset returns whole batches

    def __init__(self, path: str, split: str = "cross_subject", steps: int = 20, val_fraction: float = 0.05,
                 split_seed: int = 0, val_samplings: int = 1, test_samplings: int = 20, center: bool = False,
                 rotate_degrees: float = 0.0, random_length: list[int] | None = None, batch_size: int = 128,
                 num_workers: int = 4, verify: str = "quick", drop_last: bool = False) -> None:
        super().__init__(batch_size, num_workers, drop_last)
        if path is None or str(path) == "":
            raise ValueError(f"{self.benchmark}: path must name the HDF5 file; {missing_file_message('data/ntu/ntu60.h5')}")
        check_choice(f"{self.benchmark}: split", split, SPLITS)
        self.verify = check_choice(f"{self.benchmark}: verify", verify, VERIFY)
        check_positive_int(f"{self.benchmark}: steps", steps)
        check_fraction(f"{self.benchmark}: val_fraction", val_fraction, closed_low=False)
        check_non_negative_int(f"{self.benchmark}: split_seed", split_seed)
        check_positive_int(f"{self.benchmark}: val_samplings", val_samplings)
        check_positive_int(f"{self.benchmark}: test_samplings", test_samplings)
        if not isinstance(center, bool):
            raise ValueError(f"{self.benchmark}: center must be true or false, got {center!r}")
        check_fraction(f"{self.benchmark}: rotate_degrees", rotate_degrees, 0.0, 180.0, closed_high=True)
        if random_length is not None:
            bounds = list(random_length) if not isinstance(random_length, (str, bytes)) else []
            if len(bounds) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in bounds) \
                    or bounds[0] > bounds[1]:
                raise ValueError(f"{self.benchmark}: random_length must be [low, high] with 1 <= low <= high, or null, "
                                 f"got {random_length!r}")
            random_length = (bounds[0], bounds[1])
        self.path, self.split_name, self.steps = Path(path), split, steps
        self.val_fraction, self.split_seed = float(val_fraction), split_seed
        self.val_samplings, self.test_samplings = val_samplings, test_samplings
        self.center, self.rotate_degrees, self.random_length = center, float(rotate_degrees), random_length
        self.sizes: dict[str, int] = {}

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.split_name]

    @property
    def input_size(self) -> int:
        return FEATURES

    def prepare_data(self) -> None:
        """Nothing to download: check that the converted file is there (one line naming the command if not)."""
        self._check_file()

    @property
    def data_source(self) -> str:
        """The file the batches come from (named when a loss turns non-finite)."""
        return str(self.path)

    def _check_file(self) -> None:
        if not self.path.is_file() and not self.path.name.endswith(".partial"):
            raise DownloadError(self.path.name, self.path.parent, [], message=missing_file_message(self.path))
        with open_hdf5(self.path) as h5:
            if h5.attrs.get("format") != FORMAT or not h5.attrs.get("complete", False):
                raise DownloadError(self.path.name, self.path.parent, [], message=(
                    f"{self.path} is not a complete NTU skeleton file from prepare_ntu.py (format "
                    f"{h5.attrs.get('format')!r}, complete={h5.attrs.get('complete')}); convert again: "
                    f"{remake_command(self.path)}"))

    def read_metadata(self) -> dict[str, np.ndarray]:
        """The file's per-sample arrays (offset, length, label, setup, camera, performer, ...), all small,
        once the file passed the checks of :func:`read_verified_metadata` (``verify``)."""
        self._check_file()
        return read_verified_metadata(self.path, full=self.verify == "full")

    def split_rows(self, meta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of the train, val and test splits (sorted), by the split's protocol and the seeded hold-out."""
        name = self.split_name
        if name in ("cross_subject", "cross_view"):
            usable = (meta["setup"] <= 17) & (meta["action"] <= 60)  # NTU-60 inside an NTU-120 file too
        else:
            usable = np.ones(len(meta["label"]), dtype=bool)
        if name == "cross_subject":
            training = np.isin(meta["performer"], NTU60_TRAIN_PERFORMERS)
        elif name == "cross_view":
            training = np.isin(meta["camera"], NTU60_TRAIN_CAMERAS)
        elif name == "cross_subject120":
            training = np.isin(meta["performer"], NTU120_TRAIN_PERFORMERS)
        else:
            training = meta["setup"] % 2 == 0
        train_rows = np.flatnonzero(usable & training)
        test_rows = np.flatnonzero(usable & ~training)
        val_count = math.ceil(self.val_fraction * len(train_rows))
        if not 0 < val_count < len(train_rows) or not len(test_rows):
            raise DataError(f"{self.benchmark} {name}: {self.path} gives {len(train_rows)} training and {len(test_rows)} "
                            f"test samples (validation {val_count}) of its {len(meta['label'])}; every split needs "
                            f"samples: is it the right file? Make it from all the skeletons: {remake_command(self.path)}")
        order = np.random.default_rng(self.split_seed).permutation(len(train_rows))
        return {"train": np.sort(train_rows[order[val_count:]]), "val": np.sort(train_rows[order[:val_count]]),
                "test": test_rows}

    def _log_sizes(self) -> None:
        sizes = self.sizes
        line = f"{self.benchmark} {self.split_name}: train {sizes['train']}, val {sizes['val']}, test {sizes['test']}"
        published = PUBLISHED_SIZES.get(self.split_name)
        if published is None:
            log.info("%s", line)
            return
        ours = (sizes["train"] + sizes["val"], sizes["test"])
        if ours == WITHOUT_MISSING_SIZES[self.split_name]:
            note = (f"as published ({published[0]} / {published[1]}) less the 302 samples without a skeleton "
                    f"({published[0] - ours[0]} / {published[1] - ours[1]})")
        elif ours == published:
            note = "as published"
        else:
            note = (f"differs from the published {published[0]} / {published[1]} (or {WITHOUT_MISSING_SIZES[self.split_name][0]}"
                    f" / {WITHOUT_MISSING_SIZES[self.split_name][1]} without the 302 samples that have no skeleton): "
                    f"a partial or synthetic file?")
        log.info("%s; train + val / test = %d / %d, %s", line, ours[0], ours[1], note)

    def setup(self, stage: str | None = None) -> None:
        """Read the small per-sample arrays and build the three splits (every process; cheap to repeat)."""
        if self.splits:
            return
        meta = self.read_metadata()
        if len(meta["label"]) and int(meta["label"].max()) >= self.num_classes:
            raise DataError(f"{self.benchmark} {self.split_name}: {self.path} has action {int(meta['label'].max()) + 1}, "
                            f"beyond the split's {self.num_classes} classes: an NTU-120 file; use an NTU-120 split "
                            f"(task=ntu120_csub or ntu120_cset)")
        rows = self.split_rows(meta)
        common = dict(offsets=meta["offset"], lengths=meta["length"], labels=meta["label"], steps=self.steps,
                      center=self.center, seed=self.split_seed)
        self.splits = {
            "train": NTUSkeletons(self.path, rows["train"], train=True, rotate_degrees=self.rotate_degrees,
                                  random_length=self.random_length, **common),
            "val": NTUSkeletons(self.path, rows["val"], train=False, samplings=self.val_samplings, **common),
            "test": NTUSkeletons(self.path, rows["test"], train=False, samplings=self.test_samplings, **common),
        }
        self.sizes = {name: len(split) for name, split in self.splits.items()}
        self._log_sizes()

    def split(self, name: str) -> Dataset:
        if not self.splits:  # loaders asked for before setup (e.g. by hand)
            self.setup()
        return self.splits[name]
