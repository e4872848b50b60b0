"""Sweeps on a real one-node SLURM cluster (tests/slurm_cluster.sh: Debian's slurm-wlm, munge and
slurmdbd with MariaDB, on loopback, as root): a 2x2 sweep through hydra/launcher=slurm, DDP over
SLURM tasks, and a preempted job that requeues itself and resumes into its own run directory.

Where the cluster cannot be set up (not root, no apt-get, a package or daemon that fails) every test
skips with the reason (shown by `pytest -rs`). A cluster already running under $SLURM_TEST_BASE
(default /tmp/slurmtest) is reused and left running; one started here is stopped at the end.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_modules.progress import LineProgress, progress_bar
from lightning_modules.run import train
from tests.conftest import ROOT

CLUSTER_SCRIPT = ROOT / "tests" / "slurm_cluster.sh"
BASE = Path(os.environ.get("SLURM_TEST_BASE", "/tmp/slurmtest"))
TINY = ["task.seq_len=20", "task.datamodule.train_size=64", "task.datamodule.val_size=32",
        "task.datamodule.test_size=32", "task.datamodule.batch_size=16", "task.max_epochs=2", "task.stop_at=null",
        "trainer.enable_model_summary=false", "model.hidden_size=16"]
# One core and 2 GB per job: two jobs side by side on a 2-core machine.
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=20"]


def _cluster_up(env: dict) -> bool:
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
        accounting = subprocess.run(["sacct", "-n", "-X"], env=env, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return (states.returncode == 0 and any(s in states.stdout for s in ("idle", "mixed", "allocated"))
            and accounting.returncode == 0)


def _skip(reason: str):
    print(f"SLURM tests skipped: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm_env():
    """Environment for SLURM clients (SLURM_CONF) with the cluster running."""
    env = dict(os.environ, BASE=str(BASE), SLURM_CONF=str(BASE / "etc" / "slurm.conf"), PYTHONUNBUFFERED="1")
    if _cluster_up(env):
        yield env
        return
    if os.geteuid() != 0:
        _skip("installing and starting slurm-wlm, munge and MariaDB needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        _skip("slurm-wlm is not installed and there is no apt-get to install it")
    try:
        done = subprocess.run(["bash", str(CLUSTER_SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        _skip(f"{CLUSTER_SCRIPT.name} did not finish within 900 s")
    if done.returncode != 0 or not _cluster_up(env):
        last = (done.stdout + done.stderr).strip().splitlines()[-3:]
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=env, capture_output=True, timeout=300)
        _skip(f"could not start a SLURM cluster (exit {done.returncode}): {' | '.join(last)}")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=env, capture_output=True, timeout=300)


def _train(env: dict, args: list[str], timeout: int = 900, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _results(sweep_dir: Path) -> dict[str, dict]:
    return {path.parent.name: json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/results.json"))}


def _sacct_states(env: dict, job_ids, final: str = "COMPLETED", wait_s: float = 60) -> dict[str, str]:
    """Accounting states of the jobs, polled until all are ``final`` (slurmdbd lags a few seconds
    behind the job's end) or ``wait_s`` has passed."""
    deadline = time.monotonic() + wait_s
    while True:
        done = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobIDRaw,State", "-j", ",".join(job_ids)],
                              env=env, capture_output=True, text=True, timeout=60)
        states = dict(line.split("|", 1) for line in done.stdout.split())
        if set(states.values()) == {final} or time.monotonic() > deadline:
            return states
        time.sleep(2)


