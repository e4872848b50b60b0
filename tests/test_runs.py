"""Runs that lose nothing: last.ckpt, interrupts, resume into the same run, sweeps that survive a bad
job, unique run directories, one-line errors and results.json (issue 11). The interrupt and resume
tests run train.py as real subprocesses and signal them as a user (or a cluster) would."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_modules.run.hparams import PROJECT_METRICS
from lightning_modules.run import UserError, evaluate, train
from lightning_modules.run.rundir import claim_dir
from tests.conftest import QUICK, ROOT, compose_eval, compose_train, run_script

# Four epochs of 25 steps on T=20: long enough to signal a run mid-epoch, short enough for a test.
RESUMABLE = ["task.seq_len=20", "task.datamodule.train_size=800", "task.datamodule.val_size=64",
             "task.datamodule.test_size=64", "task.datamodule.batch_size=32", "task.max_epochs=4",
             "task.stop_at=null", "trainer=cpu", "trainer.deterministic=true", "trainer.enable_model_summary=false",
             "callbacks.progress_bar.refresh_rate=0", "model.hidden_size=32"]


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def start_train(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float = 240.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_dir_of(log_dir: Path, model: str = "indrnn") -> Path | None:
    found = sorted(log_dir.glob(f"*/*_adding_{model}"))
    return found[0] if found else None


def progress(run_dir: Path | None) -> dict:
    try:
        return read_results(run_dir) if run_dir else {}
    except (OSError, ValueError):
        return {}


def train_steps(run_dir: Path) -> list[int]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars("train/loss")]


# ------------------------------------------------------------------ 1. last.ckpt is the latest state

def test_last_checkpoint_is_the_final_state_of_a_finished_run(tmp_path):
    # The monitor is best at epoch 0 only if nothing improves later: last.ckpt must not follow best.ckpt.
    train(compose_train(tmp_path / "run", QUICK + ["task.max_epochs=3", "optimizer.lr=1e-9"]))
    results = read_results(tmp_path / "run")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert results["status"] == "finished" and last["global_step"] == results["steps"] == 12
    assert {"rng_states", "state_dict", "optimizer_states"} <= last.keys()


# --------------------------------------- 2 + 3. SIGINT, kill -9, and resume into the same run directory

@pytest.mark.slow  # 5-25 s (loaded): make test-slow, which CI runs too
def test_sigint_and_sigterm_save_last_checkpoint_and_results_then_exit_130_and_143(tmp_path):
    # Two runs at once (their interpreter starts overlap), each signalled after its first validation.
    processes = {signum: start_train([*RESUMABLE, "task.max_epochs=40", f"paths.log_dir={tmp_path / signum.name}"])
                 for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum, process in processes.items():
        log_dir = tmp_path / signum.name
        wait_for(lambda: progress(run_dir_of(log_dir)).get("epochs", 0) >= 1,  # noqa: B023 (called at once)
                 what=f"the first validation ({signum.name})")
        process.send_signal(signum)
    stderr = {signum: process.communicate(timeout=120)[1] for signum, process in processes.items()}

    run_dir = run_dir_of(tmp_path / "SIGINT")
    results = read_results(run_dir)
    assert processes[signal.SIGINT].returncode == 130, stderr[signal.SIGINT][-2000:]
    assert results["status"] == "interrupted" and "signal 2" in results["error"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == results["steps"] and results["steps"] > 25
    assert f"resume with ckpt_path={run_dir}" in stderr[signal.SIGINT]

    assert processes[signal.SIGTERM].returncode == 143, stderr[signal.SIGTERM][-2000:]
    assert read_results(run_dir_of(tmp_path / "SIGTERM"))["status"] == "interrupted"


@pytest.mark.parametrize("schedule", [
    pytest.param([], marks=pytest.mark.slow),  # two train.py processes, one killed: about 25 s on 2 cores
    # The IndRNN papers' schedule, plateaus every few epochs: the first one after the resume must go back to
    # the best weights of before the kill (they travel in last.ckpt).
    pytest.param(["callbacks=official_indrnn", "callbacks.plateau_reload.patience=0", "optimizer.lr=0.05"],
                 marks=pytest.mark.slow),
], ids=["default", "official-plateau"])
def test_killed_run_resumes_into_its_directory_and_ends_exactly_as_an_uninterrupted_run(tmp_path, schedule):
    # Twelve epochs: enough left after the first epoch's checkpoint that the kill lands mid-run on a fast machine.
    settings = [*RESUMABLE, "task.max_epochs=12", *schedule]
    reference_dir = tmp_path / "reference"
    completed = run_script("train.py", [*settings, f"paths.log_dir={reference_dir}"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    reference = read_results(run_dir_of(reference_dir))

    log_dir = tmp_path / "killed"
    process = start_train([*settings, f"paths.log_dir={log_dir}"])
    # Killed without warning somewhere after the first epoch's checkpoint (kill -9: nothing can run).
    wait_for(lambda: (run_dir_of(log_dir) is not None and (run_dir_of(log_dir) / "checkpoints" / "last.ckpt").exists()
                      and progress(run_dir_of(log_dir)).get("epochs", 0) >= 1), what="the first epoch's checkpoint")
    time.sleep(0.3)
    process.kill()
    process.communicate(timeout=60)
    run_dir = run_dir_of(log_dir)
    killed = read_results(run_dir)
    assert killed["status"] == "running" and killed["steps"] < reference["steps"]

    resumed = run_script("train.py", [*settings, f"paths.log_dir={log_dir}", f"ckpt_path={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in log_dir.glob("*/*")) == [run_dir.name]  # no second run directory
    results = read_results(run_dir)
    assert results["status"] == "finished" and results["resumes"] == 1
    assert results["resume_history"][0]["status"] == "killed"
    for key in ("test/mse", "test/loss", "val/mse_best", "val/mse", "steps"):
        assert results[key] == reference[key], key
    assert results["seconds"] > killed["seconds"]
    # One TensorBoard run, continued: every training step logged once, as in the uninterrupted run.
    assert train_steps(run_dir) == train_steps(run_dir_of(reference_dir))
    if schedule:
        final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["PlateauReloadBest"]
        assert final["reductions"] > 0 and "best weights reloaded" in resumed.stdout + resumed.stderr


def test_plateau_reload_after_a_resume_goes_back_to_the_same_best_weights(tmp_path):
    # The official schedule (callbacks=official_indrnn) keeps the best weights to go back to at a plateau;
    # they travel in last.ckpt, so a run stopped just before a plateau and resumed ends as the uninterrupted run.
    settings = [*QUICK, "callbacks=official_indrnn", "callbacks.plateau_reload.patience=0", "optimizer.lr=0.05",
                "task.stop_at=null", "trainer.deterministic=true", "model.hidden_size=8", "task.max_epochs=7"]
    train(compose_train(tmp_path / "reference", settings))
    events = EventAccumulator(str(tmp_path / "reference" / "tensorboard"))
    events.Reload()
    validations = [event.value for event in events.Scalars("val/mse")]
    # Stop after `epochs` epochs where the next validation is a plateau (worse than the best so far): the
    # resumed run's first validation then reloads the best weights, which only the checkpoint can hold.
    epochs = next(epoch for epoch in range(1, len(validations)) if validations[epoch] >= min(validations[:epoch]))
    train(compose_train(tmp_path / "resumed", [*settings, f"task.max_epochs={epochs}"]))
    train(compose_train(tmp_path / "resumed", [*settings, f"ckpt_path={tmp_path / 'resumed'}"]))
    reference, resumed = (torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
                          for name in ("reference", "resumed"))
    assert resumed["callbacks"]["PlateauReloadBest"]["reductions"] >= 1
    assert resumed["callbacks"]["PlateauReloadBest"]["reductions"] == reference["callbacks"]["PlateauReloadBest"][
        "reductions"]
    for name, weights in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], weights), name
    assert read_results(tmp_path / "resumed")["test/mse"] == read_results(tmp_path / "reference")["test/mse"]


@pytest.mark.slow  # 5-25 s (loaded): make test-slow, which CI runs too
def test_resume_with_nothing_to_resume_is_one_line(tmp_path):
    # At the command line: Hydra's RunDirectory callback refuses it before Hydra writes anything.
    completed = run_script("train.py", [*QUICK, "ckpt_path=last", f"paths.log_dir={tmp_path}"])
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith(
        "error: ckpt_path=last: no run of task=adding model=indrnn with checkpoints/last.ckpt")


# ---------------------------------------------------- 4. eval.py never writes into the training run

@pytest.mark.slow  # 5-25 s (loaded): make test-slow, which CI runs too
def test_eval_writes_its_own_directory_and_names_task_model_and_checkpoint(finished_run, tmp_path):
    # eval.py as a user runs it: its run directory comes from Hydra (conf/eval.yaml), next to the training run's.
    events_before = {p.name: p.stat().st_size for p in (finished_run / "tensorboard").iterdir()}
    completed = run_script("eval.py", [f"ckpt_path={finished_run}", "trainer=cpu", f"paths.log_dir={tmp_path}"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert {p.name: p.stat().st_size for p in (finished_run / "tensorboard").iterdir()} == events_before
    (evaluation,) = tmp_path.glob("eval/*/*/results.json")
    record = json.loads(evaluation.read_text())
    assert record["task"] == "adding" and record["model"] == "indrnn"
    assert record["checkpoint"] == str((finished_run / "checkpoints" / "best.ckpt").resolve())
    assert Path(record["checkpoint"]).is_absolute() and "test/mse" in record


# ------------------------------------------------------------- 5. sweeps that survive a bad job

@pytest.mark.slow  # 5-25 s (loaded): make test-slow, which CI runs too
def test_failed_jobs_are_recorded_and_the_sweep_goes_on(tmp_path):
    # Jobs in order (16, 0.002) (16, -1) (0, 0.002) (0, -1) (the last override varies fastest): one fails in
    # the optimizer, inside training; two at config time, before it; the jobs after a failure still run.
    completed = run_script("train.py", ["-m", "model.hidden_size=16,0", "optimizer.lr=0.002,-1", *QUICK,
                                        "task.max_epochs=1", f"paths.log_dir={tmp_path}"])
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    jobs = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("multirun/*/*/*/results.json")}
    assert sorted(jobs) == [f"{index}_adding_indrnn" for index in range(4)]
    assert jobs["0_adding_indrnn"]["status"] == "finished"
    messages = {"1_adding_indrnn": "optimizer.lr=-1 is not allowed",
                "2_adding_indrnn": "model: hidden_size must be a positive integer, got 0",
                "3_adding_indrnn": "model: hidden_size must be a positive integer, got 0"}
    for bad_job, message in messages.items():
        assert jobs[bad_job]["status"] == "failed" and jobs[bad_job]["error"].startswith(message), jobs[bad_job]
        assert f"| {bad_job} | failed |" in completed.stdout
    assert "1 of 4 jobs finished" in completed.stdout
    assert ("error: 3 job(s) did not finish: 1_adding_indrnn (failed), 2_adding_indrnn (failed), "
            "3_adding_indrnn (failed)") in completed.stderr


# -------------------------------------------------- 6. two runs in the same second, two directories

def test_run_directories_are_claimed_once_even_at_the_same_instant(tmp_path):
    claimed, barrier = [], threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        claimed.append(claim_dir(tmp_path / "day" / "12-00-00_adding_indrnn"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(claimed)) == 8 and all(path.is_dir() for path in claimed)
    assert sorted(path.name for path in claimed)[0] == "12-00-00_adding_indrnn"


@pytest.mark.slow  # 5-25 s (loaded): make test-slow, which CI runs too
def test_two_runs_started_together_get_two_directories(tmp_path):
    # Also what each train.py run leaves as a user sees it: its directory, Hydra's log and config, the summary.
    args = [*QUICK, "trainer.fast_dev_run=true", f"paths.log_dir={tmp_path}"]
    first, second = start_train(args), start_train(args)
    stdout = {}
    for process in (first, second):
        stdout[process.pid] = process.communicate(timeout=240)[0]
        assert process.returncode == 0
    runs = sorted(tmp_path.glob("*/*_adding_indrnn*"))
    assert len(runs) == 2 and all(read_results(run)["status"] == "finished" for run in runs)
    assert {read_results(run)["pid"] for run in runs} == {first.pid, second.pid}
    for run_dir in runs:
        assert (run_dir / "train.log").exists() and (run_dir / ".hydra" / "config.yaml").exists()
        printed = stdout[read_results(run_dir)["pid"]]
        assert f"run directory: {run_dir}" in printed and "final metrics: test/loss=" in printed


# ------------------------------------------------------------- 7. one line, never a traceback

@pytest.mark.slow  # 5-25 s (loaded): make test-slow, which CI runs too
def test_eval_without_a_checkpoint_gives_one_line(tmp_path):
    # eval.py's one line at the command line (train.py's: tests/test_train.py); the other bad values below
    # raise the same UserError that run_entry prints as that line.
    completed = run_script("eval.py", ["trainer=cpu", f"paths.log_dir={tmp_path}"])
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1].startswith("error: eval.py needs ckpt_path=PATH")


@pytest.mark.parametrize("entry, args, line", [
    ("train", ["optimizer.lr=-1"], "optimizer.lr=-1 is not allowed: it must be a number >= 0"),
    ("train", ["optimizer.weight_decay=-0.5"], "optimizer.weight_decay=-0.5 is not allowed"),
    ("eval", ["ckpt_path=/nonexistent/best.ckpt"], "ckpt_path=/nonexistent/best.ckpt: no such checkpoint"),
], ids=["lr", "weight-decay", "eval-missing-checkpoint"])
def test_bad_values_give_one_line(tmp_path, entry, args, line):
    with pytest.raises(UserError) as error:
        if entry == "train":
            train(compose_train(tmp_path / "logs" / "run", [*args, *QUICK]))
        else:
            evaluate(compose_eval(tmp_path / "eval", args[0].split("=", 1)[1]))
    assert str(error.value).startswith(line) and "\n" not in str(error.value)


def test_a_checkpoint_that_is_not_ours_is_one_line_that_never_advises_unsafe_loading(tmp_path, capfd):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(2048))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    for path, expected in ((garbage, "is not a checkpoint that train.py wrote"),
                           (foreign, "is a PyTorch file but not a checkpoint of this project")):
        with pytest.raises(UserError) as error:
            evaluate(compose_eval(tmp_path / f"eval-{path.stem}", path))
        assert expected in str(error.value) and "\n" not in str(error.value)
        printed = capfd.readouterr()
        assert "weights_only=False" not in str(error.value) + printed.err + printed.out


# --------------------------------------------------------------------------- 8. results.json

def test_results_hold_the_best_validation_and_are_readable_by_others(finished_run):
    path = finished_run / "results.json"  # written under umask 022
    results = json.loads(path.read_text())
    assert path.stat().st_mode & 0o777 == 0o644
    assert results["val/mse"] == results["val/mse_best"] == min(
        results["val/mse_best"], results["last_val/mse"])
    assert isinstance(results["best_step"], int) and "last_val/loss" in results
    best = torch.load(results["best_checkpoint"], weights_only=True)
    assert best["global_step"] == results["best_step"]


# ----------------------------------------------------------------------- 10. TensorBoard runs

def test_hparams_declare_every_project_metric_and_smoke_tests_leave_no_run(finished_run, tmp_path):
    events = EventAccumulator(str(finished_run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    experiment = events.PluginTagToContent("hparams")["_hparams_/experiment"].decode("utf-8", "ignore")
    assert all(metric in experiment for metric in PROJECT_METRICS)  # e.g. test/acc on an adding run

    train(compose_train(tmp_path / "smoke", QUICK + ["trainer.fast_dev_run=true"]))
    assert read_results(tmp_path / "smoke")["status"] == "finished"
    assert not (tmp_path / "smoke" / "tensorboard").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_data_file_without_checksum_is_one_line(tmp_path, damage):
    from tests.mnist_files import write_tiny_mnist
    from datamodules.mnist import ALL_FILES, TRAIN_IMAGES

    md5 = write_tiny_mnist(tmp_path / "data" / "mnist")
    path = tmp_path / "data" / "mnist" / TRAIN_IMAGES
    path.write_bytes(path.read_bytes()[:300] if damage == "truncate" else os.urandom(300))
    cfg = compose_train(tmp_path / "run", [*QUICK[4:], "task=mnist_rows", f"paths.data_dir={tmp_path / 'data'}",
                                           "task.datamodule.download=false"])
    with open_dict(cfg):
        cfg.task.datamodule.md5 = {name: None for name in ALL_FILES}  # checksums off: the parser must catch it
    assert md5
    with pytest.raises(UserError) as error:
        train(cfg)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    assert read_results(tmp_path / "run")["status"] == "failed"
