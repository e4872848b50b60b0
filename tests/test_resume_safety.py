"""A finished run is never overwritten by a command that fails (issue 19 §1): every check of a resume
runs before anything is written, a resume keeps the original .hydra/config.yaml, ``ckpt_path=last``
takes only a run with this command's config, a checkpoint outside any run starts a new run, and one
process at a time holds a run directory.

The driver's checks are tested in-process (fast). Where Hydra writes (.hydra/, train.log) before the
task function runs, the process boundary is the point: those tests run train.py (marked slow)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.run import UserError, train
from lightning_modules.run.lock import LOCK_FILE, RunDirectoryBusy, acquire, holder_alive, release
from lightning_modules.run.resume import config_differences, last_matching_checkpoint, run_checkpoints
from tests.conftest import QUICK, compose_train, run_script

TINY = [*QUICK, "model.hidden_size=8", "task.max_epochs=1"]


# Another process holding a run directory as lightning_modules/run/lock.py does (flock + its PID and host),
# without importing the project (fast to start).
HOLDER = ("import fcntl, json, os, socket, sys, time\n"
          "fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT)\n"
          "fcntl.flock(fd, fcntl.LOCK_EX)\n"
          "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode())\n"
          "print('held', flush=True)\ntime.sleep(120)\n")


def hold(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) -> the sha256 of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished one-epoch run (in-process), laid out as train.py lays one out."""
    run_dir = tmp_path_factory.mktemp("runs") / "2026-01-01" / "10-00-00_adding_indrnn"
    train(compose_train(run_dir, TINY))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("# the original run's config\n")
    return run_dir


@pytest.mark.parametrize("overrides, message", [
    (["model=lstm"], "the checkpoint is a task=adding model=indrnn run and this command asks for model=lstm"),
    (["optimizer.lr=-1"], "differs from the checkpoint's in optimizer.lr (checkpoint 0.002, now -1"),
    (["model.hidden_size=16"], "model.hidden_size (checkpoint 8, now 16)"),
], ids=["other-model", "lr=-1", "other-size"])
def test_a_refused_resume_leaves_every_byte_of_the_run(finished_run, tmp_path, overrides, message):
    before = tree_hashes(finished_run)
    cfg = compose_train(finished_run, [*TINY, f"ckpt_path={finished_run}", *overrides])
    with pytest.raises(UserError) as error:
        train(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert tree_hashes(finished_run) == before
    assert json.loads((finished_run / "results.json").read_text())["status"] == "finished"


def test_ckpt_path_last_with_other_overrides_is_refused_and_leaves_the_run(finished_run, tmp_path):
    from omegaconf import open_dict

    before = tree_hashes(finished_run)
    cfg = compose_train(tmp_path / "new", [*TINY, "ckpt_path=last", "model.hidden_size=16"])
    with open_dict(cfg):
        cfg.paths.log_dir = str(finished_run.parents[1])  # where the finished run lies
    with pytest.raises(UserError) as error:
        train(cfg)
    assert str(error.value).startswith("ckpt_path=last: no run of task=adding model=indrnn under")
    assert f"{finished_run} (differs in model.hidden_size (checkpoint 8, now 16))" in str(error.value)
    assert tree_hashes(finished_run) == before


def test_an_unreadable_checkpoint_is_one_line_and_leaves_the_run(finished_run, monkeypatch):
    # As root, chmod 000 does not stop reading: the open of the checkpoint is made to raise as it would.
    before = tree_hashes(finished_run)
    checkpoint = finished_run / "checkpoints" / "last.ckpt"
    real_open = open

    def refusing_open(path, *args, **kwargs):
        if Path(path) == checkpoint:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    with pytest.raises(UserError, match=r"cannot read .*last.ckpt \(Permission denied\); check its permissions"):
        train(compose_train(finished_run, [*TINY, f"ckpt_path={finished_run}"]))
    monkeypatch.undo()
    assert tree_hashes(finished_run) == before


def test_a_resume_that_fails_before_training_keeps_the_record(finished_run, tmp_path):
    # Accepted by the checks (only resume-safe keys changed), then the data cannot be built.
    before = tree_hashes(finished_run)
    with pytest.raises(UserError, match="trainer"):
        train(compose_train(finished_run, [*TINY, f"ckpt_path={finished_run}", "trainer.max_epochs=-5"]))
    assert tree_hashes(finished_run) == before


def test_resume_safe_keys_are_not_differences():
    stored = {"model": {"hidden_size": 8}, "trainer": {"max_epochs": 3}, "task": {"max_epochs": 3, "seq_len": 20}}
    current = {"model": {"hidden_size": 8, "new_key": 1}, "trainer": {"max_epochs": 9, "devices": 2},
               "task": {"max_epochs": 9, "seq_len": 20}, "logger": {"csv": {}}}
    assert config_differences(stored, current) == []   # a key the stored config lacks predates it
    assert config_differences(stored, {**current, "task": {"max_epochs": 9, "seq_len": 40}}) == [
        ("task.seq_len", 20, 40)]
    assert config_differences({**stored, "seed": 1}, {**current, "seed": 2}) == [("seed", 1, 2)]


def test_every_check_compares_the_config_even_for_a_checkpoint_already_loaded(finished_run):
    from lightning_modules.run.resume import check_resume

    checkpoint = finished_run / "checkpoints" / "last.ckpt"
    stored = torch.load(checkpoint, weights_only=True)["hyper_parameters"]["run_config"]
    assert check_resume(checkpoint, stored, "x").step == 4
    other = {**stored, "model": {**stored["model"], "hidden_size": 64}}
    with pytest.raises(UserError, match=r"model.hidden_size \(checkpoint 8, now 64\)"):
        check_resume(checkpoint, other, "x")


def fake_run(log_dir: Path, name: str, config: dict, mtime: int) -> Path:
    run_dir = log_dir / "2026-01-01" / name
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"hyper_parameters": {"run_config": config}, "global_step": 3}, run_dir / "checkpoints" / "last.ckpt")
    os.utime(run_dir / "checkpoints" / "last.ckpt", (mtime, mtime))
    return run_dir


