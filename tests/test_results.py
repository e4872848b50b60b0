"""results.py on a real sweep run through train.py: two finished seeds, two failed jobs, a paper target."""
import csv
import json
import statistics

import pytest

from tests.conftest import run_script

TINY = ["task.seq_len=20", "task.datamodule.train_size=64", "task.datamodule.val_size=32",
        "task.datamodule.test_size=32", "task.datamodule.batch_size=16", "task.max_epochs=2", "task.stop_at=null",
        "trainer=cpu", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "model=lstm"]
PAPER = 0.1


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2x2 sweep: hidden_size 8 trains, hidden_size 0 fails at config time; seeds 1 and 2."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    done = run_script("train.py", ["-m", *TINY, "model.hidden_size=8,0", "seed=1,2",
                                   f"paper={{metric:test/mse,value:{PAPER},source:'a unit test'}}",
                                   f"hydra.sweep.dir={sweep_dir}"], timeout=600)
    runs = sorted(path for path in sweep_dir.iterdir() if (path / "results.json").is_file())
    assert len(runs) == 4, done.stdout[-2000:] + done.stderr[-2000:]
    return sweep_dir, {path.name: json.loads((path / "results.json").read_text()) for path in runs}


@pytest.mark.slow
def test_table_groups_seeds_compares_with_the_paper_and_lists_failures(sweep):
    sweep_dir, results = sweep
    done = run_script("results.py", [f"dir={sweep_dir}", "plot=val/mse,train/loss"])
    assert done.returncode == 0, done.stderr
    text = done.stdout
    finished = {name: r for name, r in results.items() if r["status"] == "finished"}
    failed = {name: r for name, r in results.items() if r["status"] != "finished"}
    assert len(finished) == 2 and len(failed) == 2
    # One markdown row per run, the sweep's axes as columns.
    assert "| run | model.hidden_size | seed | status |" in text
    for name in results:
        assert f"| {name} |" in text
    # Failed jobs are listed with their error line.
    assert "## 2 of 4 runs did not finish" in text
    for name, result in failed.items():
        assert f"- {name}: {result['status']}: {result['error']}" in text
        assert "hidden_size" in result["error"]

    # Mean ± std over seeds for hidden_size=8, and the difference from the paper's number.
    values = [r["test/mse"] for r in finished.values()]
    table = json.loads((sweep_dir / "results_table.json").read_text())
    (group,) = [g for g in table["groups"] if g["model.hidden_size"] == "8"]
    assert group["runs"] == 2 and group["finished"] == 2
    assert group["test/mse values"] == pytest.approx(values)
    assert group["test/mse"] == f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"
    assert group["paper"] == PAPER and group["diff"] == pytest.approx(statistics.fmean(values) - PAPER)
    assert f"| 8 | 2 | 2 | {group['test/loss']} | {group['test/mse']} |" in text
    assert "paper: a unit test" in text

    with open(sweep_dir / "results_table.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert sorted(row["status"] for row in rows) == ["failed", "failed", "finished", "finished"]
    for row in rows:
        result = results[row["run"]]
        assert row["params"] == str(result.get("params") or "")
        if result["status"] == "finished":
            assert float(row["test/mse"]) == pytest.approx(result["test/mse"], rel=1e-3)
            assert float(row["diff"]) == pytest.approx(result["test/mse"] - PAPER, rel=1e-3)

    # Learning curves from the TensorBoard events: one PNG per tag, with a curve per finished run.
    import matplotlib.image

    for tag in ("val_mse", "train_loss"):
        image = matplotlib.image.imread(sweep_dir / f"curves_{tag}.png")
        assert image.shape[0] > 300 and image.shape[1] > 500
        assert f"plot: {sweep_dir / f'curves_{tag}.png'}" in text


@pytest.mark.slow
def test_group_by_and_bad_keys(sweep, tmp_path):
    sweep_dir, results = sweep
    done = run_script("results.py", [f"dir={sweep_dir}", "group_by=seed", "metrics=test/mse", f"out={tmp_path}"])
    assert done.returncode == 0, done.stderr
    table = json.loads((tmp_path / "results_table.json").read_text())
    for group in table["groups"]:  # each seed: one finished run (hidden_size 8) and one failed
        assert (group["runs"], group["finished"]) == (2, 1)
        (expected,) = [r["test/mse"] for r in results.values()
                       if r["status"] == "finished" and f"seed={group['seed']}" in r["overrides"]]
        assert group["test/mse values"] == pytest.approx([expected])
    assert "grouped by seed" in done.stdout

    done = run_script("results.py", [f"dir={sweep_dir}", "group_by=model.nope"])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: group_by: no run sets model.nope (overrides found: model.hidden_size, seed, "
        + ", ".join(k for k in table["common_overrides"]) + ")"]
    done = run_script("results.py", [f"dir={tmp_path / 'empty'}"])
    assert done.returncode == 2 and "is not a folder" in done.stderr


# ------------------------------------------- fake run directories (fast): statuses, unwritable folders, tags

def fake_runs(root, statuses=("finished", "running")):
    """Run directories as train.py leaves them (results.json through the record type, .hydra/overrides)."""
    from lightning_modules.run.record import write_record

    for seed, status in enumerate(statuses):
        run_dir = root / f"{seed}_adding_lstm"
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
        write_record(run_dir, {"status": status, "monitor": "val/mse", "test/mse": 0.5 + seed,
                               "overrides": [f"seed={seed}"], "steps": 10})
    return root


def test_running_means_killed_unless_a_live_process_holds_the_run(tmp_path):
    from tools.runs_table import load_runs
    from lightning_modules.run.lock import acquire, release
    from lightning_modules.run.sweep import job_records

    fake_runs(tmp_path)
    (tmp_path / "2_adding_lstm" / ".hydra").mkdir(parents=True)  # died before its first record
    (tmp_path / "2_adding_lstm" / ".hydra" / "config.yaml").write_text("seed: 2\n")
    assert [run.status for run in load_runs(tmp_path)] == ["finished", "killed", "killed"]
    assert [record["status"] for record in job_records(tmp_path)] == ["finished", "killed", "killed"]
    acquire(tmp_path / "1_adding_lstm")  # a run that is training now
    try:
        assert [run.status for run in load_runs(tmp_path)][1] == "running"
        assert job_records(tmp_path)[1]["status"] == "running"
    finally:
        release(tmp_path / "1_adding_lstm")


def test_results_py_on_a_read_only_folder_prints_the_table_then_one_line(tmp_path, capsys):
    """A read-only tmpfs (root ignores permission bits, not a read-only mount); skipped where mounting fails."""
    import subprocess

    import results

    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        fake_runs(folder, ("finished", "failed"))
        assert subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True).returncode == 0
        assert results.main([f"dir={folder}"]) == 1
        out, err = capsys.readouterr()
        assert "| 0_adding_lstm | 0 | finished |" in out and "## 1 of 2 runs did not finish" in out
        assert err.strip().splitlines() == [f"error: the files could not be written: {folder} is not writable "
                                            "(Read-only file system); choose another folder with out=DIR"]
        assert results.main([f"dir={folder}", f"out={tmp_path / 'elsewhere'}"]) == 0
        assert (tmp_path / "elsewhere" / "results_table.csv").is_file()
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_plot_of_a_tag_no_run_logged_lists_the_tags(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    import results

    fake_runs(tmp_path, ("finished",))
    writer = SummaryWriter(str(tmp_path / "0_adding_lstm" / "tensorboard"))
    for step in range(3):
        writer.add_scalar("val/mse", 1.0 / (step + 1), step)
        writer.add_scalar("train/loss", 2.0 / (step + 1), step)
    writer.close()
    assert results.main([f"dir={tmp_path}", "plot=val/nonexistent", f"out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: plot: no run under {tmp_path} logged val/nonexistent; tags found: "
                                        "train/loss, val/mse"]
    assert not list((tmp_path / "out").glob("*.png"))
    assert results.main([f"dir={tmp_path}", "plot=val/mse", f"out={tmp_path / 'out'}"]) == 0
    assert (tmp_path / "out" / "curves_val_mse.png").is_file()


def test_paper_table_lists_every_recipe_with_ours_or_not_run_yet(tmp_path, capsys):
    import results
    from tools.reproductions import experiment_papers
    from lightning_modules.run.record import write_record

    papers = experiment_papers()
    assert "indrnn_pmnist_6layer" in papers and "irnn_pmnist" in papers
    runs = tmp_path / "runs"
    for seed, (experiment, status, acc) in enumerate([("indrnn_pmnist_6layer", "finished", 0.95),
                                                       ("indrnn_pmnist_6layer", "finished", 0.97),
                                                       ("indrnn_pmnist_6layer", "failed", None),
                                                       ("irnn_pmnist", "failed", None),
                                                       ("indrnn_adding_t100", "finished", 0.006)]):
        run_dir = runs / f"{seed}_pmnist_indrnn"
        run_dir.mkdir(parents=True)
        record = {"status": status, "experiment": experiment, "steps": 1000 * (seed + 1), "seconds": 7200.0,
                  "hardware": "1 x NVIDIA H100 80GB HBM3", "started_at": f"2026-03-0{seed + 1} 10:00:00",
                  "overrides": [f"experiment={experiment}", f"seed={seed}", "trainer=gpu"]}
        metric = "test/mse" if "adding" in experiment else "test/acc"
        write_record(run_dir, {**record, **({metric: acc} if acc is not None else {})})
    assert results.main(["paper=true", f"dir={runs}", f"out={tmp_path}"]) == 0
    text = (tmp_path / "REPRODUCTIONS.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert set(papers) <= set(rows)  # every recipe with a paper target, run or not
    ours = rows["indrnn_pmnist_6layer"]
    assert "| 96.00% | 96.00% ± 1.41 (2 runs) | 1 x NVIDIA H100 80GB HBM3 | 2000 | 2.00 |" in ours
    assert "`python train.py experiment=indrnn_pmnist_6layer seed=1 trainer=gpu` | 2026-03-02 |" in ours
    assert "| 82.00% | not run yet |" in rows["irnn_pmnist"]  # its only run failed
    assert "not run yet" in rows["lstm_ptb_word"] and "| test/ppl | 82.7 |" in rows["lstm_ptb_word"]
    # A recipe whose paper shows curves only (paper.value null, inherited from indrnn_adding_t1000): ours, no figure.
    assert "| test/mse | no published figure | 0.006 |" in rows["indrnn_adding_t100"]
    assert "not run yet" in rows["indrnn_adding_t1000"]
    assert capsys.readouterr().out.endswith(f"written: {tmp_path / 'REPRODUCTIONS.md'}\n")


def test_paper_table_keeps_measured_rows_of_recipes_without_runs_here(tmp_path, capsys):
    """Regenerating REPRODUCTIONS.md from new runs keeps the figures of recipes whose runs are not in the
    given folders (an older machine's outputs), and replaces the rows of recipes that have new runs."""
    import results
    from lightning_modules.run.record import write_record

    def finished(folder, experiment, mse, steps):
        folder.mkdir(parents=True)
        write_record(folder, {"status": "finished", "experiment": experiment, "steps": steps, "seconds": 60.0,
                              "hardware": "vm", "started_at": "2026-03-01 10:00:00", "test/mse": mse,
                              "overrides": [f"experiment={experiment}"]})

    def rows():
        text = (tmp_path / "REPRODUCTIONS.md").read_text()
        return {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}

    finished(tmp_path / "old" / "a", "indrnn_adding_t100", 0.006, 3000)
    finished(tmp_path / "old" / "b", "indrnn_adding_t500", 0.008, 4000)
    assert results.main(["paper=true", f"dir={tmp_path / 'old'}", f"out={tmp_path}"]) == 0
    before = rows()
    finished(tmp_path / "new" / "c", "indrnn_adding_t500", 0.005, 9000)
    assert results.main(["paper=true", f"dir={tmp_path / 'new'}", f"out={tmp_path}"]) == 0
    after = rows()
    assert after["indrnn_adding_t100"] == before["indrnn_adding_t100"]  # no run here: the old figure stays
    assert "| 0.006 | vm | 3000 |" in after["indrnn_adding_t100"]
    assert "| 0.005 | vm | 9000 |" in after["indrnn_adding_t500"]  # new runs replace the row
    assert "not run yet" in after["indrnn_adding_t1000"]
    capsys.readouterr()
