"""train.py and eval.py driven through Hydra as a user would: every model and every task through the
training pipeline, a real training run, results.json, TensorBoard, checkpoints, eval, multirun, DDP and
every bad-input error."""
import json
import math
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datamodules.adding import BASELINE_MSE
from datamodules.synthetic import memoryless_baseline
from lightning_modules.run import UserError, evaluate, train
from lightning_modules.regression import SequenceRegressionModule
from lightning_modules.run.build import build_network
from src.layers import Bidirectional, IndRNN
from src.networks import DenseIndRNN, ResidualIndRNN
from tests.conftest import QUICK, compose_eval, compose_train, run_script
from tests.mnist_files import write_tiny_mnist

MODELS = sorted(path.stem for path in (Path(__file__).resolve().parents[1] / "conf" / "model").glob("*.yaml"))
# Long enough to learn (T=50, 2000 sequences), short enough for a test (~10 s on 2 cores).
REAL_TRAINING = ["task.seq_len=50", "task.datamodule.train_size=2000", "task.datamodule.val_size=200",
                 "task.datamodule.test_size=500", "task.stop_at=0.03", "task.max_epochs=40",
                 "trainer=cpu", "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0"]


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


# The tasks' kinds, through the training pipeline as train.py runs it: one batch of each stage
# (fast_dev_run). The task's overrides keep sequences short; its metric must be reported.
TASK_RUNS = {
    "adding": (["task.seq_len=20"], "test/mse"),                          # regression, readout last
    "generation": (["task.seq_len=40"], "test/mse"),                      # per-step regression
    "copy_memory": (["task.seq_len=10"], "test/acc"),                     # per-step labelling
    "parity": (["task.seq_len=12"], "test/acc"),                          # per-step labelling
    "reverse": (["task.seq_len=4", "task.network.context_size=16",
                 "task.network.embedding_size=8"], "test/seq_acc"),  # encoder-decoder
    "mnist_rows": ([], "test/acc"),                                       # classification (tiny local files)
}


def small(model: str) -> list[str]:
    """``model`` at a test-sized width (and depth, for the dense IndRNN's 18 layers)."""
    return ["model.growth_rate=4", "model.block_config=[2,1]"] if model == "dense_indrnn" else ["model.hidden_size=16"]


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory) -> list[str]:
    """Overrides reading tiny MNIST files (tests/mnist_files.py) from a local data_dir, no download."""
    data_dir = tmp_path_factory.mktemp("data")
    md5 = write_tiny_mnist(data_dir / "mnist", train=200, test=60)
    return [f"paths.data_dir={data_dir}", "task.datamodule.download=false",
            "task.datamodule.md5={" + ",".join(f"{name}:{value}" for name, value in md5.items()) + "}"]


# The pairs that add something to tests/test_configs.py, which builds every model for each of the three
# ways a network meets a task (one output per sequence, one per step, an encoder-decoder built from the
# model config) and runs it forward and backward: every model through the whole pipeline on the adding
# problem (its constraints, checkpoint hooks and metrics); every task with the IndRNN; the per-step and
# encoder-decoder kinds with the LSTM too (a tuple state). Greedy decoding with each model's carried state:
# tests/test_seq2seq.py.
PAIRS = ([(model, "adding") for model in MODELS]
         + [("indrnn", task) for task in TASK_RUNS if task != "adding"]
         + [("lstm", "copy_memory"), ("lstm", "reverse")])


@pytest.mark.parametrize(("model", "task"), PAIRS)
def test_every_model_runs_every_kind_of_task(tmp_path, tiny_mnist, model, task):
    overrides, metric = TASK_RUNS[task]
    if task == "mnist_rows":
        overrides = overrides + tiny_mnist
    train(compose_train(tmp_path / "run", [f"task={task}", f"model={model}", *small(model), *overrides,
                                           "task.datamodule.batch_size=8", "trainer=cpu", "trainer.fast_dev_run=true",
                                           "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0",
                                           "logger=csv"]))
    results = read_results(tmp_path / "run")
    assert results["status"] == "finished" and results["model"] == model and results["task"] == task
    assert results["params"] > 0 and math.isfinite(results[metric])
    if metric.endswith("acc"):
        assert 0.0 <= results[metric] <= 1.0
    if task == "reverse":
        assert 0.0 <= results["test/acc"] <= 1.0  # teacher-forced per-token accuracy
    if task == "copy_memory":
        assert results["test/loss_ratio"] == pytest.approx(results["test/loss"] / memoryless_baseline(10), rel=1e-4)


