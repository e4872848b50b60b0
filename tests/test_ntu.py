"""NTU RGB+D: the lazy DataModule (splits, the official sampling, workers), test-time averaging, and
training through train.py on synthetic skeletons. The converter: tests/test_ntu_convert.py; damaged
files: tests/test_ntu_faults.py."""
from __future__ import annotations

import functools
import json
import logging
import math

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from datamodules.ntu import NTU60_TRAIN_PERFORMERS, NTU120_TRAIN_PERFORMERS, NTUDataModule
from datamodules.ntu_dataset import rotate_vertical, sample_frame_indices
from lightning_modules.classification import SequenceClassificationModule
from lightning_modules.run import train
from src.networks import RecurrentNetwork
from tests.conftest import compose_train
from tests.ntu_files import converted_learnable_set

@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """(raw folder, converted HDF5 path) of the learnable synthetic set."""
    return converted_learnable_set(tmp_path_factory.mktemp("ntu"))


# Splits ------------------------------------------------------------------------------------------


def fake_metadata(performer, camera, setup, action) -> dict[str, np.ndarray]:
    count = len(performer)
    return {"performer": np.asarray(performer), "camera": np.asarray(camera), "setup": np.asarray(setup),
            "action": np.asarray(action), "label": np.asarray(action) - 1, "offset": np.zeros(count, np.int64),
            "length": np.ones(count, np.int32), "replication": np.ones(count)}


def test_splits_follow_performer_camera_and_setup():
    rng = np.random.default_rng(0)
    count = 4000
    meta = fake_metadata(rng.integers(1, 107, count), rng.integers(1, 4, count), rng.integers(1, 33, count),
                         rng.integers(1, 121, count))
    for split, training in [("cross_subject", lambda r: np.isin(meta["performer"][r], NTU60_TRAIN_PERFORMERS)),
                            ("cross_view", lambda r: np.isin(meta["camera"][r], (2, 3))),
                            ("cross_subject120", lambda r: np.isin(meta["performer"][r], NTU120_TRAIN_PERFORMERS)),
                            ("cross_setup120", lambda r: meta["setup"][r] % 2 == 0)]:
        rows = NTUDataModule("unused.h5", split=split).split_rows(meta)
        train_val = np.concatenate([rows["train"], rows["val"]])
        assert training(train_val).all() and not training(rows["test"]).any()
        if split.endswith("120"):
            assert len(train_val) + len(rows["test"]) == count
        else:  # NTU-60 splits keep setups 1-17 and actions 1-60 only
            used = (meta["setup"] <= 17) & (meta["action"] <= 60)
            assert sorted(np.concatenate([train_val, rows["test"]])) == list(np.flatnonzero(used))
        assert len(rows["val"]) == math.ceil(0.05 * len(train_val)) and not set(rows["val"]) & set(rows["train"])
        again = NTUDataModule("unused.h5", split=split).split_rows(meta)
        other = NTUDataModule("unused.h5", split=split, split_seed=1).split_rows(meta)
        assert np.array_equal(again["val"], rows["val"]) and not np.array_equal(other["val"], rows["val"])
    assert len(NTU60_TRAIN_PERFORMERS) == 20 and len(NTU120_TRAIN_PERFORMERS) == 53


def test_split_sizes_are_compared_with_the_published_ones(tmp_path, caplog):
    # 40091 / 16487: NTU-60 cross-subject without the 302 samples that have no skeleton.
    performer = [1] * 40091 + [3] * 16487
    meta = fake_metadata(performer, [1] * len(performer), [1] * len(performer), [1] * len(performer))
    datamodule = NTUDataModule("unused.h5", split="cross_subject")
    rows = datamodule.split_rows(meta)
    assert (len(rows["train"]), len(rows["val"]), len(rows["test"])) == (38086, 2005, 16487)  # the official logs
    datamodule.sizes = {name: len(r) for name, r in rows.items()}
    with caplog.at_level(logging.INFO, logger="datamodules.ntu"):
        datamodule._log_sizes()
    assert "as published (40320 / 16560) less the 302 samples without a skeleton (229 / 73)" in caplog.text
    view = NTUDataModule("unused.h5", split="cross_view", val_fraction=0.05)
    view_rows = view.split_rows(fake_metadata([1] * 56578, [2] * 37646 + [1] * 18932, [1] * 56578, [1] * 56578))
    assert (len(view_rows["train"]), len(view_rows["val"]), len(view_rows["test"])) == (35763, 1883, 18932)


# Sampling ----------------------------------------------------------------------------------------


