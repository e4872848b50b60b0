"""eval.py never silently ignores what it is told (issue 19, section 3): an override of what the
checkpoint fixes is one line listing what eval.py accepts; its own settings (trainer, paths, seed,
batch size, workers, NTU test samplings, the objective's evaluation modes such as dynamic evaluation) work."""
from __future__ import annotations

import json

import pytest

from lightning_modules.run import UserError, evaluate, train
from lightning_modules.run.build import build_datamodule, plain_config
from lightning_modules.run.evaluate import check_eval_overrides, eval_keys, override_key, stored_run_config
from tests.conftest import QUICK, compose_eval, compose_train, run_script


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run directory, results) of a one-epoch adding run with a tiny IndRNN."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(compose_train(run_dir, QUICK + ["task.max_epochs=1", "model.hidden_size=8", "logger=csv"]))
    return run_dir, json.loads((run_dir / "results.json").read_text())


def eval_config(tmp_path, ckpt, overrides=()):
    """conf/eval.yaml composed as eval.py would (tests.conftest.compose_eval), logging under ``tmp_path``."""
    return compose_eval(tmp_path / "eval", ckpt, [f"paths.log_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("override", ["+model=indrnn", "+model.hidden_size=16", "model=lstm", "task.seq_len=50",
                                      "+task.x=1", "++optimizer.lr=0.1", "objective.dropout=0.5", "~callbacks",
                                      "experiment=lstm_pmnist", "+learning=rtrl"])
def test_an_override_of_what_the_checkpoint_fixes_is_one_line_listing_what_eval_accepts(override):
    with pytest.raises(UserError) as refused:
        check_eval_overrides(["ckpt_path=x.ckpt", "trainer=cpu", override])
    message = str(refused.value)
    assert "\n" not in message and f"eval.py does not take {override}:" in message
    assert "batch_size" in message and "trainer" in message and "test_samplings" in message


@pytest.mark.parametrize("override", ["trainer=gpu", "trainer.devices=1", "paths.log_dir=/tmp/x", "logger=tensorboard",
                                      "seed=3", "batch_size=7", "num_workers=0", "test_samplings=4",
                                      "dynamic_eval=true", "dynamic_eval_lr=0.1", "hydra.run.dir=/tmp/x",
                                      "hydra/launcher=joblib", "+trainer.limit_test_batches=2", "ckpt_path=last"])
def test_eval_settings_are_accepted(override):
    check_eval_overrides([override])


def test_eval_keys_come_from_eval_yaml():
    assert set(eval_keys()) >= {"ckpt_path", "seed", "batch_size", "num_workers", "test_samplings", "dynamic_eval",
                                "trainer", "logger", "paths", "hydra"}
    assert not {"model", "task", "optimizer", "objective", "callbacks"} & set(eval_keys())


def test_evaluate_refuses_a_composed_override_in_process(trained, tmp_path):
    run_dir, _ = trained
    with pytest.raises(UserError, match=r"eval.py does not take \+model.hidden_size=16"):
        evaluate(eval_config(tmp_path, run_dir, ["+model.hidden_size=16"]))
    assert not (tmp_path / "eval").exists()


def test_batch_size_and_workers_change_the_evaluation_not_the_result(trained, tmp_path):
    run_dir, results = trained
    cfg = eval_config(tmp_path, run_dir, ["batch_size=7", "num_workers=0", "seed=5"])
    from lightning_modules.run.checkpoints import evaluation_checkpoint, load_our_checkpoint
    stored = load_our_checkpoint(evaluation_checkpoint(run_dir))["hyper_parameters"]["run_config"]
    run_cfg = stored_run_config(stored, cfg)
    assert run_cfg.task.datamodule.batch_size == 7 and stored["task"]["datamodule"]["batch_size"] == 16
    assert run_cfg.seed == 5 and run_cfg.model.hidden_size == 8  # eval's seed, the checkpoint's network
    metrics = evaluate(cfg)
    assert metrics["test/mse"] == pytest.approx(results["test/mse"], rel=1e-5)
    written = json.loads(next((tmp_path / "eval").glob("results.json")).read_text())
    assert written["test/mse"] == metrics["test/mse"]