def test_ckpt_path_last_is_the_one_run_with_this_commands_config(tmp_path):
    small = {"model": {"hidden_size": 8}, "trainer": {"max_epochs": 1}}
    large = {"model": {"hidden_size": 32}, "trainer": {"max_epochs": 1}}
    fake_run(tmp_path, "09-00-00_adding_indrnn", small, 1000)
    large_run = fake_run(tmp_path, "10-00-00_adding_indrnn", large, 2000)
    fake_run(tmp_path, "11-00-00_adding_lstm", small, 3000)
    assert [path.parent.parent.name for path in run_checkpoints(tmp_path, "adding", "indrnn")] == [
        "10-00-00_adding_indrnn", "09-00-00_adding_indrnn"]
    # Another max_epochs (resume-safe) still fits; the newer run of another size does not.
    assert last_matching_checkpoint(tmp_path, "adding", "indrnn", {**large, "trainer": {"max_epochs": 5}}) == (
        large_run / "checkpoints" / "last.ckpt")
    with pytest.raises(UserError) as error:
        last_matching_checkpoint(tmp_path, "adding", "indrnn", {"model": {"hidden_size": 16}})
    line = str(error.value)
    assert "no run of task=adding model=indrnn" in line and "10-00-00_adding_indrnn (differs in model.hidden_size" in line
    assert "09-00-00_adding_indrnn" in line and "\n" not in line
    fake_run(tmp_path, "12-00-00_adding_indrnn", small, 4000)
    with pytest.raises(UserError, match=r"ckpt_path=last: 2 runs have this command's config: .*12-00-00.*09-00-00"):
        last_matching_checkpoint(tmp_path, "adding", "indrnn", small)


def test_a_checkpoint_outside_any_run_continues_in_a_new_run_directory(finished_run, tmp_path):
    elsewhere = tmp_path / "downloads"
    elsewhere.mkdir()
    (elsewhere / "f.ckpt").write_bytes((finished_run / "checkpoints" / "last.ckpt").read_bytes())
    before = tree_hashes(elsewhere)
    new_run = tmp_path / "new_run"
    train(compose_train(new_run, [*TINY, f"ckpt_path={elsewhere / 'f.ckpt'}", "task.max_epochs=2"]))
    assert tree_hashes(elsewhere) == before and sorted(os.listdir(elsewhere)) == ["f.ckpt"]
    record = json.loads((new_run / "results.json").read_text())
    assert record["status"] == "finished" and record["resumed_from"] == str(elsewhere / "f.ckpt")


# -------------------------------------------------------------------- one process per run directory