def draws(length: int, count: int = 400, steps: int = 20) -> np.ndarray:
    uniforms = np.random.default_rng(0).random((count, steps + 1))
    return sample_frame_indices(np.full(count, length), steps, uniforms)


def test_sampling_a_mixed_batch_applies_each_rule_per_sequence():
    lengths = np.array([5, 20, 30, 300])
    uniforms = np.random.default_rng(3).random((4, 21))
    mixed = sample_frame_indices(lengths, 20, uniforms)
    for row, length in enumerate(lengths):
        np.testing.assert_array_equal(mixed[row], sample_frame_indices([length], 20, uniforms[row:row + 1])[0])
    assert (mixed < lengths[:, None]).all() and (mixed[2:] >= 0).all()
    np.testing.assert_array_equal(sample_frame_indices(lengths, 20, uniforms), mixed)  # same draws, same frames


def test_sampling_pads_a_5_frame_sequence_at_a_random_offset():
    starts = set()
    for indices in draws(5):
        valid = np.flatnonzero(indices >= 0)
        assert list(indices[valid]) == [0, 1, 2, 3, 4] and list(valid) == list(range(valid[0], valid[0] + 5))
        starts.add(int(valid[0]))
    assert starts == set(range(15))  # offset in [0, 20 - 5)


def test_sampling_a_20_frame_sequence_follows_the_official_padding_branch():
    starts = set()
    for indices in draws(20):
        valid = np.flatnonzero(indices >= 0)
        start = int(valid[0])
        starts.add(start)
        assert list(valid) == list(range(start, 20))          # padding only before
        first = int(indices[start])
        assert 0 <= first <= max(start - 1, 0) and list(indices[start:]) == list(range(first, first + 20 - start))
    assert starts == set(range(5))  # offset in [0, max(20 - 20, 20 // 4))


def test_sampling_a_30_frame_sequence_takes_a_random_window():
    starts = set()
    for indices in draws(30):
        assert list(indices) == list(range(indices[0], indices[0] + 20))
        starts.add(int(indices[0]))
    assert starts == set(range(10))  # window start in [0, 30 - 20)


def test_sampling_a_300_frame_sequence_takes_one_random_frame_per_segment():
    picked = draws(300)
    for step in range(20):
        low, high = 15 * step, 15 * step + 15
        assert ((picked[:, step] >= low) & (picked[:, step] < high)).all()
        assert len(set(picked[:, step])) > 10  # random within the segment
    assert draws(307)[:, -1].max() > 299   # the last segment takes the remainder


def test_rotation_about_the_vertical_axis_keeps_heights_and_distances():
    points = np.random.default_rng(0).normal(size=(4, 25, 3)).astype(np.float32)
    rotated = rotate_vertical(points.copy(), 0.7)
    np.testing.assert_allclose(rotated[..., 1], points[..., 1])
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(points, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(rotate_vertical(rotated, -0.7), points, atol=1e-5)


# DataModule --------------------------------------------------------------------------------------


def test_batches_are_sampled_frames_of_the_file(learnable):
    _, path = learnable
    datamodule = NTUDataModule(str(path), split="cross_subject", batch_size=8, num_workers=0, test_samplings=3)
    datamodule.setup("fit")
    assert datamodule.sizes == {"train": 57, "val": 3, "test": 20}  # performers 1, 2, 4 train; 3 tests
    test = datamodule.split("test")
    batch = test.__getitems__([0, 5])  # K = 3 samplings of each: 6 sequences in 2 groups
    assert batch.inputs.shape == (6, 20, 150) and batch.inputs.dtype == torch.float32
    assert batch.targets.dtype == torch.int64 and batch.groups.tolist() == [0, 0, 0, 1, 1, 1]
    with h5py.File(path, "r") as h5:
        for position, index in enumerate([0, 5]):
            row = int(test.rows[index])
            frames = h5["skeletons"][h5["offset"][row]:h5["offset"][row] + h5["length"][row]].reshape(-1, 150)
            assert (batch.targets[3 * position:3 * position + 3] == h5["label"][row]).all()
            for sampled in batch.inputs[3 * position:3 * position + 3].numpy():
                present = sampled.any(axis=1)  # padded steps are all zeros
                assert all(any(np.array_equal(step, frame) for frame in frames) for step in sampled[present])
    train_batch = datamodule.split("train").__getitems__(list(range(8)))
    assert train_batch.inputs.shape == (8, 20, 150) and train_batch.groups is None
    assert datamodule.split("val").__getitems__([0, 1]).groups is None  # val_samplings=1: one set each


def test_workers_read_the_same_batches_as_the_main_process(learnable):
    _, path = learnable
    batches = {}
    for workers in (0, 2):
        datamodule = NTUDataModule(str(path), split="cross_view", batch_size=4, num_workers=workers, test_samplings=2)
        datamodule.setup("test")
        batches[workers] = list(datamodule.test_dataloader())
        train = list(datamodule.train_dataloader())
        assert sum(len(b.targets) for b in train) == datamodule.sizes["train"]
    assert len(batches[0]) == len(batches[2]) == 10
    for a, b in zip(batches[0], batches[2]):  # evaluation samplings are seeded per sample
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.groups, b.groups) and a.groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3][:len(a.groups)]