def test_test_samplings_reach_the_ntu_datamodule_and_other_tasks_refuse_it(trained, tmp_path):
    stored = plain_config(compose_train(tmp_path / "ntu", ["task=ntu_cs", f"paths.data_dir={tmp_path}"]))
    cfg = eval_config(tmp_path, "x.ckpt", ["test_samplings=3", "batch_size=5"])
    datamodule = build_datamodule(stored_run_config(stored, cfg))
    assert (datamodule.test_samplings, datamodule.batch_size) == (3, 5)
    assert stored["task"]["datamodule"]["test_samplings"] == 20
    run_dir, _ = trained
    with pytest.raises(UserError, match=r"^test_samplings=3: this checkpoint's task .*AddingProblemDataModule.* has no "
                                        r"test_samplings; leave test_samplings out$"):
        evaluate(eval_config(tmp_path, run_dir, ["test_samplings=3"]))


def test_ptb_batch_size_sets_its_test_streams(tmp_path):
    stored = plain_config(compose_train(tmp_path / "ptb", ["task=ptb_char"]))
    run_cfg = stored_run_config(stored, eval_config(tmp_path, "x.ckpt", ["batch_size=4"]))
    assert run_cfg.task.datamodule.test_batch_size == 4
    assert run_cfg.task.datamodule.batch_size == stored["task"]["datamodule"]["batch_size"]


def test_evaluation_modes_set_the_objective_and_an_objective_without_them_refuses_them(tmp_path):
    stored = plain_config(compose_train(tmp_path / "ptb", ["task=ptb_char"]))
    run_cfg = stored_run_config(stored, eval_config(tmp_path, "x.ckpt", ["dynamic_eval=true", "dynamic_eval_lr=0.01"]))
    assert run_cfg.objective.dynamic_eval is True and run_cfg.objective.dynamic_eval_lr == 0.01
    assert run_cfg.objective.dynamic_eval_rms is False and stored["objective"]["dynamic_eval"] is False
    adding = plain_config(compose_train(tmp_path / "adding", ["task=adding"]))
    assert stored_run_config(adding, eval_config(tmp_path, "x.ckpt")).objective == adding["objective"]  # none given
    with pytest.raises(UserError, match=r"^dynamic_eval=true: this checkpoint's objective "
                                        r"\(lightning_modules.regression.SequenceRegressionModule\) has no "
                                        r"dynamic_eval; leave dynamic_eval out$"):
        stored_run_config(adding, eval_config(tmp_path, "x.ckpt", ["dynamic_eval=true"]))


def test_data_of_a_checkpoint_from_another_machine_is_read_from_this_data_dir(tmp_path):
    stored = plain_config(compose_train(tmp_path / "ntu", ["task=ntu_cs", "paths.data_dir=/elsewhere/data"]))
    assert stored["task"]["datamodule"]["path"] == "/elsewhere/data/ntu/ntu60.h5"
    cfg = eval_config(tmp_path, "x.ckpt", [f"paths.data_dir={tmp_path}/mine"])
    rebased = stored_run_config(stored, cfg, rebase_data=True)
    assert rebased.task.datamodule.path == f"{tmp_path}/mine/ntu/ntu60.h5"
    as_trained = stored_run_config(stored, cfg)  # paths.data_dir not given: the data stays where it was trained
    assert as_trained.task.datamodule.path == "/elsewhere/data/ntu/ntu60.h5"
    assert override_key(f"paths.data_dir={tmp_path}", full=True) == "paths.data_dir"


@pytest.mark.slow  # two interpreter starts
def test_eval_py_refuses_fixed_keys_in_one_line_before_hydra(trained, tmp_path):
    run_dir, _ = trained
    for override in ("+model.hidden_size=16", "task.seq_len=50"):
        completed = run_script("eval.py", [f"ckpt_path={run_dir}", "trainer=cpu", f"paths.log_dir={tmp_path}",
                                           override])
        assert completed.returncode == 1 and "Traceback" not in completed.stderr
        (line,) = completed.stderr.strip().splitlines()
        assert line.startswith(f"error: eval.py does not take {override}:") and "batch_size" in line
        assert "+task" not in line  # never Hydra's advice to add `+`
    assert not (tmp_path / "eval").exists()
