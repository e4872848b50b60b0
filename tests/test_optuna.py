"""hparams_search=adding_optuna: a real 3-trial TPE search through train.py on a tiny adding problem."""
import json
import math

import pytest
import yaml

from tests.conftest import run_script

TINY = ["task.seq_len=20", "task.datamodule.train_size=64", "task.datamodule.val_size=32",
        "task.datamodule.test_size=32", "task.datamodule.batch_size=16", "task.max_epochs=2", "task.stop_at=null",
        "trainer=cpu", "trainer.enable_model_summary=false", "model.hidden_size=16", "model.num_layers=1"]


@pytest.mark.slow
def test_three_trials_optimise_the_task_monitor(tmp_path):
    sweep_dir = tmp_path / "search"
    # model.hidden_size and model.num_layers are fixed on the command line, so only the LR is searched.
    done = run_script("train.py", ["hparams_search=adding_optuna", "hydra.sweeper.n_trials=3", *TINY,
                                   f"hydra.sweep.dir={sweep_dir}"], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    runs = sorted(path for path in sweep_dir.iterdir() if (path / "results.json").is_file())
    results = [json.loads((path / "results.json").read_text()) for path in runs]
    assert len(results) == 3 and all(r["status"] == "finished" for r in results)
    learning_rates = []
    for result in results:
        overrides = dict(item.split("=", 1) for item in result["overrides"])
        assert overrides["model.hidden_size"] == "16"
        learning_rates.append(float(overrides["optimizer.lr"]))
    assert len(set(learning_rates)) == 3 and all(1e-4 <= lr <= 1e-2 for lr in learning_rates)

    # Optuna minimised val/mse (the adding task's monitor) and got the value each run returned.
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna"
    values = [r["val/mse_best"] for r in results]
    assert math.isclose(best["best_value"], min(values), rel_tol=1e-6)
    winner = results[values.index(min(values))]
    assert math.isclose(best["best_params"]["optimizer.lr"],
                        float(dict(item.split("=", 1) for item in winner["overrides"])["optimizer.lr"]), rel_tol=1e-9)
