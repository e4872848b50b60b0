"""Every experiment, and every model on every task, composes and builds its network (no data needed)."""
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import CONF, compose_train

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_builds(tmp_path, experiment):
    cfg = compose_train(tmp_path, [f"experiment={experiment}"])
    network = instantiate(cfg.model)
    inputs = torch.randn(2, 5, cfg.task.input_size)
    per_step = cfg.task.readout == "all"
    assert network(inputs)[0].shape == ((2, 5, cfg.task.output_size) if per_step else (2, cfg.task.output_size))
    optimizer = instantiate(cfg.optimizer)(params=network.parameters())
    if cfg.get("scheduler"):
        instantiate(cfg.scheduler)(optimizer=optimizer)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_builds_for_every_task(tmp_path, model, task):
    cfg = compose_train(tmp_path, [f"model={model}", f"task={task}"])
    network = instantiate(cfg.model)
    per_step = cfg.task.readout == "all"  # sequence -> sequence tasks predict every step
    expected = (2, 3, cfg.task.output_size) if per_step else (2, cfg.task.output_size)
    assert network(torch.randn(2, 3, cfg.task.input_size))[0].shape == expected


def test_experiment_list_is_not_empty():
    assert {"indrnn_adding_t1000", "indrnn_pmnist_6layer", "dense_indrnn_pmnist"} <= set(EXPERIMENTS)
    assert Path(CONF / "train.yaml").exists()