def indrnn_layers(network: torch.nn.Module) -> list[IndRNN]:
    return [module for module in network.modules() if isinstance(module, IndRNN)]


# Each option must reach the network that trains: checked on the network the run's config builds,
# whose parameters and buffers are exactly those of the trained checkpoint.
INDRNN_OPTIONS = {
    "bn-after": (["model.layer.batch_norm=after", "model.dropout=0.1", "model.layer.input_init=kaiming_a8"],
                 lambda net: net.dropout.p == 0.1 and all(
                     layer.norm_after is not None and layer.norm_before is None and layer.input_init == "kaiming_a8"
                     for layer in indrnn_layers(net))),
    "bn-per-step-bidirectional": (
        ["model.layer.batch_norm=before", "model.layer.batch_norm_stats=per_step", "model.layer.bidirectional=true"],
        lambda net: len(indrnn_layers(net)) == 4 and sum(isinstance(m, Bidirectional) for m in net.modules()) == 2
        and all(layer.norm_before.stats == "per_step" and layer.norm_after is None for layer in indrnn_layers(net))),
    "conv1d-tanh": (["model.layer.projection=conv1d", "model.layer.nonlinearity=tanh", "optimizer.weight_decay=1e-4"],
                    lambda net: all(isinstance(layer.projection, torch.nn.Conv1d) and layer.projection.kernel_size == (3,)
                                    and layer.recurrence.nonlinearity == "tanh" for layer in indrnn_layers(net))),
    "official-schedule": (["callbacks=official_indrnn", "trainer.gradient_clip_val=10",
                           "trainer.gradient_clip_algorithm=value"],
                          lambda net: len(indrnn_layers(net)) == 2),
    "residual": (["model=res_indrnn", "model.num_blocks=1", "model.hidden_size=16"],
                 lambda net: isinstance(net, ResidualIndRNN) and len(net.blocks) == 1
                 and all(layer.hidden_size == 16 for layer in indrnn_layers(net))),
    "dense": (["model=dense_indrnn", "model.growth_rate=4", "model.block_config=[2,1]"],
              lambda net: isinstance(net, DenseIndRNN) and [len(block) for block in net.blocks] == [2, 1]),
}


@pytest.mark.parametrize("option", list(INDRNN_OPTIONS))
def test_indrnn_options_train_through_hydra(train_cfg, tmp_path, option):
    overrides, built_as_asked = INDRNN_OPTIONS[option]
    cfg = train_cfg(overrides + ["task.max_epochs=2"])
    network = build_network(cfg)
    assert built_as_asked(network), network
    train(cfg)
    results = read_results(tmp_path / "run")
    assert results["status"] == "finished"
    trained = torch.load(results["best_checkpoint"], weights_only=True)["state_dict"]
    assert {key: value.shape for key, value in trained.items()} == {
        f"net.{key}": value.shape for key, value in network.state_dict().items()}
    if option == "official-schedule":
        assert results["steps"] > 0 and cfg.callbacks.plateau_reload.patience == 10
    if option == "conv1d-tanh":
        assert cfg.optimizer.weight_decay == 1e-4


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    best = train(compose_train(run_dir, REAL_TRAINING))
    return run_dir, best


def test_indrnn_learns_the_adding_problem(trained_run):
    run_dir, best = trained_run
    results = read_results(run_dir)
    assert results["status"] == "finished"
    assert results["test/mse"] < BASELINE_MSE / 2, results
    assert best == pytest.approx(results["val/mse_best"])
    assert results["params"] == 17281
    assert {"overrides", "steps", "best_checkpoint"} <= results.keys()


