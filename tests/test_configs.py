"""Every experiment, and every model on every task, composes and builds its network and objective
(no data needed)."""
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from lightning_modules.base import SequenceObjective
from lightning_modules.run.build import build_network
from tests.conftest import CONF, compose_train

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
OBJECTIVES = sorted(p.stem for p in (CONF / "objective").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_is_global_names_a_task_and_a_model_and_builds(tmp_path, experiment):
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_\n"), f"{experiment}: overrides must reach the top level"
    cfg = compose_train(tmp_path, [f"experiment={experiment}"])
    choices = HydraConfig.get().runtime.choices
    assert choices["experiment"] == experiment
    assert choices["task"] in TASKS and choices["model"] in MODELS, (experiment, choices)
    assert cfg.objective._target_.startswith("lightning_modules."), experiment
    network = instantiate(cfg.model)
    inputs = torch.randn(2, 5, cfg.task.input_size)
    per_step = cfg.task.readout == "all"
    assert network(inputs)[0].shape == ((2, 5, cfg.task.output_size) if per_step else (2, cfg.task.output_size))
    optimizer = instantiate(cfg.optimizer)(params=network.parameters())
    if cfg.get("scheduler"):
        instantiate(cfg.scheduler)(optimizer=optimizer)


def built_network_output_shape(cfg) -> tuple[int, ...]:
    """The output shape of the network a run of ``cfg`` trains (build_network, as the driver builds it),
    on a batch of 2 sequences of 3 steps: logits (2, L, V) for an encoder-decoder task (fed embeddings). Backward from
    the output must give every trainable parameter a finite gradient."""
    network = build_network(cfg)
    if cfg.task.get("network"):  # an encoder-decoder reads embedded tokens (the objective embeds them)
        embedded = torch.randn(2, 3, cfg.task.network.embedding_size)
        output = network(embedded, embedded)[0]
    else:
        output = network(torch.randn(2, 3, cfg.task.input_size))[0]
    output.square().mean().backward()
    gradients = {name: p.grad for name, p in network.named_parameters() if p.requires_grad}
    assert gradients and all(g is not None and torch.isfinite(g).all() for g in gradients.values()), [
        name for name, g in gradients.items() if g is None or not torch.isfinite(g).all()]
    return tuple(output.shape)


def expected_output_shape(cfg) -> tuple[int, ...]:
    if cfg.task.get("network"):
        return (2, 3, cfg.task.network.vocab_size)
    return (2, 3, cfg.task.output_size) if cfg.task.readout == "all" else (2, cfg.task.output_size)


# Every model with each way a network meets a task (one output per sequence, one per step, an
# encoder-decoder made of the model), forward and backward; every task with one model (the rest of a
# task's network-facing side is its sizes, the same for any model). tests/test_train.py trains every
# model through train() on one kind and each other kind with a few models.
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", ["adding", "copy_memory", "reverse"])
def test_every_model_builds_for_every_kind_of_task(tmp_path, model, task):
    cfg = compose_train(tmp_path, [f"model={model}", f"task={task}"])
    assert built_network_output_shape(cfg) == expected_output_shape(cfg)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_builds_its_network(tmp_path, task):
    cfg = compose_train(tmp_path, [f"task={task}", "model.hidden_size=8"])
    assert built_network_output_shape(cfg) == expected_output_shape(cfg)


def test_experiments_include_the_papers_and_set_the_objective_group(tmp_path):
    assert {"indrnn_adding_t1000", "indrnn_pmnist_6layer", "dense_indrnn_pmnist"} <= set(EXPERIMENTS)
    # An experiment's objective settings land in the objective group (not a stray task.objective).
    cfg = compose_train(tmp_path, ["experiment=indrnn_adding_t1000"])
    assert cfg.objective.scheduler_interval == "step" and "objective" not in cfg.task


@pytest.mark.parametrize("task", TASKS)
def test_every_task_chooses_an_objective_that_accepts_its_network(tmp_path, task):
    cfg = compose_train(tmp_path, [f"task={task}", "model.hidden_size=8"])
    assert HydraConfig.get().runtime.choices["objective"] in OBJECTIVES
    network = build_network(cfg)
    objective = instantiate(cfg.objective)(net=network, optimizer=instantiate(cfg.optimizer))
    assert isinstance(objective, SequenceObjective) and objective.net is network
    assert objective.hparams.monitor == cfg.task.monitor


def test_objective_can_be_chosen_and_overridden_on_the_command_line(tmp_path):
    cfg = compose_train(tmp_path, ["task=generation", "objective=labelling", "objective.ignore_index=-1"])
    assert cfg.objective._target_.endswith("SequenceLabellingModule") and cfg.objective.ignore_index == -1