def test_a_held_run_directory_refuses_a_second_process_naming_the_holder(finished_run):
    holder = hold(finished_run)
    try:
        assert holder_alive(finished_run)
        with pytest.raises(RunDirectoryBusy) as error:
            acquire(finished_run)
        assert f"is in use by pid {holder.pid} on {socket.gethostname()}" in str(error.value)
    finally:
        holder.kill()
        holder.wait()
    # Killed with -9: the lock file stays behind, stale; the next process takes it over.
    assert (finished_run / LOCK_FILE).exists() and not holder_alive(finished_run)
    assert acquire(finished_run)
    assert json.loads((finished_run / LOCK_FILE).read_text())["pid"] == os.getpid()
    release(finished_run)
    assert not (finished_run / LOCK_FILE).exists()


def test_a_stale_lock_file_without_flock_is_taken_over_by_its_dead_pid(tmp_path, monkeypatch):
    import storage.lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    monkeypatch.setattr(storage.lock, "fcntl", None)  # a filesystem without flock: only the PID and host tell
    assert not holder_alive(tmp_path)
    assert acquire(tmp_path)
    release(tmp_path)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(RunDirectoryBusy, match=f"pid {os.getppid()}"):
        acquire(tmp_path)


# ------------------------------------------------ through train.py: Hydra writes before the task runs

def run_train(args: list[str]) -> subprocess.CompletedProcess:
    return run_script("train.py", [*TINY, *args])


@pytest.fixture(scope="module")
def trained_by_train_py(tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("logs")
    done = run_train([f"paths.log_dir={log_dir}"])
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = log_dir.glob("*/*_adding_indrnn")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("overrides, line", [
    (["model=lstm"], "model=indrnn run and this command asks for model=lstm"),
    (["optimizer.lr=-1"], "differs from the checkpoint's in optimizer.lr (checkpoint 0.002, now -1"),
    (["ckpt_path=last", "model.hidden_size=16"], "ckpt_path=last: no run of task=adding model=indrnn under"),
], ids=["other-model", "lr=-1", "last-other-config"])
def test_train_py_refuses_a_resume_before_hydra_writes(trained_by_train_py, overrides, line):
    run_dir = trained_by_train_py
    before = tree_hashes(run_dir)
    ckpt = [] if any(item.startswith("ckpt_path=") for item in overrides) else [f"ckpt_path={run_dir}"]
    done = run_train([*ckpt, *overrides, f"paths.log_dir={run_dir.parents[1]}"])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip().splitlines()[-1]] and line in done.stderr
    assert tree_hashes(run_dir) == before
    assert sorted(path.name for path in run_dir.parents[1].glob("*/*")) == [run_dir.name]  # no new directory