def test_checkpoints_load_with_weights_only_and_respect_the_u_bound(trained_run):
    run_dir, _ = trained_run
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        config = checkpoint["hyper_parameters"]["run_config"]
        bound = 2.0 ** (1 / config["task"]["seq_len"])
        recurrent = [v for k, v in checkpoint["state_dict"].items() if k.endswith("weight_hh")]
        assert len(recurrent) == 2 and all(u.abs().max() <= bound + 1e-6 for u in recurrent)


def test_tensorboard_has_curves_learning_rate_and_hparams(trained_run):
    run_dir, _ = trained_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/mse", "val/loss", "val/mse", "val/mse_best", "test/mse"} <= scalars
    assert any(tag.startswith("lr-Adam") for tag in scalars)  # one curve per parameter group
    plugin = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= plugin.keys()
    experiment = plugin["_hparams_/experiment"].decode("utf-8", "ignore")
    assert "test/mse" in experiment and "model/hidden_size" in experiment


def test_eval_reproduces_the_test_metrics(trained_run, tmp_path, capsys):
    # eval.py's run in this process (eval.py's own directory and command line: tests/test_runs.py).
    run_dir, _ = trained_run
    metrics = evaluate(compose_eval(tmp_path / "eval", run_dir / "checkpoints" / "best.ckpt"))
    assert "test metrics: test/loss=" in capsys.readouterr().out
    evaluated = read_results(tmp_path / "eval")
    assert evaluated["test/mse"] == metrics["test/mse"]
    assert evaluated["test/mse"] == pytest.approx(read_results(run_dir)["test/mse"], rel=1e-5)


@pytest.mark.slow  # 3-7 s (loaded): make test-slow, which CI runs too
def test_resume_from_last_checkpoint(trained_run, train_cfg, tmp_path):
    run_dir, _ = trained_run
    previous = read_results(run_dir)
    resumed = REAL_TRAINING + [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                               f"task.max_epochs={previous['epochs'] + 2}", "task.stop_at=null"]
    train(compose_train(tmp_path / "resumed", resumed))
    results = read_results(tmp_path / "resumed")
    assert results["steps"] == previous["steps"] + 2 * 2000 // 50


