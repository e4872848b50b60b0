"""NTU RGB+D (60 and 120) raw ``.skeleton`` text files -> one HDF5 file that the NTU DataModule reads lazily.

Run it as ``python prepare_ntu.py raw=PATH out=data/ntu/ntu60.h5`` (prepare_ntu.py holds the command line; see README.md).
``raw`` is the folder of ``.skeleton`` files or the downloaded zip (``nturgbd_skeletons_s001_to_s017.zip``,
read member by member, never extracted); several sources are separated by commas (NTU-120 = both zips).

The text layout and its parsing are in :mod:`datamodules.ntu_skeleton`. Only x, y, z (camera space, metres) are kept. Bodies: every tracked body ID is a candidate; IDs seen in
fewer than ``min_body_frames`` frames are noise (spurious detections) and dropped unless nothing else
is left; the rest are ranked by the motion of their joints (summed variance over time) and the two
most active become slots 0 and 1 for the whole sequence, so one person stays in one slot. A missing
second person is zeros; frames where neither kept body is tracked are dropped; a sample with no body
in any frame is skipped ("no skeleton").

The HDF5 layout, its writer (:func:`write_samples`) and its reader are in :mod:`datamodules.ntu_hdf5`.
What was written is recorded so that a reader can check the file (the DataModule verifies it on
first open): a CRC-32 per sample, a CRC-32 of those checksums and the coordinates' range in the
manifest. Coordinates are metres in the Kinect's camera space: a sample with a coordinate beyond
:data:`MAX_COORDINATE` (10 m; the sensor sees up to 8 m) or a non-finite one is skipped ("out of range").

Bad files never stop a conversion: each is skipped with a reason (:data:`REASONS`), counted, listed in
the manifest and in the summary table printed at the end. The file is written under a hidden
temporary name next to ``out`` and renamed when complete, so an interrupted run leaves no file that
looks finished; the next run removes the leftover and starts again. One converter writes an output
at a time: a lock file next to it (``.{name}.lock``, storage/lock.py) refuses a second one in
one line naming the first, and a lock left by a killed converter is taken over.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from datamodules.ntu_hdf5 import CONVERTER_VERSION, DTYPES, FORMAT, MAX_COORDINATE, write_samples
from datamodules.ntu_skeleton import MAX_BODIES, SkeletonFormatError, parse_sample_name, skeleton_array
from src.checks import check_choice, check_non_negative_int, check_positive_int
from storage.atomic import replace_atomically
from storage.lock import FileLock, LockHeld

log = logging.getLogger(__name__)

COMPRESSIONS = ("gzip", "lzf", "none")
SUFFIX = ".skeleton"
EXPECTED_RAW = ("the folder of NTU RGB+D .skeleton files or the downloaded zip "
                "(nturgbd_skeletons_s001_to_s017.zip; NTU-120 adds nturgbd_skeletons_s018_to_s032.zip)")
# Why a sample can be skipped; the order is the summary table's.
REASONS = ("excluded", "unknown file name", "duplicate", "empty file", "unreadable", "truncated",
           "wrong body count", "wrong joint count", "wrong field count", "non-numeric field", "trailing data",
           "out of range", "no skeleton")


class ConvertError(Exception):
    """A problem with the converter's arguments or sources, reported as one line (no traceback)."""


# Parsing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkeletonFile:
    """One ``.skeleton`` file: on disk (``member`` None) or a member of the zip ``source``."""

    name: str            # sample name, the file name without ".skeleton"
    source: str          # folder file path, or the zip's path
    member: str | None   # the member inside the zip, or None

    def where(self) -> str:
        return f"{self.source}:{self.member}" if self.member else self.source


