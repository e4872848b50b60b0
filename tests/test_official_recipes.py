"""The paper experiment files against the official IndRNN code (../shared/recipes/official-indrnn.md):
network sizes, initialisation, weight-decay rule, clipping and the plateau schedule's count."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from datamodules.splits import SplitDataModule
from lightning_modules.callbacks import PlateauReloadBest
from lightning_modules.run.build import build_network
from src.layers import IndRNN
from tests.conftest import compose_train

# Trainable parameters of the official networks, as their logs print them.
OFFICIAL_PARAMETERS = {"indrnn_pmnist_6layer": 86_410, "res_indrnn_pmnist": 170_890, "dense_indrnn_pmnist": 256_514}


@pytest.mark.parametrize("experiment", sorted(OFFICIAL_PARAMETERS))
def test_pmnist_networks_have_the_official_sizes_and_init(experiment, tmp_path):
    cfg = compose_train(tmp_path, [f"experiment={experiment}"])
    net = build_network(cfg)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == OFFICIAL_PARAMETERS[experiment]
    # Official classifier: kaiming_normal weight (std sqrt(2 / fan_in)), zero bias.
    assert torch.count_nonzero(net.head.bias) == 0
    fan_in = net.head.weight.shape[1]
    assert 0.5 < net.head.weight.std().item() / (2 / fan_in) ** 0.5 < 1.5
    # Official PyTorch code: parameter gradients clamped at 10, no per-step recurrent clipping.
    assert cfg.trainer.gradient_clip_val == 10 and cfg.trainer.gradient_clip_algorithm == "value"
    assert all(layer.recurrence.grad_clip is None for layer in net.modules() if isinstance(layer, IndRNN))
    assert cfg.trainer.val_check_interval == 1700 and cfg.callbacks.plateau_reload.official_count
    # Official batching: every training batch full (the official loader cycles), the datamodule built with it.
    assert cfg.task.datamodule.drop_last is True


def test_residual_fc_layers_use_the_official_init(tmp_path):
    net = build_network(compose_train(tmp_path, ["experiment=res_indrnn_pmnist"]))
    fcs = [net.input_fc] + [m for block in net.blocks for m in block if isinstance(m, nn.Linear)]
    assert len(fcs) == 11
    for fc in fcs:  # kaiming_uniform(a=8): bound sqrt(6 / ((1 + 64) fan_in)), zero bias
        bound = (6 / (65 * fc.weight.shape[1])) ** 0.5
        assert torch.count_nonzero(fc.bias) == 0 and fc.weight.abs().max() <= bound
        assert fc.weight.abs().max() > 0.9 * bound


# The official PyTorch pMNIST/NTU code and the CVPR char-PTB code (Theano, PyTorch c925461) decay
# every parameter but u and biases (their BN scales too); tests/test_official_parity.py replays them.
@pytest.mark.parametrize("experiment", ["indrnn_pmnist_6layer", "res_indrnn_pmnist", "dense_indrnn_pmnist",
                                        "indrnn_ntu_cs_6layer", "indrnn_ntu_cv_6layer", "dense_indrnn_ntu_cs",
                                        "res_indrnn_ntu_cs", "indrnn_ptb_char_6layer"])
def test_official_weight_decay_rule_decays_batch_norm_scales(experiment, tmp_path):
    from lightning_modules.run.build import build_objective

    cfg = compose_train(tmp_path, [f"experiment={experiment}"])
    objective = build_objective(cfg, build_network(cfg), {})
    decayed, exempt = objective.parameter_groups()
    assert exempt["weight_decay"] == 0.0 and "weight_decay" not in decayed
    names = {id(p): name for name, p in objective.named_parameters()}
    decayed_names = [names[id(p)] for p in decayed["params"]]
    exempt_names = [names[id(p)] for p in exempt["params"]]
    assert any(name.endswith("norm_after.weight") or ".bn." in name or "norm" in name for name in decayed_names)
    assert all("weight_hh" in name or "bias" in name for name in exempt_names)
    assert any("weight_hh" in name for name in exempt_names)


@pytest.mark.parametrize("steps", [100, 500, 1000, 5000])
def test_adding_recipes_clip_per_step_as_the_theano_code(steps, tmp_path):
    cfg = compose_train(tmp_path, [f"experiment=indrnn_adding_t{steps}"])
    assert cfg.model.layer.grad_clip == 10 and cfg.trainer.gradient_clip_val is None
    net = build_network(cfg)
    layers = [m for m in net.modules() if isinstance(m, IndRNN)]
    assert len(layers) == 2 and all(layer.recurrence.grad_clip == 10.0 for layer in layers)


class _FakeTrainer:
    """The few attributes PlateauReloadBest reads from a Trainer."""

    def __init__(self, module: nn.Module) -> None:
        self.optimizers = [torch.optim.SGD(module.parameters(), lr=1.0)]
        self.callback_metrics: dict = {}
        self.sanity_checking, self.should_stop = False, False


@pytest.mark.parametrize("official_count, drop_at", [(False, 4), (True, 5)])
def test_plateau_count_matches_the_official_loop(official_count, drop_at):
    # patience 3: ours lowers the rate on the 4th bad validation, the official loop on the 5th.
    module = nn.Linear(1, 1)
    trainer = _FakeTrainer(module)
    callback = PlateauReloadBest("val/acc", mode="max", patience=3, official_count=official_count)
    trainer.callback_metrics["val/acc"] = torch.tensor(0.5)
    callback.on_validation_end(trainer, module)  # the best
    for bad in range(1, 7):
        trainer.callback_metrics["val/acc"] = torch.tensor(0.1)
        callback.on_validation_end(trainer, module)
        if trainer.optimizers[0].param_groups[0]["lr"] < 1.0:
            break
    assert bad == drop_at



class NumberedDataModule(SplitDataModule):
    """70 sequences per split, batches of 32."""

    benchmark = "numbered"

    def __init__(self, drop_last: bool) -> None:
        super().__init__(batch_size=32, num_workers=0, drop_last=drop_last)
        samples = [(torch.full((3, 1), float(i)), torch.tensor(i)) for i in range(70)]
        self.splits = {"train": samples, "val": samples, "test": samples}


@pytest.mark.parametrize("drop_last, train_sizes", [(False, [32, 32, 6]), (True, [32, 32])])
def test_drop_last_gives_full_training_batches_and_keeps_every_evaluation_sequence(drop_last, train_sizes):
    datamodule = NumberedDataModule(drop_last)
    assert [len(batch.targets) for batch in datamodule.train_dataloader()] == train_sizes
    for loader in (datamodule.val_dataloader(), datamodule.test_dataloader()):
        assert [len(batch.targets) for batch in loader] == [32, 32, 6]


def test_drop_last_must_be_a_boolean():
    with pytest.raises(ValueError, match="numbered: drop_last must be true or false, got 'yes'"):
        NumberedDataModule("yes")


def test_cvpr_char_ptb_recipe_normalises_per_window_position(tmp_path):
    # The CVPR code's batch norm restarts its rows at every window while the state is carried on.
    cfg = compose_train(tmp_path, ["experiment=indrnn_ptb_char_6layer", "model.hidden_size=8"])
    norms = [layer.norm_before for layer in build_network(cfg).modules() if isinstance(layer, IndRNN)]
    assert len(norms) == 6
    assert all(norm.stats == "per_window" and norm.running_mean.shape == (cfg.task.seq_len, 8) for norm in norms)


def test_cvpr_char_ptb_recipe_trains_and_evaluates_with_per_window_statistics(tmp_path):
    from lightning_modules.run import train
    from tests.ptb_files import ptb_overrides, write_corpus

    data_dir = tmp_path / "data"
    md5 = write_corpus(data_dir / "ptb")
    overrides = ["experiment=indrnn_ptb_char_6layer", *ptb_overrides(data_dir, md5), "model.hidden_size=8",
                 "model.num_layers=2", "trainer.fast_dev_run=2"]
    train(compose_train(tmp_path / "run", overrides))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished" and math.isfinite(results["test/bpc"])


@pytest.mark.parametrize("experiment", ["indrnn_smnist_6layer", "indrnn_pmnist_6layer", "res_indrnn_pmnist",
                                        "dense_indrnn_pmnist", "indrnn_ntu_cs_6layer", "indrnn_ntu_cs_4layer",
                                        "indrnn_ntu_cv_6layer", "res_indrnn_ntu_cs", "dense_indrnn_ntu_cs"])
def test_official_recipes_batch_as_the_official_loader(experiment, tmp_path):
    """Every training batch full (the official loader cycles), reaching the DataModule the run builds."""
    from hydra.utils import instantiate

    cfg = compose_train(tmp_path, [f"experiment={experiment}"])
    assert cfg.task.datamodule.drop_last is True
    datamodule = instantiate(cfg.task.datamodule)  # builds nothing but the object: no data needed
    assert isinstance(datamodule, SplitDataModule) and datamodule.drop_last is True
