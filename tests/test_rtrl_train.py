"""RTRL through train.py (learning=rtrl) and the streaming adding task, as a user runs them."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from datamodules.adding import BASELINE_MSE
from datamodules.streaming import AddingStreams, StreamingAddingDataModule
from lightning_modules.run import UserError, train
from lightning_modules.learning import BPTT, RealTimeRecurrentLearning
from lightning_modules.stream_regression import StreamRegressionModule
from tests.conftest import compose_train

SMALL_MODEL = ["model.num_layers=1", "model.hidden_size=32", "logger=csv"]
# The streaming task has segments, not sized splits: conftest's QUICK does not apply.
STREAM_RUN = ["task=streaming_adding", "trainer=cpu", "trainer.enable_model_summary=false",
              "callbacks.progress_bar.refresh_rate=0", "task.seq_len=20", "task.datamodule.train_segments=10",
              "task.datamodule.val_segments=4", "task.datamodule.test_segments=4", "task.datamodule.batch_size=8"]


def results_of(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def train_losses(run_dir) -> list[float]:
    (path,) = run_dir.rglob("metrics.csv")
    with open(path) as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


def test_rtrl_through_train_py_lowers_the_adding_loss(train_cfg, tmp_path):
    cfg = train_cfg(SMALL_MODEL + ["learning=rtrl", "task.datamodule.train_size=640", "task.datamodule.batch_size=32",
                                   "task.max_epochs=4", "optimizer.lr=0.01", "trainer.log_every_n_steps=1"])
    assert cfg.objective.learning_rule._target_ == "lightning_modules.learning.RealTimeRecurrentLearning"
    train(cfg)
    results = results_of(tmp_path / "run")
    assert results["status"] == "finished"
    assert results["val/mse_best"] < BASELINE_MSE, results
    losses = train_losses(tmp_path / "run")
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("task, overrides", [
    ("copy_memory", ["task.seq_len=10", "learning.update_every=10", "task.datamodule.batch_size=16"]),
    ("parity", ["task.seq_len=12", "learning.mode=layer_local", "model.num_layers=2", "model.hidden_size=8"]),
    ("parity", ["task.seq_len=12", "model.num_layers=2", "model.hidden_size=8", "learning.chunk_size=5"]),
], ids=["copy-memory-update-every", "parity-layer-local", "parity-exact-stack"])
def test_rtrl_runs_on_the_labelling_tasks(train_cfg, tmp_path, task, overrides):
    cfg = train_cfg(SMALL_MODEL + [f"task={task}", "learning=rtrl", "task.datamodule.train_size=64",
                                   "task.datamodule.val_size=32", "task.datamodule.test_size=32",
                                   "task.max_epochs=2"] + overrides)
    train(cfg)
    results = results_of(tmp_path / "run")
    assert results["status"] == "finished" and math.isfinite(results["test/loss"]), results


def test_rtrl_objective_keeps_the_task_objective(tmp_path):
    """learning=rtrl keeps the task's objective class and gives it the RTRL rule; no class is made at run time."""
    from lightning_modules.run.build import build
    for task, base in (("adding", "SequenceRegressionModule"), ("parity", "SequenceLabellingModule"),
                       ("streaming_adding", "StreamRegressionModule")):
        _, objective = build(compose_train(tmp_path / task, [f"task={task}", "learning=rtrl", "model.num_layers=1"]))
        assert type(objective).__name__ == base and type(objective).__module__.startswith("lightning_modules.")
        assert isinstance(objective.learning_rule, RealTimeRecurrentLearning)
        assert objective.automatic_optimization is False
        _, objective = build(compose_train(tmp_path / f"{task}-bptt", [f"task={task}", "model.num_layers=1"]))
        assert type(objective).__name__ == base and isinstance(objective.learning_rule, BPTT)
        assert objective.automatic_optimization is True


def test_objectives_refuse_rules_they_do_not_support(tmp_path):
    from lightning_modules.run.build import build
    with pytest.raises(UserError, match="learning=rtrl: EncoderDecoderModule trains with bptt only"):
        build(compose_train(tmp_path / "s2s", ["task=reverse", "learning=rtrl"]))


