"""One process per run directory: ``<run>/.lock`` names its holder (PID, host, SLURM job).

The lock itself is the project's one lock, :class:`storage.lock.FileLock` (an advisory ``flock`` on
that file, so the kernel releases it when the holder dies, however it dies: a lock file left behind
by a dead process is stale and the next run takes it over). This module is the run directory's
policy on top of it:

* Only the process of global rank 0 takes the lock; the other ranks of a DDP run (relaunched scripts
  or SLURM tasks) work in the directory rank 0 holds.
* Re-entrant within a process (the Hydra callback takes it, the driver holds it again for training).
* Where ``flock`` is not available (some network filesystems), besides a dead PID on this host, a
  lock file that this very SLURM job left before it was requeued (same job id) is stale.
* A busy directory is :class:`RunDirectoryBusy`, a one-line UserError naming the holder.

The file is removed when its holder lets go.
"""
from __future__ import annotations

import atexit
import os
from pathlib import Path

from lightning_modules.run.errors import UserError
from storage.lock import FileLock, LockHeld, is_held, started_text

LOCK_FILE = ".lock"

# Locks this process holds: run directory (resolved) -> [FileLock, depth].
_HELD: dict[str, list] = {}


class RunDirectoryBusy(UserError):
    """Another live process holds the run directory."""


def rank_zero() -> bool:
    """True unless the environment names this process a non-zero rank of a distributed run."""
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "0")
        if value.isdigit() and int(value) > 0:
            return False
    return True


def requeued_by_slurm(holder: dict) -> bool:
    """The holder was this SLURM job before a requeue (same job id, a restart count above 0): gone."""
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    return bool(job) and str(holder.get("slurm_job_id")) == job and restarts.isdigit() and int(restarts) > 0


def holder_alive(run_dir: str | os.PathLike) -> bool:
    """Whether a live process holds ``run_dir`` (the run that wrote ``running`` is still going)."""
    if str(Path(run_dir).resolve()) in _HELD:
        return True
    return is_held(Path(run_dir) / LOCK_FILE, stale=requeued_by_slurm)


def describe(holder: dict) -> str:
    """``pid 12 on node3 (SLURM job 77) since 2026-01-01 10:00:00``."""
    where = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if holder.get("slurm_job_id"):
        where += f" (SLURM job {holder['slurm_job_id']})"
    return where + started_text(holder)


def acquire(run_dir: str | os.PathLike) -> bool:
    """Hold ``run_dir`` for this process (re-entrant); False on a non-zero rank (nothing taken).

    Raises :class:`RunDirectoryBusy` (one line naming the holder) when a live process holds it.
    """
    if not rank_zero():
        return False
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return True
    job = os.environ.get("SLURM_JOB_ID")
    lock = FileLock(run_dir / LOCK_FILE, purpose=f"a run in {run_dir}", stale=requeued_by_slurm,
                    record={"slurm_job_id": job} if job else None)
    try:
        lock.acquire()
    except LockHeld as error:
        raise RunDirectoryBusy(f"{run_dir} is in use by {describe(error.holder)}: one process per run directory; "
                               f"wait for it to end (or stop it) and try again") from None
    _HELD[key] = [lock, 1]
    return True


def release(run_dir: str | os.PathLike) -> None:
    """Let go of ``run_dir`` (the lock file is removed once the outermost holder lets go)."""
    key = str(Path(run_dir).resolve())
    held_lock = _HELD.get(key)
    if held_lock is None:
        return
    held_lock[1] -= 1
    if held_lock[1] > 0:
        return
    del _HELD[key]
    held_lock[0].release()


def release_all() -> None:
    for key in list(_HELD):
        _HELD[key][1] = 1
        release(key)


atexit.register(release_all)


class held:
    """``with held(run_dir):`` hold the run directory for the block (re-entrant)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir, self.taken = Path(run_dir), False

    def __enter__(self) -> "held":
        self.taken = acquire(self.run_dir)
        return self

    def __exit__(self, *exc) -> None:
        if self.taken:
            release(self.run_dir)
