"""Copy memory, running parity and sequence generation: data layout, determinism (the adding problem's
too, across DataLoader workers), the per-step labelling objective, and the checks of a task's readout
through the training pipeline (every model runs each task through train.py in tests/test_train.py)."""
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from datamodules.adding import AddingProblemDataset
from datamodules.synthetic import (CopyMemoryDataModule, CopyMemoryDataset, GenerationDataModule, ParityDataModule,
                                   ParityDataset, generation_waveform, memoryless_baseline)
from lightning_modules.labelling import SequenceLabellingModule
from lightning_modules.run import UserError
from lightning_modules.run.build import build
from lightning_modules.regression import SequenceRegressionModule
from src.networks import RecurrentNetwork
from tests.conftest import compose_train


@pytest.mark.parametrize("seq_len", [1, 2, 30, 100])
def test_copy_memory_layout(seq_len):
    dataset = CopyMemoryDataset(seq_len, size=20, seed=5)
    total = seq_len + 20
    for index in range(len(dataset)):
        inputs, targets = dataset[index]
        assert inputs.shape == (total, 10) and inputs.dtype == torch.float32
        assert targets.shape == (total,) and targets.dtype == torch.int64
        assert torch.equal(inputs.sum(dim=1), torch.ones(total)), "one-hot inputs"
        codes = inputs.argmax(dim=1)
        symbols = codes[:10]
        assert ((symbols >= 1) & (symbols <= 8)).all()
        assert (codes[10:seq_len + 9] == 0).all(), "T-1 blanks after the symbols"
        assert codes[seq_len + 9] == 9, "delimiter at 0-based position T+9"
        assert (codes[seq_len + 10:] == 0).all(), "10 blanks after the delimiter"
        assert (targets[:seq_len + 10] == 0).all()
        assert torch.equal(targets[-10:], symbols)


def test_copy_memory_uses_all_symbols():
    dataset = CopyMemoryDataset(5, size=50, seed=0)
    seen = torch.cat([dataset[i][1][-10:] for i in range(len(dataset))])
    assert set(seen.tolist()) == set(range(1, 9))


def test_memoryless_baseline():
    assert memoryless_baseline(100) == pytest.approx(10 * math.log(8) / 120)
    assert memoryless_baseline(100) == pytest.approx(0.17329, abs=1e-5)
    assert CopyMemoryDataModule(seq_len=1000).baseline == pytest.approx(10 * math.log(8) / 1020)
    # The memoryless strategy itself scores exactly that cross-entropy.
    _, targets = CopyMemoryDataset(100, size=1, seed=0)[0]
    logits = torch.full((120, 10), -1e9)
    logits[:110, 0] = 0.0
    logits[110:, 1:9] = 0.0
    assert F.cross_entropy(logits, targets).item() == pytest.approx(memoryless_baseline(100), rel=1e-5)


def test_running_parity():
    dataset = ParityDataset(37, size=30, seed=2)
    for index in range(len(dataset)):
        inputs, targets = dataset[index]
        assert inputs.shape == (37, 1) and inputs.dtype == torch.float32
        assert targets.shape == (37,) and targets.dtype == torch.int64
        bits = inputs[:, 0].long().tolist()
        assert set(bits) <= {0, 1}
        parity = 0
        for step, bit in enumerate(bits):
            parity ^= bit
            assert targets[step] == parity


@pytest.mark.parametrize("make", [lambda **kw: CopyMemoryDataModule(seq_len=30, **kw),
                                  lambda **kw: ParityDataModule(seq_len=30, **kw)])
def test_deterministic_and_split_dependent(make):
    first, second = make(seed=3, train_size=20, val_size=20), make(seed=3, train_size=20, val_size=20)
    for index in range(20):
        torch.testing.assert_close(first.splits["train"][index], second.splits["train"][index])
    assert not torch.equal(first.splits["train"][0][0], first.splits["val"][0][0])
    assert not torch.equal(first.splits["train"][0][0], make(seed=4).splits["train"][0][0])


@pytest.mark.parametrize("dataset", [AddingProblemDataset(50, 40, seed=1), CopyMemoryDataset(20, 24, seed=1)],
                         ids=["adding", "copy_memory"])
def test_identical_across_dataloader_workers(dataset):
    """Every sample is a function of (seed, split, index): two worker processes give the batches of one."""
    single, workers = (list(DataLoader(dataset, batch_size=8, num_workers=count)) for count in (0, 2))
    torch.testing.assert_close(workers, single)