def find_skeleton_files(raw: str | os.PathLike) -> list[SkeletonFile]:
    """Every ``.skeleton`` file in a folder (recursively) or a zip, sorted by name.

    Raises ConvertError (one line) when ``raw`` is missing, not a folder or zip, or has no skeletons.
    """
    path = Path(raw)
    if not path.exists():
        raise ConvertError(f"raw: {path} does not exist; expected {EXPECTED_RAW}")
    if path.is_dir():
        files = [SkeletonFile(p.name[:-len(SUFFIX)], str(p), None) for p in path.rglob("*")
                 if p.name.lower().endswith(SUFFIX) and p.is_file()]
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            files = [SkeletonFile(Path(info.filename).name[:-len(SUFFIX)], str(path), info.filename)
                     for info in archive.infolist()
                     if not info.is_dir() and info.filename.lower().endswith(SUFFIX)]
    else:
        raise ConvertError(f"raw: {path} is neither a folder nor a zip file; expected {EXPECTED_RAW}")
    if not files:
        raise ConvertError(f"raw: no .skeleton files in {path}; expected {EXPECTED_RAW}")
    return sorted(files, key=lambda f: (f.name, f.where()))


def read_exclusions(path: str | os.PathLike) -> set[str]:
    """Sample names to leave out, one per line (``#`` starts a comment; a ``.skeleton`` suffix is allowed),
    e.g. NTU's published list of the 302 samples with missing skeletons."""
    exclusion_file = Path(path)
    if not exclusion_file.is_file():
        raise ConvertError(f"exclude: {exclusion_file} is not a file; expected a list of sample names, one per line "
                           f"(e.g. NTU's NTU_RGBD_samples_with_missing_skeletons.txt)")
    names = set()
    for line in exclusion_file.read_text().splitlines():
        token = line.split("#", 1)[0].strip()
        if token:
            names.add(token[:-len(SUFFIX)] if token.lower().endswith(SUFFIX) else token)
    return names


_OPEN_ZIPS: dict[str, zipfile.ZipFile] = {}  # per process: each worker opens each zip once


def _read_bytes(item: SkeletonFile) -> bytes:
    if item.member is None:
        return Path(item.source).read_bytes()
    archive = _OPEN_ZIPS.get(item.source)
    if archive is None:
        archive = _OPEN_ZIPS[item.source] = zipfile.ZipFile(item.source)
    return archive.read(item.member)


def convert_file(item: SkeletonFile, min_body_frames: int = 11) -> tuple[str, np.ndarray | None, str, str]:
    """Read and convert one file: ``(name, array (F, 2, 25, 3) float32 or None, reason, detail)``.

    Never raises for a bad file: the reason says why it was skipped ("" when converted).
    """
    try:
        data = _read_bytes(item)
    except (OSError, zipfile.BadZipFile, KeyError) as error:
        return item.name, None, "unreadable", f"{type(error).__name__}: {error}"
    if not data.strip():
        return item.name, None, "empty file", f"{len(data)} bytes"
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as error:
        return item.name, None, "unreadable", f"not text (byte {error.start})"
    try:
        array = skeleton_array(text, min_body_frames)
    except SkeletonFormatError as error:
        return item.name, None, error.reason, error.detail
    problem = out_of_range(array)
    if problem:
        return item.name, None, "out of range", problem
    return item.name, array, "", ""


def out_of_range(array: np.ndarray) -> str:
    """Why the coordinates of ``array`` (..., 3) cannot be a body (non-finite, or beyond ``MAX_COORDINATE``
    metres), "" when they can."""
    if not array.size:
        return ""
    finite = np.isfinite(array)
    if not finite.all():
        return f"{int((~finite).sum())} non-finite coordinates"
    peak = float(np.abs(array).max())
    return f"a coordinate of {peak:g} m (beyond {MAX_COORDINATE:g} m)" if peak > MAX_COORDINATE else ""


def _convert_task(task: tuple[SkeletonFile, int]) -> tuple[str, np.ndarray | None, str, str]:
    return convert_file(*task)


# Conversion ---------------------------------------------------------------------------------------


def lock_path(out: Path) -> Path:
    """The lock file that lets one converter at a time write ``out``: hidden, next to it."""
    return out.with_name(f".{out.name}.lock")


def partial_path(out: Path) -> Path:
    """Where a conversion writes before the final rename: a hidden file next to ``out``."""
    return out.with_name(f".{out.name}.partial")