@pytest.mark.slow
def test_sweep_2x2_through_the_slurm_launcher(slurm_env, tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = _train(slurm_env, [*LAUNCHER, *TINY, "trainer=cpu", "model=indrnn,lstm", "seed=1,2",
                              f"hydra.sweep.dir={sweep_dir}"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = _results(sweep_dir)
    assert sorted(results) == ["0_adding_indrnn", "1_adding_indrnn", "2_adding_lstm", "3_adding_lstm"]
    for name, result in results.items():
        assert result["status"] == "finished" and "test/mse" in result and result["steps"] == 8, name
        assert result["model"] == name.split("_")[-1]
    job_ids = [result["slurm_job_id"] for result in results.values()]
    assert len(set(job_ids)) == 4
    assert set(_sacct_states(slurm_env, job_ids).values()) == {"COMPLETED"}

    # Job logs a person can read: plain progress lines, no carriage-return progress bar.
    logs = sorted(sweep_dir.glob(".submitit/*/*_0_log.out"))
    assert len(logs) == 4
    for log in logs:
        text = log.read_text()
        assert "\r" not in text and "validation at epoch 1 step 8: val/loss=" in text, text[-2000:]

    # The sweep's table: one row per job, mean ± std over the two seeds of each model.
    table = subprocess.run([sys.executable, str(ROOT / "results.py"), f"dir={sweep_dir}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    grouped = json.loads((sweep_dir / "results_table.json").read_text())["groups"]
    assert {(g["model"], g["runs"], g["finished"]) for g in grouped} == {("indrnn", 2, 2), ("lstm", 2, 2)}


@pytest.mark.slow
def test_ddp_over_slurm_tasks(slurm_env, tmp_path):
    """trainer=ddp_multinode on CPUs: the launcher asks for 2 tasks per node, srun starts both ranks,
    Lightning's SLURM environment joins them (gloo)."""
    sweep_dir = tmp_path / "ddp"
    done = _train(slurm_env, [*LAUNCHER, *TINY, "trainer=ddp_multinode", "trainer.accelerator=cpu",
                              "trainer.devices=2", "trainer.num_nodes=1", "trainer.sync_batchnorm=false",
                              "model=indrnn", f"hydra.sweep.dir={sweep_dir}"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = _results(sweep_dir).values()
    # 64 sequences / 2 ranks / batch 16 = 2 steps per epoch.
    assert result["status"] == "finished" and result["steps"] == 4 and "test/mse" in result
    (script,) = sweep_dir.glob(".submitit/*/*_submission.sh")
    assert "#SBATCH --ntasks-per-node=2" in script.read_text() and "#SBATCH --nodes=1" in script.read_text()
    rank_logs = sorted(sweep_dir.glob(".submitit/*/*_log.out"))
    assert any("GLOBAL_RANK: 1, MEMBER: 2/2" in log.read_text() for log in rank_logs)


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_into_its_run(slurm_env, tmp_path):
    """Two identical deterministic jobs; one gets the preemption signal mid-training (submitit's
    SIGUSR2, which SLURM sends before the time limit), requeues itself, resumes from last.ckpt in its
    own run directory, and ends with the same metrics as the one that ran in one go."""
    sweep_dir = tmp_path / "requeue"
    args = [*LAUNCHER, "task.seq_len=30", "task.datamodule.train_size=1600", "task.datamodule.val_size=64",
            "task.datamodule.test_size=64", "task.datamodule.batch_size=16", "task.max_epochs=5", "task.stop_at=null",
            "trainer=cpu", "trainer.deterministic=true", "trainer.enable_model_summary=false", "model.hidden_size=16",
            "seed=3", "+copy=preempted,reference", f"hydra.sweep.dir={sweep_dir}"]
    sweep = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", *args], cwd=ROOT, env=slurm_env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        preempted = sweep_dir / "0_adding_indrnn"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # wait for the first epoch's last.ckpt
            if (preempted / "checkpoints" / "last.ckpt").is_file():
                break
            assert sweep.poll() is None, sweep.stdout.read()[-3000:]
            time.sleep(1)
        record = json.loads((preempted / "results.json").read_text())
        assert record["status"] == "running", record
        signalled = subprocess.run(["scancel", "--signal=USR2", record["slurm_job_id"]], env=slurm_env,
                                   capture_output=True, text=True, timeout=60)
        assert signalled.returncode == 0, signalled.stderr
        output, _ = sweep.communicate(timeout=900)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait(timeout=60)
    assert sweep.returncode == 0, output[-3000:]
    results = _results(sweep_dir)
    resumed, reference = results["0_adding_indrnn"], results["1_adding_indrnn"]
    assert resumed["status"] == reference["status"] == "finished"
    assert resumed["resumes"] == 1 and "resumes" not in reference
    assert resumed["resume_history"][0]["status"] in ("interrupted", "killed")
    assert 0 < resumed["resume_history"][0]["resumed_from_step"] < reference["steps"]
    assert resumed["output_dir"] == str(preempted.resolve())
    # The same results as in one go.
    assert resumed["steps"] == reference["steps"] == 500
    for key in ("test/mse", "val/mse_best", "best_step"):
        assert resumed[key] == pytest.approx(reference[key], rel=1e-6), key
    # One SLURM job that ran twice: sacct lists the requeued run and the completed one.
    _sacct_states(slurm_env, [resumed["slurm_job_id"]])  # wait for accounting to record the end
    history = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "JobIDRaw,State", "-j", resumed["slurm_job_id"]],
                             env=slurm_env, capture_output=True, text=True, timeout=60).stdout.split()
    states = [line.split("|", 1)[1] for line in history]
    assert states[-1] == "COMPLETED" and any(s.startswith("REQUEUE") or s == "PREEMPTED" for s in states), states


def test_job_logs_get_plain_progress_lines(train_cfg, caplog):
    """Not a terminal (a SLURM job's log, a redirected run): one plain line every N steps instead of
    a carriage-return progress bar."""
    assert isinstance(progress_bar(terminal=False), LineProgress)
    assert not isinstance(progress_bar(terminal=True), LineProgress)
    caplog.set_level("INFO", logger="lightning_modules.progress")
    train(train_cfg(["task.max_epochs=2", "task.stop_at=null", "callbacks.progress_bar.every_n_steps=2",
                     "trainer.log_every_n_steps=1"]))
    lines = [record.getMessage() for record in caplog.records if record.name == "lightning_modules.progress"]
    # 64 sequences in batches of 16: 4 steps per epoch, 8 in all, a line every 2 steps.
    steps = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in steps] == [
        "epoch 0 step 2/8 (25%)", "epoch 0 step 4/8 (50%)", "epoch 1 step 6/8 (75%)", "epoch 1 step 8/8 (100%)"]
    for line in steps:
        position, rate, eta, metrics = line.split(" | ")
        assert rate.endswith(" steps/s") and float(rate.split()[0]) > 0
        assert eta.startswith("ETA ") and "train/loss=" in metrics
    assert steps[-1].split(" | ")[2] == "ETA 0s" and "val/mse=" in steps[-1]  # the last validation's metrics
    assert sum(line.startswith("validation at epoch") for line in lines) == 2
    assert lines[0] == "training from step 0: 8 steps, a line every 2 steps"
    assert any(line.startswith("test: ") and "test/mse=" in line for line in lines), lines
    assert not any("\r" in line for line in lines)
