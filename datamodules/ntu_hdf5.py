"""The NTU HDF5 file: its layout, how it is written (the converter, the synthetic set) and how it is
read and verified (the DataModule). One home for both sides, so that they cannot disagree.

HDF5 layout (version :data:`CONVERTER_VERSION`), see also README.md::

    skeletons     (total_frames, 2, 25, 3) float32 (or float16); by default contiguous and uncompressed,
                  which the DataModule memory-maps (13x the samples/s of gzip chunks, measured), or
                  chunked (64 frames) and compressed with compression=gzip or lzf; frames of all
                  samples back to back: sample i is skeletons[offset[i] : offset[i] + length[i]]
    offset        (N,) int64      first frame of each sample
    length        (N,) int32      frames of each sample
    name          (N,) S20        SsssCcccPpppRrrrAaaa
    setup, camera, performer, replication, action   (N,) int16   from the name (1-based, as NTU)
    label         (N,) int16      action - 1
    bodies        (N,) int8       bodies kept (1 or 2)
    checksum      (N,) uint32     CRC-32 of each sample's frames as stored (its bytes in the file's dtype)
    attrs: format="ntu-rgbd-skeletons", converter_version, complete=True (set last),
           manifest = JSON {counts, skipped [{name, reason, detail}], source, options,
                            content {checksum_of_checksums, min, max}, ...}

What was written is recorded so that a reader can check the file: a CRC-32 per sample, a CRC-32 of
those checksums and the coordinates' range in the manifest. :func:`read_verified_metadata` checks
the layout (datasets, offsets, labels) and that record (``full=False``: 16 samples' CRCs; ``True``:
every sample's); a damaged file is one line naming it and the fix (a :class:`DataError`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from datamodules.download import DataError
from datamodules.ntu_skeleton import MAX_BODIES, META_FIELDS, NUM_JOINTS, parse_sample_name
from src.checks import check_choice

log = logging.getLogger(__name__)

CONVERTER_VERSION = 2          # 2: per-sample checksums and the value range in the manifest
MAX_COORDINATE = 10.0          # metres: |x|, |y|, |z| beyond it are not a body the Kinect saw
FORMAT = "ntu-rgbd-skeletons"
CHUNK_FRAMES = 64              # HDF5 chunk: 64 frames (38 KB in float32), about one sample
DTYPES = {"float32": np.float32, "float16": np.float16}
DEFAULT_RAW = "nturgbd_skeletons_s001_to_s017.zip"
MAX_ACTIONS = 120              # NTU-120's actions; labels are action - 1
QUICK_CHECKSUMS = 16           # samples whose CRC-32 the quick check compares (first, last, spread)
PER_SAMPLE_DATASETS = ("name", "offset", "length", "label", *META_FIELDS)


# Writing ------------------------------------------------------------------------------------------


@dataclass
class SampleRecords:
    """Per-sample arrays gathered while frames stream into the HDF5 dataset."""

    names: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    bodies: list[int] = field(default_factory=list)
    meta: dict[str, list[int]] = field(default_factory=lambda: {key: [] for key in META_FIELDS})
    checksums: list[int] = field(default_factory=list)     # CRC-32 of each sample's stored bytes
    low: float = math.inf                                  # the smallest and largest coordinate written
    high: float = -math.inf

    def content(self) -> dict:
        """The manifest's record of what was written: the CRC-32 of the ``checksum`` dataset's bytes
        (uint32 little-endian) and the coordinates' range (None without samples)."""
        checksums = np.array(self.checksums, dtype="<u4")
        return {"checksum": "crc32 per sample of its stored bytes, in the 'checksum' dataset",
                "checksum_of_checksums": zlib.crc32(checksums.tobytes()),
                "min": None if not self.checksums else float(self.low),
                "max": None if not self.checksums else float(self.high)}


def sample_checksum(frames: np.ndarray) -> int:
    """CRC-32 of one sample's frames (F, 2, 25, 3) as stored (C order, the file's dtype, little-endian)."""
    return zlib.crc32(np.ascontiguousarray(frames, dtype=frames.dtype.newbyteorder("<")).tobytes())


