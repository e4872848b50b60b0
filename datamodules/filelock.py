"""One process at a time on a file or folder: a lock file that names its holder (PID, host, time, purpose).

Used by the NTU converter (one ``prepare_ntu.py`` per output file); generic, so that anything else
that must not run twice on the same path (a run directory) can hold it too::

    with FileLock(out.with_name(f".{out.name}.lock"), purpose=f"converting into {out}"):
        ...                                   # raises LockHeld (one line naming the holder) if taken

How it works: the lock file is opened (created if missing) and locked with ``fcntl.flock`` without
waiting. The kernel releases that lock when the holder exits, however it exits (kill -9 included),
so a lock file left behind by a dead process is *stale*: the next process locks it, says so in the
log and takes it over; nothing needs cleaning by hand. The holder writes its PID, host, start time
and purpose into the file, so a refused process can say who holds it. On file systems without
``flock`` (some network or FUSE mounts) the file's content decides: a holder on this host whose
PID no longer runs is stale; a holder on another host is respected (its liveness cannot be checked
from here: the message says which file to delete once that process is known to be gone).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows): the lock file's content decides
    fcntl = None

log = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """Another live process holds the lock. One line; ``holder`` is its record (pid, host, started,
    purpose), ``path`` the lock file."""

    def __init__(self, path: Path, holder: dict) -> None:
        self.path, self.holder = Path(path), dict(holder)
        since = holder.get("started")
        when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
        what = f" ({holder['purpose']})" if holder.get("purpose") else ""
        super().__init__(f"{path} is held by process {holder.get('pid', '?')} on {holder.get('host', '?')}{when}{what}; "
                         f"wait for it to finish, or stop it (if that process is gone, delete {path})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def read_holder(path: str | os.PathLike) -> dict:
    """The record in a lock file ({} when it is empty or unreadable)."""
    try:
        record = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


class FileLock:
    """An exclusive, non-blocking lock on ``path`` (the lock file itself; its folder must exist).

    Args:
        path: the lock file, e.g. ``.ntu60.h5.lock`` next to the file it protects.
        purpose: what the holder does, shown to a refused process ("converting into data/ntu/ntu60.h5").

    ``acquire()`` (or ``with``) raises :class:`LockHeld` when a live process holds it, and OSError when
    the lock file cannot be created (a read-only or missing folder): callers turn that into their own
    one-line error. ``release()`` removes the file.
    """

    def __init__(self, path: str | os.PathLike, purpose: str = "") -> None:
        self.path, self.purpose = Path(path), purpose
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
                locked = self._flock(fd)
                if locked is False:
                    raise LockHeld(self.path, read_holder(self.path))
                if locked is None and not self._content_says_free():
                    raise LockHeld(self.path, read_holder(self.path))
                try:  # the holder unlinked the file after we opened it: lock the new file instead
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                previous = read_holder(self.path)
                if previous.get("pid") is not None:
                    log.warning("taking over the stale lock %s left by process %s on %s (no longer running)",
                                self.path, previous.get("pid"), previous.get("host"))
                record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                          "purpose": self.purpose}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode(), 0)
                self._fd = fd
                return self
            except BaseException:
                if self._fd is None:
                    os.close(fd)
                raise
        raise OSError(errno.EAGAIN, f"could not lock {self.path}: it was replaced 100 times in a row")

    @staticmethod
    def _flock(fd: int) -> bool | None:
        """True: locked; False: another process holds it; None: this file system has no flock."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise

    def _content_says_free(self) -> bool:
        """Without flock: free when the file names no holder, or a holder on this host that is gone."""
        holder = read_holder(self.path)
        if holder.get("pid") is None:
            return True
        if holder.get("host") != socket.gethostname():
            return False
        return holder["pid"] != os.getpid() and not _pid_alive(int(holder["pid"]))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting process then re-opens a new file
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
