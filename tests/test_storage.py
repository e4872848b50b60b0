"""The one atomic write (storage/atomic.py) and the one lock (storage/lock.py), on real files: a write
that fails (a full disk, Ctrl-C, a check that does not pass) leaves the previous file and no
temporary; a lock names its holder in one line, and a holder that is gone is taken over."""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys

import pytest

import storage.lock
from storage.atomic import replace_atomically, write_bytes_atomically, write_text_atomically
from storage.lock import FileLock, LockHeld, is_held
from tests.conftest import ROOT


def one_line(error) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


# The atomic write ---------------------------------------------------------------------------------


def test_a_write_replaces_the_file_whole_with_the_permissions_of_a_new_file(tmp_path):
    target = tmp_path / "results.json"
    write_text_atomically(target, "old")
    mask = os.umask(0o027)
    try:
        assert write_bytes_atomically(target, b"new") == target
    finally:
        os.umask(mask)
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["results.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # mkstemp's 0600 would hide it from the group


@pytest.mark.parametrize("failure", [KeyboardInterrupt, ValueError])
def test_a_failure_inside_the_block_keeps_the_previous_file_and_removes_the_temporary(tmp_path, failure):
    target = tmp_path / "file.bin"
    target.write_bytes(b"previous")
    with pytest.raises(failure):
        with replace_atomically(target) as part:
            assert part.parent == tmp_path and part.name.startswith(".file.bin.part-")
            part.write_bytes(b"half written")
            raise failure("md5 mismatch")
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["file.bin"]


def test_a_full_disk_at_fsync_keeps_the_previous_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")

    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_bytes_atomically(target, b"new")
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["last.ckpt"]


def test_a_named_temporary_is_used_and_must_share_the_folder(tmp_path):
    target, partial = tmp_path / "ntu60.h5", tmp_path / ".ntu60.h5.partial"
    with replace_atomically(target, temporary=partial) as part:
        assert part == partial
        part.write_bytes(b"frames")  # e.g. h5py creating the file at that path
    assert target.read_bytes() == b"frames" and not partial.exists()
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError, match="must be in"):
        with replace_atomically(target, temporary=tmp_path / "elsewhere" / "x"):
            pass


def test_a_folder_that_cannot_be_written_raises_before_anything_is_written(tmp_path):
    with pytest.raises(OSError):
        write_text_atomically(tmp_path / "missing" / "x.json", "{}")


# The lock ----------------------------------------------------------------------------------------


def test_the_lock_names_its_holder_in_one_line_and_is_reusable(tmp_path):
    lock = FileLock(tmp_path / "x.lock", purpose="training run A")
    with lock:
        with pytest.raises(LockHeld) as error:
            FileLock(tmp_path / "x.lock").acquire()
        message = one_line(error)
        assert f"process {os.getpid()}" in message and "(training run A)" in message
    with FileLock(tmp_path / "x.lock"):  # released: free again
        assert (tmp_path / "x.lock").exists()
    assert not (tmp_path / "x.lock").exists()


def test_without_flock_the_lock_file_content_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.lock, "fcntl", None)  # a file system without flock
    path = tmp_path / "x.lock"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = os.uname().nodename
    path.write_text(json.dumps({"pid": os.getppid(), "host": host}))  # a live process on this host
    with pytest.raises(LockHeld, match=f"held by process {os.getppid()} on {host}"):
        FileLock(path).acquire()
    path.write_text(json.dumps({"pid": int(finished.stdout), "host": host}))  # a process that has exited
    with FileLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    path.write_text(json.dumps({"pid": 1, "host": "another-node"}))  # elsewhere: cannot tell, respected
    with pytest.raises(LockHeld, match="on another-node"):
        FileLock(path).acquire()


def test_a_lock_left_by_a_killed_holder_is_free_and_taken_over(tmp_path):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from storage.lock import FileLock; "
                               f"FileLock({str(path)!r}, purpose='converting').acquire(); print('held', flush=True); "
                               "sys.stdin.read()"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_held(path)
        with pytest.raises(LockHeld, match=f"process {holder.pid} .*converting"):
            FileLock(path).acquire()
    finally:
        holder.kill()  # as kill -9: the file stays, the kernel drops the flock
        holder.wait(timeout=30)
    assert path.exists() and not is_held(path)
    with FileLock(path, record={"slurm_job_id": "77"}):
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["slurm_job_id"] == "77"


def test_without_flock_a_stale_rule_frees_a_recorded_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(storage.lock, "fcntl", None)
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({"pid": 1, "host": "another-node", "slurm_job_id": "77"}))
    assert is_held(path)
    requeued = lambda holder: holder.get("slurm_job_id") == "77"  # noqa: E731
    assert not is_held(path, stale=requeued)
    with FileLock(path, stale=requeued):
        assert json.loads(path.read_text())["pid"] == os.getpid()