@pytest.mark.slow  # a two-job sweep through train.py -m, about 50 s on 2 cores
def test_multirun_writes_one_directory_per_job(tmp_path):
    completed = run_script("train.py", ["-m", "model=indrnn,lstm", *QUICK, f"paths.log_dir={tmp_path}"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    jobs = sorted(p.parent.name for p in tmp_path.glob("multirun/*/*/*/results.json"))
    assert jobs == ["0_adding_indrnn", "1_adding_lstm"]
    for path in tmp_path.glob("multirun/*/*/*/results.json"):
        results = json.loads(path.read_text())
        assert results["status"] == "finished" and (path.parent / "checkpoints" / "best.ckpt").exists()
        assert any(o.startswith("model=") for o in results["overrides"])


@pytest.mark.slow  # two processes started by Lightning under Hydra, 45-85 s each on 2 cores
@pytest.mark.parametrize("multirun", [False, True])
def test_ddp_cpu_two_processes(tmp_path, multirun):
    args = ["trainer=ddp_cpu", *[q for q in QUICK if not q.startswith("trainer=")], f"paths.log_dir={tmp_path}"]
    if multirun:
        args = ["-m", "model=indrnn,gru", *args]
    completed = run_script("train.py", args)
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = list(tmp_path.rglob("results.json"))
    assert len(found) == (2 if multirun else 1)
    for path in found:
        results = json.loads(path.read_text())
        assert results["status"] == "finished" and "test/mse" in results and "val/mse_best" in results


# ---------------------------------------------------------------- bad input: one clear line each

def test_unknown_model_lists_the_valid_names(tmp_path):
    # Hydra's composition error, which train.py prints (HYDRA_FULL_ERROR=0) before any code of ours runs.
    with pytest.raises(MissingConfigException) as error:
        compose_train(tmp_path / "run", ["model=transformer"])
    assert "model/transformer" in str(error.value) and all(m in str(error.value) for m in MODELS)


@pytest.mark.slow  # 5-25 s (loaded): make test-slow, which CI runs too
def test_impossible_value_is_one_line_without_traceback(tmp_path):
    # train.py's one line at the command line (run_entry); every UserError below is printed the same way.
    completed = run_script("train.py", ["model.hidden_size=0", f"paths.log_dir={tmp_path}"])
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1] == (
        "error: model: hidden_size must be a positive integer, got 0")


@pytest.mark.parametrize("override, message", [
    ("model.hidden_size=-1", "model: hidden_size must be a positive integer, got -1"),
    ("model.num_layers=0", "model: num_layers must be a positive integer, got 0"),
    ("task.seq_len=1", "task.datamodule: adding problem: seq_len must be an integer >= 2"),
    ("task.readout=all", "objective: sequence regression: one target per sequence, so task.readout must be 'last' "
                         "or 'mean', not 'all'"),
    ("model.layer.nonlinearity=sigmoid", "model: unknown IndRNN nonlinearity 'sigmoid'"),
    ("model.dropout=1.0", "model: dropout must be a number in [0.0, 1.0)"),
])
def test_impossible_values_fail_before_training(train_cfg, tmp_path, override, message):
    with pytest.raises(UserError) as error:
        train(train_cfg([override]))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_exploding_learning_rate_stops_with_the_step(train_cfg, tmp_path):
    with pytest.raises(UserError, match=r"training loss is (nan|inf) at step \d+ .*lower optimizer.lr") as error:
        train(train_cfg(["optimizer.lr=1e30", "task.max_epochs=5"]))
    assert "no checkpoint was saved before it" in str(error.value)  # it diverges within the first epoch
    results = read_results(tmp_path / "run")
    assert results["status"] == "diverged" and "at step" in results["error"]


def test_non_finite_validation_loss_stops_as_diverged(train_cfg, tmp_path, monkeypatch):
    # Non-finite gradients can poison the weights while the training loss still looks finite.
    original = SequenceRegressionModule.loss

    def nan_in_validation(self, predictions, targets):
        loss = original(self, predictions, targets)
        return loss * float("nan") if not self.training and self.global_step >= 8 else loss

    monkeypatch.setattr(SequenceRegressionModule, "loss", nan_in_validation)
    with pytest.raises(UserError, match=r"validation loss is nan at step 8 .*lower optimizer.lr"):
        train(train_cfg(["task.max_epochs=5"]))
    results = read_results(tmp_path / "run")
    assert results["status"] == "diverged"
    checkpoint = torch.load(results["last_checkpoint"], weights_only=True)
    assert checkpoint["global_step"] == 4  # the checkpoint of the diverged validation was never written


def test_non_finite_loss_keeps_the_last_good_checkpoint(train_cfg, tmp_path, monkeypatch):
    original = SequenceRegressionModule.loss

    def loss_turning_nan(self, predictions, targets):
        loss = original(self, predictions, targets)
        return loss * float("nan") if self.training and self.global_step >= 6 else loss

    monkeypatch.setattr(SequenceRegressionModule, "loss", loss_turning_nan)
    with pytest.raises(UserError, match="training loss is nan at step 6"):
        train(train_cfg(["task.max_epochs=5"]))  # 4 steps per epoch: epoch 0 ends with a checkpoint
    results = read_results(tmp_path / "run")
    assert results["status"] == "diverged" and results["steps"] == 6
    checkpoint = torch.load(results["last_checkpoint"], weights_only=True)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


@pytest.mark.parametrize("flag", ["model.bidirectional=true", "model.layer.bidirectional=true"])
def test_bidirectional_model_on_a_causal_task_is_rejected(train_cfg, flag):
    with pytest.raises(UserError, match=r"^objective: the task is causal \(task.causal=true\).*a bidirectional model "
                                        r"sees the future .*: set model.bidirectional=false and "
                                        r"model.layer.bidirectional=false$"):
        train(train_cfg(["task.causal=true", flag]))
