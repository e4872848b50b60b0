"""The run record, ``<run>/results.json``: its one home. Every writer (the driver, the run recorder,
eval.py) and every reader (resume, the sweep summary, results.py, SLURM requeue) goes through here.

Fields (schema version 1; readers accept records without ``schema``, written before it existed):

* ``schema``: :data:`SCHEMA_VERSION`.
* ``status``: one of :data:`STATUSES`. ``running`` is rewritten after every validation; a record
  still ``running`` whose run directory is not held by a live process (:mod:`.lock`) was killed
  without warning, and every reader shows it as ``killed`` (:func:`status_now`).
* ``error``: the one-line reason of any status but ``running``/``fitted``/``finished``.
* ``task``, ``model``, ``experiment``, ``overrides``, ``output_dir``, ``monitor``, ``host``, ``pid``,
  ``slurm_job_id``, ``params``, ``hardware`` (e.g. ``1 x NVIDIA H100``), ``started_at`` (this session's
  start, local time): what ran, where, when.
* ``steps``, ``epochs``, ``seconds`` (all sessions together), ``best`` (the best validation:
  ``step``, ``epoch``, ``val/*``), ``best_step``, ``best_epoch``, ``val/*`` at the best validation,
  ``<monitor>_best``, ``last_val/*`` (the latest validation), ``test/*`` (the best checkpoint tested),
  ``best_checkpoint``, ``last_checkpoint``.
* Resumed runs: ``resumes``, ``resumed_from`` (a checkpoint file) and ``resume_history``, one entry
  per earlier session: how it ended (``status``, ``error``), its ``steps``, ``seconds``, its test and
  best validation metrics, and ``resumed_from_step``/``resumed_at``.

The write is atomic and durable (storage/atomic.py): a temporary file in the same folder, flushed
and fsynced, renamed over results.json; on any failure (a full disk included) the temporary file is
removed and the previous results.json is left as it was.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from storage.atomic import write_text_atomically

RESULTS_FILE = "results.json"
SCHEMA_VERSION = 1

# How a session of a run can end (``running`` while it trains; ``killed`` is only ever derived).
RUNNING, FITTED, FINISHED, DIVERGED, INTERRUPTED, FAILED, KILLED = (
    "running", "fitted", "finished", "diverged", "interrupted", "failed", "killed")
STATUSES = (RUNNING, FITTED, FINISHED, DIVERGED, INTERRUPTED, FAILED, KILLED)
OK_STATUSES = (FINISHED, FITTED)   # runs whose metrics results.py averages


class UnreadableRecord(ValueError):
    """results.json exists but is not JSON (or not an object)."""


def record_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / RESULTS_FILE


def read_record(run_dir: str | os.PathLike) -> dict | None:
    """The record of ``run_dir``; None when it has none; :class:`UnreadableRecord` when it is broken.
    An OSError other than a missing file (permissions) propagates."""
    try:
        text = record_path(run_dir).read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError as err:
        raise UnreadableRecord(f"{record_path(run_dir)}: {err}") from err
    if not isinstance(record, dict):
        raise UnreadableRecord(f"{record_path(run_dir)}: not a JSON object")
    return record


def read_record_or_empty(run_dir: str | os.PathLike) -> dict:
    """The record of ``run_dir``, or ``{}`` when it is missing or cannot be read."""
    try:
        return read_record(run_dir) or {}
    except (OSError, UnreadableRecord):
        return {}


def status_now(record: dict, run_dir: str | os.PathLike | None = None) -> str:
    """The status to show: ``running`` only while a live process holds the run directory, else
    ``killed`` (the process died without writing its final status). A record without a status is
    ``unknown``."""
    status = str(record.get("status") or "unknown")
    if status != RUNNING:
        return status
    if run_dir is not None:
        from lightning_modules.run.lock import holder_alive

        if holder_alive(Path(run_dir)):
            return RUNNING
    return KILLED


def write_record(run_dir: str | os.PathLike, record: dict) -> Path:
    """Write ``run_dir/results.json`` atomically (``schema`` added); the folder must exist.

    A failure (e.g. ``ENOSPC``) removes the temporary file, leaves the previous results.json as it
    was, and raises the OSError (storage/atomic.py).
    """
    text = json.dumps({"schema": SCHEMA_VERSION, **record}, indent=2, sort_keys=True, default=str)
    return write_text_atomically(Path(run_dir) / RESULTS_FILE, text)


# Storage faults that a user fixes outside the project (free space, permissions, a read-only mount).
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def storage_error(error: BaseException) -> OSError | None:
    """The storage OSError inside ``error`` (itself or a cause), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def storage_reason(error: OSError) -> str:
    """``no space left on device``, ``read-only file system``, ... for a storage OSError."""
    return {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}.get(error.errno,
                                                                                      error.strerror or "")


def describe_storage_error(error: OSError) -> str:
    """``no space left on device writing /x/y`` and the like, one line."""
    return f"{storage_reason(error)} writing {error.filename}" if error.filename else storage_reason(error)
