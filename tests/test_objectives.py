"""The objectives on their own: classification learns, schedulers and gradient clipping plug in."""
import functools

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.classification import SequenceClassificationModule
from lightning_modules.regression import SequenceRegressionModule
from src.networks import RecurrentNetwork


def sign_of_first_step(samples=256, steps=12, seed=0):
    """Class = whether the first input is positive: the answer must be carried over every step."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, steps, 1, generator=generator)
    return TensorDataset(inputs, (inputs[:, 0, 0] > 0).long())


def fit(module, dataset, **trainer_kwargs):
    loader = DataLoader(dataset, batch_size=32, shuffle=True)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **trainer_kwargs)
    trainer.fit(module, loader, loader)
    return trainer


def test_classification_learns_and_tracks_the_best_accuracy():
    pl.seed_everything(0)
    network = RecurrentNetwork(torch.nn.GRU, input_size=1, output_size=2, hidden_size=16)
    module = SequenceClassificationModule(network, functools.partial(torch.optim.Adam, lr=0.02), num_classes=2,
                                          monitor="val/acc")
    trainer = fit(module, sign_of_first_step(), max_epochs=30)
    accuracy = float(trainer.callback_metrics["val/acc"])
    assert accuracy > 0.9
    assert float(trainer.callback_metrics["val/acc_best"]) >= accuracy


def test_plateau_scheduler_and_value_clipping():
    pl.seed_everything(0)
    network = RecurrentNetwork(torch.nn.RNN, input_size=1, output_size=1, hidden_size=8)
    scheduler = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.5, patience=0)
    module = SequenceRegressionModule(network, functools.partial(torch.optim.SGD, lr=0.1), scheduler=scheduler,
                                      monitor="val/mse")
    dataset = sign_of_first_step(samples=64)
    regression = TensorDataset(dataset.tensors[0], dataset.tensors[1].float().unsqueeze(1))
    trainer = fit(module, regression, max_epochs=4, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    (config,) = trainer.lr_scheduler_configs
    assert config.monitor == "val/mse" and isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert trainer.optimizers[0].param_groups[0]["lr"] <= 0.1