def convert(raw: str | os.PathLike | Iterable[str | os.PathLike], out: str | os.PathLike, workers: int | None = None,
            dtype: str = "float32", exclude: str | os.PathLike | None = None, overwrite: bool = False,
            min_body_frames: int = 11, compression: str = "none", progress: bool = True) -> dict:
    """Convert every ``.skeleton`` file under ``raw`` into the HDF5 file ``out``; return the manifest.

    Args:
        raw: a folder of ``.skeleton`` files or an NTU zip, or several of them.
        out: the HDF5 file to write (its folder is created).
        workers: parsing processes (None: one per CPU; 1: parse in this process).
        dtype: "float32" or "float16" for the coordinates.
        exclude: a file listing sample names to leave out (NTU's 302 samples with missing skeletons).
        overwrite: replace an existing ``out``; otherwise an existing file is an error.
        min_body_frames: a body ID tracked in fewer frames is noise (dropped unless it is all there is).
        compression: "none" (default): a contiguous dataset that the DataModule memory-maps, 13x
            faster to read than "gzip" chunks (measured); "gzip" or "lzf" (h5py only): chunked and
            compressed, a smaller file read through h5py.
        progress: show a progress bar (tqdm, on stderr).
    """
    import h5py  # here, so that importing the parser needs no HDF5

    sources = [raw] if isinstance(raw, (str, os.PathLike)) else list(raw)
    if not sources:
        raise ConvertError(f"raw: no source given; expected {EXPECTED_RAW}")
    out = Path(out)
    workers = (os.cpu_count() or 1) if workers is None else check_positive_int("workers", workers)
    check_choice("dtype", dtype, tuple(DTYPES))
    check_choice("compression", compression, COMPRESSIONS)
    check_non_negative_int("min_body_frames", min_body_frames)
    if out.is_dir() or out.suffix.lower() not in (".h5", ".hdf5"):
        raise ConvertError(f"out: {out} must be a file path ending in .h5 or .hdf5, e.g. data/ntu/ntu60.h5")
    if out.exists() and not overwrite:
        raise ConvertError(f"out: {out} already exists; pass overwrite=true to replace it")
    excluded_names = read_exclusions(exclude) if exclude else set()
    found = [item for source in sources for item in find_skeleton_files(source)]

    skipped: list[dict[str, str]] = []
    tasks, seen = [], set()
    for item in sorted(found, key=lambda f: (f.name, f.where())):
        if item.name in excluded_names:
            skipped.append({"name": item.name, "reason": "excluded", "detail": f"listed in {exclude}"})
        elif parse_sample_name(item.name) is None:
            skipped.append({"name": item.name, "reason": "unknown file name",
                            "detail": f"{item.where()} is not SsssCcccPpppRrrrAaaa.skeleton"})
        elif item.name in seen:
            skipped.append({"name": item.name, "reason": "duplicate", "detail": f"{item.where()} (first copy kept)"})
        else:
            seen.add(item.name)
            tasks.append((item, min_body_frames))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path(out), purpose=f"prepare_ntu.py converting into {out}").acquire()
    except LockHeld as error:
        raise ConvertError(f"out: another converter is writing {out}: {error}") from None
    except OSError as error:
        raise ConvertError(f"out: cannot write in {out.parent} ({_reason(error)}); choose out= in a folder you "
                           f"can write, e.g. data/ntu/ntu60.h5") from None
    try:
        # Under the lock: a leftover is never the partial file of a converter still running.
        if out.exists() and not overwrite:
            raise ConvertError(f"out: {out} already exists; pass overwrite=true to replace it")
        return _convert_locked(sources, out, tasks, found, skipped, workers, dtype, compression, min_body_frames,
                               exclude, progress)
    finally:
        lock.release()


def _reason(error: OSError) -> str:
    """A short reason: "Permission denied", "No space left on device", ..."""
    return " ".join(str(error.strerror or error or type(error).__name__).split())


