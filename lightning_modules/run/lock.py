"""One process per run directory: ``<run>/.lock`` names its holder (PID, host, SLURM job).

The lock is an advisory ``flock`` on that file, so the kernel releases it when the holder dies,
however it dies (kill -9 included): a lock file left behind by a dead process is stale and the next
run takes it over. Where ``flock`` is not available (some network filesystems), a lock file whose
PID is dead on this host, or that a requeued SLURM job left (same job id), is stale too.

Only the process of global rank 0 takes the lock; the other ranks of a DDP run (relaunched scripts
or SLURM tasks) work in the directory rank 0 holds. The file is removed when its holder lets go.
"""
from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

from lightning_modules.run.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"

# Locks this process holds: run directory (resolved) -> (file descriptor, depth).
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(run_dir: Path) -> dict:
    """What the lock file of ``run_dir`` says about its holder ({} when none or unreadable)."""
    try:
        holder = json.loads((Path(run_dir) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _flock_free(path: Path) -> bool | None:
    """Whether nobody holds the flock on ``path`` (None when flock cannot tell)."""
    if fcntl is None:
        return None
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    finally:
        os.close(descriptor)
    return True


def _stale(holder: dict) -> bool:
    """A holder recorded in the file that is certainly gone (without flock's word)."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not _pid_alive(holder["pid"])
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    return bool(job) and str(holder.get("slurm_job_id")) == job and restarts.isdigit() and int(restarts) > 0


def holder_alive(run_dir: Path) -> bool:
    """Whether a live process holds ``run_dir`` (the run that wrote ``running`` is still going)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return False
    key = str(Path(run_dir).resolve())
    if key in _HELD:
        return True
    free = _flock_free(path)
    if free is not None:
        return not free
    holder = read_holder(run_dir)
    return bool(holder) and not _stale(holder)


def describe(holder: dict) -> str:
    where = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if holder.get("slurm_job_id"):
        where += f" (SLURM job {holder['slurm_job_id']})"
    if holder.get("since"):
        where += f" since {holder['since']}"
    return where


def _lock(descriptor: int) -> bool:
    """flock the file exclusively without waiting: True when taken, False when flock is unavailable
    here; BlockingIOError when another process holds it."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise
    return True


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
    path = run_dir / LOCK_FILE
    for _ in range(20):
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _lock(descriptor):  # no flock here: trust the PID and host in the file
                holder = read_holder(run_dir)
                if holder and not _stale(holder) and holder.get("pid") != os.getpid():
                    raise RunDirectoryBusy(f"{run_dir} is in use by {describe(holder)}: one process per run "
                                           f"directory; wait for it to end (or stop it) and try again")
            # The file may have been removed by a holder letting go between open and flock: retry.
            if os.fstat(descriptor).st_ino != os.stat(path).st_ino:
                os.close(descriptor)
                continue
        except FileNotFoundError:
            os.close(descriptor)
            continue
        except BlockingIOError:
            os.close(descriptor)
            raise RunDirectoryBusy(f"{run_dir} is in use by {describe(read_holder(run_dir))}: one process per run "
                                   f"directory; wait for it to end (or stop it) and try again") from None
        except BaseException:
            os.close(descriptor)
            raise
        previous = read_holder(run_dir)
        if previous and previous.get("pid") != os.getpid():
            log.info("%s: taking over the lock left by %s (no longer running)", run_dir, describe(previous))
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        if os.environ.get("SLURM_JOB_ID"):
            holder["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        _HELD[key] = [descriptor, 1, path]
        return True
    raise RunDirectoryBusy(f"{run_dir}: could not take {LOCK_FILE} (it keeps changing hands)")


def release(run_dir: str | os.PathLike) -> None:
    """Let go of ``run_dir`` (the lock file is removed once the outermost holder lets go)."""
    key = str(Path(run_dir).resolve())
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[key]
    descriptor, _, path = held
    try:
        os.unlink(path)  # before unlocking: a waiting process then retries on a fresh file
    except OSError:
        pass
    os.close(descriptor)


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
