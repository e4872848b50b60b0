"""The adding problem: marker placement, targets, determinism across instances (and across DataLoader
workers: tests/test_synthetic_tasks.py)."""
import pytest
import torch

from datamodules.adding import BASELINE_MSE, AddingProblemDataModule, AddingProblemDataset
from src.batch import SequenceBatch


@pytest.mark.parametrize("seq_len", [2, 3, 100, 5001])
def test_markers_and_target(seq_len):
    dataset = AddingProblemDataset(seq_len, size=50, seed=7)
    half = seq_len // 2
    for index in range(len(dataset)):
        inputs, target = dataset[index]
        assert inputs.shape == (seq_len, 2) and target.shape == (1,)
        values, markers = inputs[:, 0], inputs[:, 1]
        assert ((values >= 0) & (values < 1)).all()
        marked = torch.nonzero(markers).flatten()
        assert markers.sum() == 2 and len(marked) == 2
        assert marked[0] < half <= marked[1], "one marker in each half"
        torch.testing.assert_close(target[0], values[marked].sum())


def test_identical_across_instances_and_different_across_splits_and_seeds():
    first, second = AddingProblemDataset(100, 20, seed=3), AddingProblemDataset(100, 20, seed=3)
    for index in range(20):
        torch.testing.assert_close(first[index], second[index])
    assert not torch.equal(first[0][0], AddingProblemDataset(100, 20, seed=3, split="val")[0][0])
    assert not torch.equal(first[0][0], AddingProblemDataset(100, 20, seed=4)[0][0])


def test_baseline_mse():
    dataset = AddingProblemDataset(20, 4000, seed=0)
    targets = torch.stack([dataset[i][1] for i in range(len(dataset))])
    assert ((targets - 1.0) ** 2).mean().item() == pytest.approx(BASELINE_MSE, abs=0.01)


def test_datamodule_loaders():
    datamodule = AddingProblemDataModule(seq_len=30, train_size=40, val_size=20, test_size=10, batch_size=8)
    batch = next(iter(datamodule.train_dataloader()))
    assert isinstance(batch, SequenceBatch) and batch.lengths is None and batch.reset is None
    assert batch.inputs.shape == (8, 30, 2) and batch.targets.shape == (8, 1)
    assert len(datamodule.val_dataloader().dataset) == 20 and len(datamodule.test_dataloader().dataset) == 10


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": 1}, "seq_len must be an integer >= 2"),
    ({"train_size": 0}, "train size must be a positive integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
])
def test_rejects_impossible_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AddingProblemDataModule(**kwargs)