@pytest.mark.slow
def test_train_py_resume_keeps_the_original_config_and_a_busy_run_is_refused(trained_by_train_py):
    run_dir = trained_by_train_py
    original = (run_dir / ".hydra" / "config.yaml").read_bytes()
    # Another process holds the run: refused in one line naming it, nothing written.
    holder = hold(run_dir)
    try:
        before = tree_hashes(run_dir)
        done = run_train([f"ckpt_path={run_dir}", "task.max_epochs=2", f"paths.log_dir={run_dir.parents[1]}"])
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert f"is in use by pid {holder.pid} on {socket.gethostname()}" in done.stderr.strip().splitlines()[-1]
        assert tree_hashes(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    # The holder died (-9): its lock is stale and the resume goes ahead, into the same run directory.
    done = run_train([f"ckpt_path={run_dir}", "task.max_epochs=2", f"paths.log_dir={run_dir.parents[1]}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == original
    assert "task.max_epochs=2" in (run_dir / ".hydra" / "resume-1" / "overrides.yaml").read_text()
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "finished" and record["steps"] == 8 and record["resumes"] == 1
    assert record["resume_history"][0]["status"] == "finished" and "test/mse" in record["resume_history"][0]
    assert not (run_dir / LOCK_FILE).exists()


@pytest.mark.slow
def test_train_py_resume_from_a_checkpoint_outside_any_run(trained_by_train_py, tmp_path):
    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    (elsewhere / "f.ckpt").write_bytes((trained_by_train_py / "checkpoints" / "last.ckpt").read_bytes())
    done = run_train([f"ckpt_path={elsewhere / 'f.ckpt'}", "task.max_epochs=2", f"paths.log_dir={tmp_path / 'logs'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(elsewhere)) == ["f.ckpt"]
    (run_dir,) = (tmp_path / "logs").glob("*/*_adding_indrnn")
    assert f"lies outside any run directory: continuing in a new run directory {run_dir}" in done.stderr
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"


# ------------------------------------------------------------------------------------ a full disk

def test_a_full_disk_mid_run_is_one_line_and_keeps_the_last_good_state(tmp_path):
    """A real 2 MB tmpfs as the run's disk (skipped where mounting needs a root we are not): the second
    epoch's checkpoints do not fit."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run_dir = disk / "run"
        with pytest.raises(UserError) as error:
            train(compose_train(run_dir, [*QUICK, "model.hidden_size=256", "task.max_epochs=6", "task.stop_at=null"]))
        line = str(error.value)
        assert line.startswith("no space left on device writing ") and "\n" not in line
        assert "the last good last.ckpt (step 4)" in line and f"resume with ckpt_path={run_dir}" in line
        leftovers = [path.name for path in run_dir.rglob(".*") if path.is_file() and path.name != ".lock"]
        assert leftovers == [] and not (run_dir / LOCK_FILE).exists()
        last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 4
        record = json.loads((run_dir / "results.json").read_text())
        assert record["status"] == "failed" and record["error"].startswith("no space left on device")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_record_that_cannot_be_written_leaves_the_previous_one_and_no_temporary_file(tmp_path, monkeypatch):
    import errno

    from lightning_modules.run.record import write_record

    write_record(tmp_path, {"status": "finished", "test/mse": 0.1})
    before = (tmp_path / "results.json").read_bytes()

    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the data did not reach the disk
    with pytest.raises(OSError, match="No space left"):
        write_record(tmp_path, {"status": "running"})
    assert (tmp_path / "results.json").read_bytes() == before and os.listdir(tmp_path) == ["results.json"]


# --------------------------------------------------------------------- places that cannot be written

@pytest.fixture
def read_only_folder(tmp_path):
    """A tmpfs mounted read-only (root writes through permission bits, not through a read-only mount)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("where, named", [
    ("paths.log_dir={ro}", "the run directory {ro}/"),
    ("hydra.run.dir={ro}/run", "the run directory {ro}/run "),
    ("-m paths.log_dir={ro}", "the sweep directory {ro}/multirun "),
], ids=["log_dir", "run_dir", "sweep"])
def test_train_py_on_a_read_only_place_is_one_line_naming_it(read_only_folder, where, named):
    args = where.format(ro=read_only_folder).split()
    done = run_script("train.py", [*args, "trainer=cpu"])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: cannot write {named.format(ro=read_only_folder)}")
    assert "(read-only file system): choose a writable place with paths.log_dir=DIR" in done.stderr


@pytest.mark.slow
def test_train_py_with_a_checkpoint_it_may_not_read_is_one_line(trained_by_train_py):
    """A real permission error: chmod 000 and train.py run as the user nobody (root reads through
    permission bits); skipped where that cannot be arranged."""
    import shutil
    import tempfile

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run train.py as another user")
    base = Path(tempfile.mkdtemp(prefix="unreadable-", dir="/tmp"))
    try:
        run_dir = base / "logs" / "2026-01-01" / trained_by_train_py.name
        shutil.copytree(trained_by_train_py, run_dir)
        home = base / "home"
        home.mkdir()
        for path in [base, *base.rglob("*")]:
            path.chmod(0o777 if path == home else (0o755 if path.is_dir() else 0o644))
        (run_dir / "checkpoints" / "last.ckpt").chmod(0)
        before = tree_hashes(run_dir)
        env = dict(os.environ, HOME=str(home), NUMBA_CACHE_DIR=str(home), MPLCONFIGDIR=str(home),
                   HYDRA_FULL_ERROR="0", PYTHONDONTWRITEBYTECODE="1")
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                               str(Path(__file__).resolve().parents[1] / "train.py"), *TINY, "task.max_epochs=2",
                               f"paths.log_dir={base / 'logs'}", f"ckpt_path={run_dir}"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            f"error: ckpt_path={run_dir}: cannot read {run_dir / 'checkpoints' / 'last.ckpt'} (Permission denied); "
            f"check its permissions")
        assert tree_hashes(run_dir) == before
    finally:
        shutil.rmtree(base, ignore_errors=True)