def test_generation_waveform():
    wave = generation_waveform(320, num_sinusoids=3, seed=7)
    assert wave.shape == (320,) and wave.dtype == np.float32
    assert np.abs(wave).max() == pytest.approx(1.0) and (np.abs(wave) <= 1.0).all()
    np.testing.assert_array_equal(wave, generation_waveform(320, num_sinusoids=3, seed=7))
    assert not np.allclose(wave, generation_waveform(320, num_sinusoids=3, seed=8))
    assert not np.allclose(wave, generation_waveform(320, num_sinusoids=4, seed=7))
    datamodule = GenerationDataModule(seq_len=320, seed=7, train_size=3)
    for split in ("train", "val", "test"):
        inputs, targets = datamodule.splits[split][0]
        assert inputs.shape == targets.shape == (320, 1)
        assert not inputs.any()
        np.testing.assert_array_equal(targets[:, 0].numpy(), wave)
    assert len(datamodule.splits["train"]) == 3


def test_per_step_mse_of_regression_module():
    """SequenceRegressionModule needs nothing new for per-step targets: MSE over (B, T, O)."""
    module = SequenceRegressionModule(net=torch.nn.Identity(), optimizer=torch.optim.Adam)
    predictions, targets = torch.randn(2, 5, 1), torch.randn(2, 5, 1)
    assert module.loss(predictions, targets).item() == pytest.approx(((predictions - targets) ** 2).mean().item())


def test_labelling_loss_ignores_steps():
    module = SequenceLabellingModule(net=torch.nn.Identity(), optimizer=torch.optim.Adam, num_classes=3)
    predictions, targets = torch.randn(2, 4, 3), torch.tensor([[0, 1, 2, -100], [2, -100, 1, 0]])
    kept = targets != -100
    expected = F.cross_entropy(predictions[kept], targets[kept])
    assert module.loss(predictions, targets).item() == pytest.approx(expected.item())
    metric = module.make_metric()
    metric(predictions, targets)
    expected_acc = (predictions.argmax(-1) == targets)[kept].float().mean()
    assert metric.compute().item() == pytest.approx(expected_acc.item())
    with pytest.raises(ValueError, match="readout 'all'"):
        module.loss(torch.randn(2, 4, 3), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_len=0), "seq_len must be a positive integer"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(train_size=-1), "train size must be a positive integer"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CopyMemoryDataModule(**kwargs)
    with pytest.raises(ValueError, match=message):
        ParityDataModule(**kwargs)
    with pytest.raises(ValueError, match="num_sinusoids"):
        GenerationDataModule(num_sinusoids=0)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        GenerationDataModule(seq_len=1)


@pytest.mark.slow  # 5-25 s (loaded): make test-slow, which CI runs too
def test_gru_learns_running_parity():
    pl.seed_everything(0)
    datamodule = ParityDataModule(seq_len=10, train_size=2048, val_size=256, test_size=256, batch_size=64, seed=0)
    net = RecurrentNetwork(torch.nn.GRU, input_size=1, output_size=2, hidden_size=32, readout="all")
    module = SequenceLabellingModule(net=net, optimizer=lambda params: torch.optim.Adam(params, lr=1e-2),
                                     num_classes=2, monitor="val/acc")
    trainer = pl.Trainer(max_epochs=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    accuracy = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/acc"]
    assert accuracy > 0.9, accuracy
    assert module.best_value is not None and module.best_value > 0.9


def test_per_step_task_rejects_last_readout(tmp_path):
    for task in ("copy_memory", "parity", "generation"):
        cfg = compose_train(tmp_path / "run", [f"task={task}", "task.readout=last", "model.hidden_size=8"])
        with pytest.raises(UserError, match="^objective: sequence (labelling|regression): a (label|target) at every "
                                            "step needs task.readout=all, not 'last'$"):
            build(cfg)


@pytest.mark.parametrize("model", ["indrnn", "res_indrnn", "dense_indrnn"])
def test_copy_memory_indrnn_bound_counts_every_step_the_network_sees(tmp_path, model):
    from lightning_modules.run.build import build_network
    cfg = compose_train(tmp_path / "run", ["task=copy_memory", "task.seq_len=80", f"model={model}"])
    bounds = [m.u_bound for m in build_network(cfg).modules() if hasattr(m, "u_bound")]
    expected = cfg.model.layer.magnitude ** (1 / 100)  # MAG^(1/T) over T + 20 = 100 steps, not the delay 80
    assert bounds and bounds == pytest.approx([expected] * len(bounds))