def test_rtrl_refuses_models_it_cannot_train_exactly(train_cfg):
    with pytest.raises(UserError, match="diagonal recurrences only"):
        train(train_cfg(["learning=rtrl", "model=lstm"]))
    with pytest.raises(UserError, match="batch_norm='none'"):
        train(train_cfg(["learning=rtrl", "model.layer.batch_norm=after"]))


def test_adding_streams_pair_markers_across_segments():
    streams = AddingStreams(batch_size=3, min_gap=3, max_gap=9, rng=np.random.default_rng(0))
    parts = [streams.segment(7) for _ in range(30)]  # segments shorter than the gaps
    inputs = torch.cat([p[0] for p in parts], dim=1)
    targets = torch.cat([p[1] for p in parts], dim=1)
    for stream in range(3):
        marked = torch.nonzero(inputs[stream, :, 1]).flatten().tolist()
        gaps = np.diff(marked)
        assert gaps.min() >= 3 and gaps.max() <= 9
        for first, second in zip(marked[0::2], marked[1::2]):
            assert targets[stream, second, 0] == pytest.approx(float(inputs[stream, first, 0] + inputs[stream, second, 0]))
        has_target = torch.isfinite(targets[stream, :, 0]).nonzero().flatten().tolist()
        assert has_target == marked[1::2][:len(has_target)] and len(has_target) == len(marked) // 2


def test_streaming_datamodule_yields_stream_segments():
    data = StreamingAddingDataModule(segment_len=20, batch_size=4, train_segments=5, val_segments=3,
                                     test_segments=2, min_gap=5, max_gap=30, seed=1)
    train_batches = list(data.train_dataloader())
    assert len(train_batches) == 5
    first = train_batches[0]
    assert first.inputs.shape == (4, 20, 2) and first.targets.shape == (4, 20, 1)
    assert first.reset.all() and not any(b.reset.any() for b in train_batches[1:])
    again = list(data.train_dataloader())[0]
    assert not torch.equal(again.inputs, first.inputs)  # a new epoch, new training streams
    val = [list(data.val_dataloader())[0].inputs for _ in range(2)]
    assert torch.equal(val[0], val[1])  # the same validation streams every time
    with pytest.raises(ValueError, match="max_gap"):
        StreamingAddingDataModule(min_gap=10, max_gap=5)


@pytest.mark.parametrize("learning", ["bptt", "rtrl"])
def test_streaming_adding_trains_through_train_py(tmp_path, learning):
    cfg = compose_train(tmp_path / "run", SMALL_MODEL + STREAM_RUN + [
        f"learning={learning}", "task.max_epochs=2", "model.layer.u_bound=0.99",
        "model.last_layer_kwargs.recurrent_init=uniform_bound"]
        + (["learning.update_every=10"] if learning == "rtrl" else []))
    train(cfg)
    results = results_of(tmp_path / "run")
    assert results["status"] == "finished" and math.isfinite(results["test/mse"]), results


def test_stream_objective_scores_only_target_steps():
    predictions = torch.tensor([[[1.0], [2.0], [3.0]]])
    targets = torch.tensor([[[float("nan")], [4.0], [float("nan")]]])
    assert StreamRegressionModule.target_steps(predictions, targets)[0].tolist() == [[2.0]]


def test_benchmark_reports_time_and_memory_of_both_methods(tmp_path):
    from benchmarks.rtrl import main
    path = tmp_path / "rtrl.json"
    results = main(["--steps", "50", "300", "--batch", "2", "--hidden", "8", "--chunk", "100", "--repeats", "1",
                    "--json", str(path)])
    assert json.loads(path.read_text()) == results
    for steps in ("50", "300"):
        for method in ("bptt", "rtrl"):
            assert results[steps][method]["ms"] > 0 and results[steps][method]["peak_mem_mb"] > 0


def test_the_diagonal_leaky_unit_trains_with_rtrl_from_its_model_config(train_cfg, tmp_path):
    train(train_cfg(["model=diagonal_leaky", "model.hidden_size=8", "learning=rtrl", "task.max_epochs=1"]))
    results = results_of(tmp_path / "run")
    assert results["status"] == "finished" and results["model"] == "diagonal_leaky" and math.isfinite(results["test/mse"])
