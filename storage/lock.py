"""One process at a time on a path: a lock file that names its holder (PID, host, start, purpose).

The one lock of the project. The NTU converter holds one per output file (``.<name>.lock``, one
``prepare_ntu.py`` per HDF5 file); a run directory's ``.lock`` is this lock with the run's policy on
top (lightning_modules/run/lock.py: rank 0 only, re-entrant, a requeued SLURM job's own lock)::

    with FileLock(out.with_name(f".{out.name}.lock"), purpose=f"converting into {out}"):
        ...                                   # raises LockHeld (one line naming the holder) if taken

How it works: the lock file is opened (created if missing) and locked with ``fcntl.flock`` without
waiting. The kernel releases that lock when the holder exits, however it exits (kill -9 included),
so a lock file left behind by a dead process is *stale*: the next process locks it, says so in the
log and takes it over; nothing needs cleaning by hand. The holder writes its record into the file
(``pid``, ``host``, ``started`` as seconds since the epoch, ``purpose``, and any fields the caller
adds), so a refused process can say who holds it. On file systems without ``flock`` (some network or
FUSE mounts) the record decides: a holder on this host whose PID no longer runs is stale, as is one
that the caller's ``stale`` rule declares gone; any other holder is respected (a holder on another
host cannot be checked from here: the message says which file to delete once it is known to be gone).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows): the lock file's content decides
    fcntl = None

log = logging.getLogger(__name__)

# flock errors that mean "this file system has no flock", not "someone holds it".
NO_FLOCK_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
StaleRule = Callable[[dict], bool]  # a holder record -> True when that holder is certainly gone


class LockHeld(RuntimeError):
    """Another live process holds the lock. One line; ``holder`` is its record (pid, host, started,
    purpose, ...), ``path`` the lock file."""

    def __init__(self, path: Path, holder: dict) -> None:
        self.path, self.holder = Path(path), dict(holder)
        what = f" ({holder['purpose']})" if holder.get("purpose") else ""
        super().__init__(f"{path} is held by process {holder.get('pid', '?')} on {holder.get('host', '?')}"
                         f"{started_text(holder)}{what}; wait for it to finish, or stop it (if that process is "
                         f"gone, delete {path})")


def started_text(holder: dict) -> str:
    """`` since 2026-01-01 10:00:00`` (local time) for a record with ``started``, else ""."""
    since = holder.get("started")
    return time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def read_holder(path: str | os.PathLike) -> dict:
    """The record in a lock file ({} when it is missing, empty or unreadable)."""
    try:
        record = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def holder_gone(holder: dict, stale: StaleRule | None = None) -> bool:
    """Without flock's word: whether the recorded holder is certainly gone (no record; a PID on this
    host that no longer runs; or the caller's ``stale`` rule)."""
    if holder.get("pid") is None:
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder["pid"], int) and not pid_alive(holder["pid"]):
        return True
    return bool(stale is not None and stale(holder))


def _flock(descriptor: int, mode: int) -> bool | None:
    """flock without waiting. True: locked; False: another open file holds it; None: no flock here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in NO_FLOCK_ERRNOS:
            return None
        raise


def is_held(path: str | os.PathLike, stale: StaleRule | None = None) -> bool:
    """Whether a live process holds the lock file ``path`` (this one included), without taking it."""
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        free = _flock(descriptor, fcntl.LOCK_SH) if fcntl is not None else None
    except OSError:
        free = None
    finally:
        os.close(descriptor)
    if free is not None:
        return not free
    return not holder_gone(read_holder(path), stale)


class FileLock:
    """An exclusive, non-blocking lock on ``path`` (the lock file itself; its folder must exist).

    Args:
        path: the lock file, e.g. ``.ntu60.h5.lock`` next to the file it protects.
        purpose: what the holder does, shown to a refused process ("converting into data/ntu/ntu60.h5").
        stale: without flock, a rule that declares a recorded holder gone beyond a dead PID on this
            host (a run directory's: the lock of this very SLURM job before it was requeued).
        record: more fields for the holder record (e.g. ``slurm_job_id``).

    ``acquire()`` (or ``with``) raises :class:`LockHeld` when a live process holds it, and OSError when
    the lock file cannot be created (a read-only or missing folder): callers turn that into their own
    one-line error. ``release()`` removes the file.
    """

    def __init__(self, path: str | os.PathLike, purpose: str = "", stale: StaleRule | None = None,
                 record: dict | None = None) -> None:
        self.path, self.purpose, self.stale, self.record = Path(path), purpose, stale, dict(record or {})
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FileLock":
        if self._fd is not None:
            return self
        for _ in range(100):  # retried only when the file was replaced between open and lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _flock(fd, fcntl.LOCK_EX) if fcntl is not None else None
                if locked is False or (locked is None and not holder_gone(read_holder(self.path), self.stale)):
                    raise LockHeld(self.path, read_holder(self.path))
                try:  # the holder unlinked the file after we opened it: lock the new file instead
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                previous = read_holder(self.path)
                if previous.get("pid") is not None and previous.get("pid") != os.getpid():
                    log.warning("taking over the stale lock %s left by process %s on %s (no longer running)",
                                self.path, previous.get("pid"), previous.get("host"))
                holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                          "purpose": self.purpose, **self.record}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(holder).encode(), 0)
                self._fd = fd
                return self
            except BaseException:
                if self._fd is None:
                    os.close(fd)
                raise
        raise OSError(errno.EAGAIN, f"could not lock {self.path}: it was replaced 100 times in a row")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting process then re-opens a new file
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
