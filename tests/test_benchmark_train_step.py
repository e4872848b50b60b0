"""benchmarks/train_step.py on tiny sizes: both loops run through the real config and training path,
and the table and JSON carry every experiment's keys (timings are not asserted)."""
import json
import math

import pytest

from benchmarks import train_step
from tests.conftest import ROOT, run_script

TINY = ["model.hidden_size=8", "task.seq_len=10"]


def test_json_and_table_for_two_experiments(tmp_path, capsys):
    path = tmp_path / "steps.json"
    results = train_step.main(["--experiments", "indrnn_adding_t1000", "experiment=indrnn_smnist_6layer",
                               "--steps", "4", "--warmup", "1", "--block", "2", "--set", *TINY,
                               "model.num_layers=2", "--repeat", "2", "--json", str(path)])
    assert json.loads(path.read_text()) == results
    assert list(results) == ["indrnn_adding_t1000", "experiment=indrnn_smnist_6layer"]
    for row in results.values():
        assert list(row) == ["pipeline_ms", "bare_ms", "lightning_ms", "gpu_busy_ms"]
        assert row["gpu_busy_ms"] is None  # CPU: no device time
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("pipeline_ms", "bare_ms", "lightning_ms"))
    table = capsys.readouterr().out
    assert "pipeline ms" in table and "lightning ms" in table and "indrnn_adding_t1000" in table


def test_repeat_keeps_each_loops_fastest_run(tmp_path, monkeypatch):
    """--repeat interleaves the three loops and reports each one's minimum."""
    calls = []
    times = {"pipeline": iter([5.0, 3.0, 4.0]), "bare": iter([2.0, 2.5, 1.5]), "floor": iter([3.5, 2.8, 3.1])}

    def timed(kind):
        def loop(*args, **kwargs):
            calls.append(kind)
            return next(times[kind])
        return loop

    monkeypatch.setattr(train_step, "time_pipeline", timed("pipeline"))
    monkeypatch.setattr(train_step, "time_bare", timed("bare"))
    monkeypatch.setattr(train_step, "time_lightning_floor", timed("floor"))
    row = train_step.measure("indrnn_adding_t1000", ["experiment=indrnn_adding_t1000"], train_step.torch.device("cpu"),
                             steps=2, warmup=0, block=1, extra=TINY, repeat=3)
    assert calls == ["pipeline", "bare", "floor"] * 3
    assert (row["pipeline_ms"], row["bare_ms"], row["lightning_ms"]) == (3.0, 1.5, 2.8)


def test_synthetic_batches_have_the_task_shapes(tmp_path):
    cfg = train_step.compose_run(["experiment=lstm_pmnist", "trainer=cpu"], tmp_path / "run")
    batches = train_step.SyntheticBatches(cfg, count=2, length=5)
    assert len(batches) == 5 and batches[4] is batches[0]
    assert tuple(batches[0].inputs.shape) == (32, 784, 1) and tuple(batches[0].targets.shape) == (32,)
    assert int(batches[0].targets.max()) < 10


@pytest.mark.slow  # several interpreter starts
def test_command_line_rejects_bad_values():
    completed = run_script("benchmarks/train_step.py", ["--experiments", "nope"])
    assert completed.returncode == 2 and "unknown experiment 'nope'" in completed.stderr
    completed = run_script("benchmarks/train_step.py", ["--steps", "4", "--block", "5"])
    assert completed.returncode == 2 and "--block in [1, steps]" in completed.stderr
    completed = run_script("benchmarks/train_step.py", ["--repeat", "0"])
    assert completed.returncode == 2 and "--repeat >= 1" in completed.stderr