def write_samples(path: str | os.PathLike, results: Iterable[tuple[str, np.ndarray | None, str, str]], total: int,
                  dtype: str = "float32", compression: str = "none", progress: bool = False,
                  skipped: list[dict[str, str]] | None = None) -> tuple[SampleRecords, int]:
    """Stream ``(name, array (F, 2, 25, 3) or None, reason, detail)`` results into a new HDF5 file ``path``
    in the layout above (without the manifest and the ``complete`` flag, which :func:`datamodules.ntu_convert.convert` adds last).

    Failed results (array None) are appended to ``skipped``. ``total`` sizes the progress bar.
    Returns the per-sample lists and the number of frames written.
    """
    import h5py
    from tqdm import tqdm

    skipped = [] if skipped is None else skipped
    dtype = DTYPES[check_choice("dtype", dtype, tuple(DTYPES))]

    samples, total_frames = SampleRecords(), 0
    pending: list[np.ndarray] = []
    pending_frames = 0
    with h5py.File(path, "w") as h5:
        h5.attrs["format"] = FORMAT
        h5.attrs["converter_version"] = CONVERTER_VERSION
        h5.attrs["complete"] = False
        frame_shape = (MAX_BODIES, NUM_JOINTS, 3)
        # compression "none": a contiguous dataset, which readers map into memory (np.memmap) instead of
        # going through h5py per sample; its size is known only at the end, so the frames wait in a side file.
        side_file = Path(f"{path}.frames") if compression == "none" else None
        side = open(side_file, "wb") if side_file else None
        if side is None:
            skeletons = h5.create_dataset("skeletons", shape=(0, *frame_shape), dtype=dtype,
                                          maxshape=(None, *frame_shape), chunks=(CHUNK_FRAMES, *frame_shape),
                                          compression=compression, shuffle=True)

        def flush() -> None:
            nonlocal pending, pending_frames
            if pending:
                block = np.concatenate(pending).astype(dtype)
                if side is not None:
                    side.write(block.tobytes())
                else:
                    begin = skeletons.shape[0]
                    skeletons.resize(begin + pending_frames, axis=0)
                    skeletons[begin:] = block
                pending, pending_frames = [], 0

        bar = tqdm(total=total, unit="file", desc="parsing skeletons", disable=not progress, file=sys.stderr)
        for name, array, reason, detail in results:
            bar.update()
            if array is None:
                skipped.append({"name": name, "reason": reason, "detail": detail})
                continue
            meta = parse_sample_name(name)
            samples.names.append(name)
            samples.offsets.append(total_frames)
            samples.lengths.append(len(array))
            samples.bodies.append(int(np.any(array[:, 1] != 0)) + 1)
            stored = array.astype(dtype, copy=False)
            samples.checksums.append(sample_checksum(stored))
            if len(stored):
                samples.low = min(samples.low, float(stored.min()))
                samples.high = max(samples.high, float(stored.max()))
            for key in META_FIELDS:
                samples.meta[key].append(meta[key])
            total_frames += len(array)
            pending.append(array)
            pending_frames += len(array)
            if pending_frames >= 64 * CHUNK_FRAMES:
                flush()
        flush()
        bar.close()
        if side is not None:
            side.close()
            skeletons = h5.create_dataset("skeletons", shape=(total_frames, *frame_shape), dtype=dtype)
            if total_frames:
                frames = np.memmap(side_file, dtype=dtype, mode="r", shape=(total_frames, *frame_shape))
                for begin in range(0, total_frames, 1 << 16):
                    skeletons[begin:begin + (1 << 16)] = frames[begin:begin + (1 << 16)]
                del frames
            side_file.unlink()
        h5.create_dataset("name", data=np.array(samples.names, dtype="S20"))
        h5.create_dataset("offset", data=np.array(samples.offsets, dtype=np.int64))
        h5.create_dataset("length", data=np.array(samples.lengths, dtype=np.int32))
        h5.create_dataset("bodies", data=np.array(samples.bodies, dtype=np.int8))
        for key in META_FIELDS:
            h5.create_dataset(key, data=np.array(samples.meta[key], dtype=np.int16))
        h5.create_dataset("label", data=np.array(samples.meta["action"], dtype=np.int16) - 1)
        h5.create_dataset("checksum", data=np.array(samples.checksums, dtype="<u4"))
    return samples, total_frames


# Reading ------------------------------------------------------------------------------------------


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


def missing_file_message(path: str | Path) -> str:
    """One line: where the HDF5 file was expected and the command that makes it."""
    return (f"NTU RGB+D skeletons not found: expected the HDF5 file {path}; make it with "
            f"`python prepare_ntu.py raw=<folder of .skeleton files or {DEFAULT_RAW}> out={path}`")


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