def _convert_locked(sources: list, out: Path, tasks: list, found: list, skipped: list[dict[str, str]], workers: int,
                    dtype: str, compression: str, min_body_frames: int, exclude, progress: bool) -> dict:
    """The conversion proper, with the output's lock held: write the partial file, the manifest, rename."""
    import h5py

    partial = partial_path(out)
    for leftover in (partial, Path(f"{partial}.frames")):
        if leftover.exists():
            log.warning("removing %s, left by an interrupted conversion; starting again", leftover)
            leftover.unlink()
    start = time.time()
    try:
        # Atomic (storage/atomic.py): ``out`` appears only complete; Ctrl-C, a full disk, ... remove the partial file.
        with replace_atomically(out, temporary=partial):
            samples, total_frames = write_samples(partial, _results(tasks, workers), len(tasks), dtype, compression,
                                                  progress, skipped)
            if not samples.names:
                counts = ", ".join(f"{n} {reason}" for reason, n in _reason_counts(skipped).items())
                example = next((f"e.g. {e['name']}: {e['detail']}" for e in skipped if e["reason"] != "excluded"), "")
                raise ConvertError(f"raw: none of the {len(found)} .skeleton files under "
                                   f"{', '.join(map(str, sources))} could be converted ({counts}"
                                   f"{'; ' + example if example else ''}); nothing written to {out}: check that raw= "
                                   f"is NTU RGB+D's skeleton data and that the files are intact (download them again)")
            manifest = {
                "format": FORMAT, "converter_version": CONVERTER_VERSION,
                "source": [str(Path(s).resolve()) for s in sources],
                "options": {"dtype": dtype, "compression": compression, "min_body_frames": min_body_frames,
                            "max_bodies": MAX_BODIES, "exclude": None if exclude is None else str(exclude)},
                "counts": {"files": len(found), "samples": len(samples.names), "frames": total_frames,
                           "skipped": len(skipped), **{reason: n for reason, n in _reason_counts(skipped).items()}},
                "skipped": skipped,
                "content": samples.content(),
                "seconds": round(time.time() - start, 1),
            }
            with h5py.File(partial, "a") as h5:
                h5.attrs["manifest"] = json.dumps(manifest)
                h5.attrs["complete"] = True  # last: a file without it is never read
    except BaseException as error:
        Path(f"{partial}.frames").unlink(missing_ok=True)  # write_samples' side file, if it was interrupted
        if isinstance(error, OSError):  # writing failed (a full disk, a read-only folder): one line
            raise ConvertError(f"out: cannot write {partial} ({_reason(error)}); nothing was written: free space or "
                               f"choose out= elsewhere") from None
        raise
    return manifest


def _reason_counts(skipped: list[dict[str, str]]) -> dict[str, int]:
    counts = Counter(entry["reason"] for entry in skipped)
    return {reason: counts[reason] for reason in REASONS if counts[reason]}


def _results(tasks: list, workers: int) -> Iterator[tuple[str, np.ndarray | None, str, str]]:
    if workers == 1 or len(tasks) < 2:
        yield from map(_convert_task, tasks)
        return
    chunk = max(1, min(32, len(tasks) // (workers * 8)))
    with multiprocessing.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(_convert_task, tasks, chunksize=chunk)


def summary_table(manifest: dict, out: str | os.PathLike) -> str:
    """The end-of-conversion report: counts per outcome, with a few example names for each skip reason."""
    counts = manifest["counts"]
    rows = [("converted", counts["samples"], f"{counts['frames']} frames")]
    by_reason: dict[str, list[str]] = {}
    for entry in manifest["skipped"]:
        by_reason.setdefault(entry["reason"], []).append(entry["name"])
    for reason in REASONS:
        if reason in by_reason:
            names = by_reason[reason]
            rows.append((f"skipped: {reason}", len(names), ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")))
    width = max(len(r[0]) for r in rows)
    lines = [f"NTU RGB+D skeletons -> {out} ({counts['files']} files, {manifest['seconds']} s)"]
    lines += [f"  {label:<{width}}  {count:>7}  {note}" for label, count, note in rows]
    if manifest["skipped"]:
        lines.append("  (every skipped file and its reason: the manifest, h5py.File(out).attrs['manifest'])")
    return "\n".join(lines)