def test_augmentations_centre_rotate_and_vary_the_length(learnable):
    _, path = learnable
    datamodule = NTUDataModule(str(path), split="cross_subject", center=True, rotate_degrees=45.0,
                               random_length=[10, 30], batch_size=4, num_workers=0)
    datamodule.setup("fit")
    lengths = {datamodule.split("train").__getitems__([0, 1, 2]).inputs.shape[1] for _ in range(40)}
    assert lengths <= set(range(10, 31)) and len(lengths) > 5
    val = datamodule.split("val").__getitems__([0]).inputs[0].view(20, 2, 25, 3)
    assert val.shape[0] == 20  # evaluation keeps the configured 20 steps
    tracked = val[:, 0].abs().sum(dim=(1, 2)) > 0
    assert val[tracked, 0, 1].norm(dim=-1).max() < 1.0  # centred: the spine stays near the origin
    for bad in ({"random_length": [30, 10]}, {"rotate_degrees": -1.0}, {"split": "cross_setup"}):
        with pytest.raises(ValueError):
            NTUDataModule(str(path), **bad)


def test_test_accuracy_averages_the_logits_of_each_sequence_s_samplings(learnable):
    """Through the real DataModule and Trainer.test: test loss and accuracy are those of the logits
    averaged over each sample's K samplings (computed here as a (B, K, T, I) stack, the layout the
    objective averaged before groups were part of the batch contract)."""
    _, path = learnable
    torch.manual_seed(0)
    samplings = 3
    datamodule = NTUDataModule(str(path), split="cross_subject", batch_size=8, num_workers=0,
                               test_samplings=samplings)
    network = RecurrentNetwork(functools.partial(torch.nn.GRU), input_size=150, output_size=60, hidden_size=8)
    objective = SequenceClassificationModule(network, optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                                             num_classes=60)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    measured = trainer.test(objective, datamodule=datamodule, verbose=False)[0]
    correct, loss_sum, count = 0, 0.0, 0
    objective.eval()
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            examples = len(batch.targets) // samplings
            stacked = batch.inputs.view(examples, samplings, *batch.inputs.shape[1:])       # (B, K, T, I)
            logits = objective(stacked.flatten(0, 1)).view(examples, samplings, -1).mean(dim=1)
            targets = batch.targets.view(examples, samplings)[:, 0]
            correct += int((logits.argmax(dim=1) == targets).sum())
            loss_sum += float(torch.nn.functional.cross_entropy(logits, targets)) * examples
            count += examples
    assert count == datamodule.sizes["test"] == 20
    assert measured["test/acc"] == pytest.approx(correct / count, abs=1e-6)
    assert measured["test/loss"] == pytest.approx(loss_sum / count, rel=1e-5)


# Training through train.py -----------------------------------------------------------------------

QUICK_NTU = ["task=ntu_cs", "task.datamodule.num_workers=0", "task.datamodule.batch_size=16",
             "task.datamodule.test_samplings=4", "model.hidden_size=32", "model.layer.batch_norm=after",
             "trainer=cpu", "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0"]


def test_fast_dev_run_through_train_py(learnable, tmp_path):
    _, path = learnable
    train(compose_train(tmp_path / "run", QUICK_NTU + [f"task.datamodule.path={path}", "trainer.fast_dev_run=true"]))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished" and "test/acc" in results and results["task"] == "ntu_cs"


@pytest.mark.slow
def test_indrnn_learns_synthetic_actions_well_above_chance(learnable, tmp_path):
    _, path = learnable
    train(compose_train(tmp_path / "run", QUICK_NTU + [
        f"task.datamodule.path={path}", "optimizer.lr=0.005", "task.max_epochs=15", "task.datamodule.batch_size=8",
        "task.datamodule.val_fraction=0.2", "task.datamodule.num_workers=2", "task.datamodule.center=true"]))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished"
    assert results["test/acc"] >= 0.6, results  # 5 actions: chance is 0.2
