"""experiment=lstm_copy_memory_t1000: the TCN paper's LSTM on copy memory (T=1000), Table 3's recipe, and its
paper target (Table 1: 0.0204, the memoryless level); a short run of the recipe through train's path learns."""
from __future__ import annotations

import json
import math

import pytest
import torch

from datamodules.synthetic import memoryless_baseline
from lightning_modules.run import train
from lightning_modules.run.build import build_datamodule, build_network, build_objective, count_parameters
from tests.conftest import compose_train

EXPERIMENT = "experiment=lstm_copy_memory_t1000"


def test_recipe_is_the_papers_table_3(tmp_path):
    cfg = compose_train(tmp_path / "run", [EXPERIMENT])
    assert cfg.task.seq_len == 1000 and cfg.task.steps == 1020  # the network sees T + 20 steps
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.dropout) == (1, 50, 0.05)
    assert (cfg.trainer.gradient_clip_val, cfg.trainer.gradient_clip_algorithm) == (1.0, "norm")
    data = cfg.task.datamodule
    assert (data.train_size, data.test_size, data.batch_size) == (10_000, 1_000, 32)  # the authors' code
    assert cfg.task.max_epochs * math.ceil(data.train_size / data.batch_size) == 3130  # ~ Figure 4's 3000 steps
    assert cfg.task.stop_at is None  # the whole budget, as the paper
    # One LSTM layer over 10 one-hot channels and a 10-class head: 12,910 weights (the paper's "16K" class).
    network = build_network(cfg)
    assert count_parameters(network) == 4 * (50 * 10 + 50 * 50 + 2 * 50) + 50 * 10 + 10 == 12_910
    optimizer = build_objective(cfg, network, {}).configure_optimizers()
    assert isinstance(optimizer, torch.optim.RMSprop) and optimizer.defaults["lr"] == 5e-4
    # The paper's figure is the memoryless level 10 log(8) / (T + 20), to its 3 significant digits.
    assert cfg.paper.metric == "test/loss" and cfg.paper.value == 0.0204
    assert round(memoryless_baseline(1000), 4) == cfg.paper.value == round(build_datamodule(cfg).baseline, 4)


@pytest.mark.slow  # ~2 min of CPU: a train() run of the recipe
def test_short_run_of_the_recipe_learns_the_blanks(tmp_path):
    # The recipe at T=100 for 30 steps: the loss falls from log(10) (uniform over 10 classes) towards the
    # memoryless level, as in the first steps of the full run.
    train(compose_train(tmp_path / "run", [
        EXPERIMENT, "task.seq_len=100", "task.max_epochs=3", "task.datamodule.train_size=320",
        "task.datamodule.val_size=64", "task.datamodule.test_size=64", "trainer=cpu", "logger=csv",
        "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0"]))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished" and results["experiment"] == "lstm_copy_memory_t1000"
    assert results["steps"] == 30
    assert results["test/loss"] < 0.5 * math.log(10), results
    assert results["test/loss_ratio"] == pytest.approx(results["test/loss"] / memoryless_baseline(100), rel=1e-4)
