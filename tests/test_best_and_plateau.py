"""The run's one "best validation" (lightning_modules/callbacks.py BestValidation) and the one plateau
schedule (PlateauReloadBest): a run through the driver logs val/<metric>_best as the running best of
the monitored metric, and best.ckpt, results.json and the checkpointed state all hold that same
validation; the plateau options (no reload, rate held at min_lr) act as documented; a run refuses a
second best or one that watches another metric than the task's."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_modules.callbacks import BestValidation, PlateauReloadBest
from lightning_modules.run import train
from lightning_modules.run.driver import read_results, run_callbacks
from lightning_modules.run.errors import UserError
from tests.conftest import QUICK, compose_train


def fake_trainer(module: torch.nn.Module, lr: float = 1.0) -> SimpleNamespace:
    """The attributes the callbacks read from a Trainer."""
    return SimpleNamespace(sanity_checking=False, callback_metrics={}, should_stop=False,
                           optimizers=[torch.optim.SGD(module.parameters(), lr=lr)])


def validate(callback, trainer, module, value: float) -> None:
    trainer.callback_metrics["val/mse"] = torch.tensor(value)
    callback.on_validation_end(trainer, module)


def test_one_best_read_by_tensorboard_checkpoint_results_and_resume_state(tmp_path):
    settings = [*QUICK, "task.stop_at=null", "model.hidden_size=8", "task.max_epochs=5", "optimizer.lr=0.05"]
    train(compose_train(tmp_path, settings))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    values = [event.value for event in events.Scalars("val/mse")]  # one validation per epoch
    bests = [event.value for event in events.Scalars("val/mse_best")]
    assert len(values) == len(bests) == 5
    assert bests == pytest.approx([min(values[:i + 1]) for i in range(5)])
    results = read_results(tmp_path)
    best_epoch = min(range(5), key=lambda i: values[i])
    assert results["best_epoch"] == best_epoch and results["val/mse_best"] == pytest.approx(values[best_epoch])
    assert torch.load(results["best_checkpoint"], weights_only=True)["global_step"] == results["best_step"]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["BestValidation"]
    assert state["best"] == results["best"]


def test_plateau_without_reload_holds_the_rate_at_min_lr_and_trains_on():
    module = torch.nn.Linear(2, 1)
    trainer = fake_trainer(module)
    plateau = PlateauReloadBest("val/mse", mode="min", factor=0.1, patience=0, min_lr=0.02, shrink_patience=False,
                                reload_best=False, stop_below_min_lr=False)
    validate(plateau, trainer, module, 0.5)
    with torch.no_grad():
        module.weight.add_(1.0)
    moved = module.weight.detach().clone()
    validate(plateau, trainer, module, 0.6)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)
    validate(plateau, trainer, module, 0.7)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.02)  # 0.01 held at min_lr
    assert torch.equal(module.weight, moved) and not trainer.should_stop and plateau.reductions == 2
    validate(plateau, trainer, module, 0.4)
    assert plateau.improved and plateau.best_value == pytest.approx(0.4) and plateau.bad_validations == 0


def test_a_non_finite_value_never_becomes_the_best_and_stops_the_run():
    module = torch.nn.Linear(2, 1)
    trainer = fake_trainer(module)
    best = BestValidation("val/mse", mode="min")
    validate(best, trainer, module, 0.5)
    validate(best, trainer, module, float("nan"))
    assert best.best == {"step": None, "epoch": None, "val/mse": 0.5} and trainer.should_stop


def test_the_monitored_metric_must_be_logged():
    module = torch.nn.Linear(2, 1)
    trainer = fake_trainer(module)
    trainer.callback_metrics["val/loss"] = torch.tensor(1.0)
    with pytest.raises(ValueError, match=r"val/acc was not logged by the validation \(it logged val/loss\)"):
        BestValidation("val/acc", mode="max").on_validation_end(trainer, module)


def test_a_run_has_one_best_and_it_is_first(tmp_path):
    callbacks, best = run_callbacks(compose_train(tmp_path / "a", QUICK))
    assert type(best) is BestValidation and callbacks[0] is best and (best.monitor, best.mode) == ("val/mse", "min")
    callbacks, best = run_callbacks(compose_train(tmp_path / "b", [*QUICK, "callbacks=official_indrnn"]))
    assert isinstance(best, PlateauReloadBest) and callbacks[0] is best
    assert sum(isinstance(cb, BestValidation) for cb in callbacks) == 1
    with pytest.raises(UserError, match="PlateauReloadBest watches val/loss .* but task.monitor is val/mse"):
        run_callbacks(compose_train(tmp_path / "c", [*QUICK, "callbacks=official_indrnn",
                                                      "callbacks.plateau_reload.monitor=val/loss"]))


def test_scheduler_plateau_is_the_plateau_callback_with_torch_settings(tmp_path):
    cfg = compose_train(tmp_path, [*QUICK, "scheduler=plateau"])
    assert cfg.get("scheduler") is None
    _, plateau = run_callbacks(cfg)
    assert isinstance(plateau, PlateauReloadBest)
    assert (plateau.reload_best, plateau.shrink_patience, plateau.stop_below_min_lr, plateau.patience) == (
        False, False, False, 5)
