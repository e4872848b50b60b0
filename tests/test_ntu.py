"""NTU RGB+D: the .skeleton -> HDF5 converter (exact layout, bad files, zip vs folder, interruption),
the lazy DataModule (splits, the official sampling, workers), test-time averaging, and training
through train.py on synthetic skeletons."""
from __future__ import annotations

import functools
import json
import logging
import math
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from datamodules import ntu_convert, ntu_hdf5, ntu_skeleton
from datamodules.download import DownloadError
from datamodules.ntu import NTU60_TRAIN_PERFORMERS, NTU120_TRAIN_PERFORMERS, NTUDataModule
from datamodules.ntu_dataset import rotate_vertical, sample_frame_indices
from datamodules.ntu_convert import convert, partial_path, summary_table
from datamodules.ntu_synthetic import sample_name, sample_text, skeleton_text
from lightning_modules.classification import SequenceClassificationModule
from lightning_modules.run import UserError, train
from src.networks import RecurrentNetwork
from tests.conftest import compose_train, run_script
from tests.ntu_files import write_learnable_set

@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """(raw folder, converted HDF5 path) of the learnable synthetic set."""
    root = tmp_path_factory.mktemp("ntu")
    write_learnable_set(root / "raw")
    out = root / "ntu60.h5"
    convert(root / "raw", out, workers=2, progress=False)
    return root / "raw", out


def read_text_bodies(text: str) -> list[dict[int, np.ndarray]]:
    """An independent reading of the layout: per frame, {body ID: x y z of its 25 joints}."""
    lines = [line.split() for line in text.splitlines()]
    position, frames = 1, []
    for _ in range(int(lines[0][0])):
        count = int(lines[position][0])
        position += 1
        bodies = {}
        for _ in range(count):
            body_id = int(lines[position][0])
            joints = np.array([[float(v) for v in lines[position + 2 + j][:3]] for j in range(25)])
            bodies[body_id] = joints
            position += 2 + 25
        frames.append(bodies)
    return frames


# Converter ---------------------------------------------------------------------------------------


def test_hdf5_matches_the_text_value_by_value(learnable):
    raw, out = learnable
    with h5py.File(out, "r") as h5:
        assert h5.attrs["complete"] and h5.attrs["format"] == "ntu-rgbd-skeletons"
        names = [n.decode() for n in h5["name"][:]]
        assert names == sorted(p.stem for p in raw.glob("*.skeleton"))
        assert h5["skeletons"].dtype == np.float32 and h5["skeletons"].shape[1:] == (2, 25, 3)
        manifest = json.loads(h5.attrs["manifest"])
        assert manifest["counts"]["samples"] == 80 and manifest["skipped"] == []
        assert manifest["converter_version"] == ntu_hdf5.CONVERTER_VERSION
        for row, name in enumerate(names):
            frames = read_text_bodies((raw / f"{name}.skeleton").read_text())
            offset, length = int(h5["offset"][row]), int(h5["length"][row])
            stored = h5["skeletons"][offset:offset + length]
            assert length == len(frames)
            ids = list(frames[0])
            # Slots in order of motion (variance over time), one body ID per slot for the whole sequence.
            motion = {i: np.stack([f[i] for f in frames]).var(axis=0).sum() for i in ids}
            ids.sort(key=lambda i: -motion[i])
            for slot, body_id in enumerate(ids):
                expected = np.stack([f[body_id] for f in frames]).astype(np.float32)
                np.testing.assert_array_equal(stored[:, slot], expected)
            if len(ids) == 1:
                assert not stored[:, 1].any()  # a missing second person is zeros
            setup, camera, performer, replication, action = (int(name[i:i + 3]) for i in (1, 5, 9, 13, 17))
            assert (h5["setup"][row], h5["camera"][row], h5["performer"][row], h5["replication"][row],
                    h5["action"][row], h5["label"][row]) == (setup, camera, performer, replication, action, action - 1)
            assert h5["bodies"][row] == (2 if action == 50 else 1)
        assert h5["offset"][-1] + h5["length"][-1] == h5["skeletons"].shape[0]


def test_body_selection_keeps_the_two_most_active_ids_and_drops_noise_and_empty_frames():
    rng = np.random.default_rng(1)
    active = rng.normal(0, 0.3, (20, 25, 3))            # ID 7: moves a lot, frames 0-19
    calm = 1 + rng.normal(0, 0.01, (20, 25, 3))         # ID 8: barely moves, frames 0-19
    noise = 5 + rng.normal(0, 2.0, (3, 25, 3))          # ID 9: a spurious detection in 3 frames, moves most
    frames = [[] for _ in range(2)]                     # two frames with nobody: dropped
    frames += [[(8, calm[t]), (7, active[t])] + ([(9, noise[t])] if t < 3 else []) for t in range(20)]
    frames += [[(9, noise[0])]]                         # only the noise ID: dropped with it
    array = ntu_skeleton.skeleton_array(skeleton_text(frames))
    assert array.shape == (20, 2, 25, 3)
    np.testing.assert_allclose(array[:, 0], active, atol=1e-6)   # most active first
    np.testing.assert_allclose(array[:, 1], calm, atol=1e-6)


def test_zip_and_folder_give_identical_files(learnable, tmp_path):
    raw, folder_out = learnable
    archive = tmp_path / "nturgbd_skeletons_s001_to_s017.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("nturgb+d_skeletons/", "")
        for path in sorted(raw.glob("*.skeleton"), reverse=True):  # another member order
            zf.write(path, f"nturgb+d_skeletons/{path.name}")
        zf.writestr("nturgb+d_skeletons/README.txt", "not a skeleton")
    zip_out = tmp_path / "from_zip.h5"
    convert(archive, zip_out, workers=1, progress=False, compression="gzip")
    with h5py.File(folder_out, "r") as a, h5py.File(zip_out, "r") as b:
        assert set(a) == set(b) and a["skeletons"].chunks is None and b["skeletons"].compression == "gzip"
        for key in a:
            np.testing.assert_array_equal(a[key][:], b[key][:])
    # The loader reads the contiguous file through np.memmap and the gzip one through h5py: same batches.
    batches = []
    for path in (folder_out, zip_out):
        datamodule = NTUDataModule(str(path), split="cross_view", batch_size=16, num_workers=0, test_samplings=2)
        datamodule.setup("test")
        batches.append(list(datamodule.test_dataloader()))
    for a, b in zip(*batches):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


BAD_FILES = {
    "S001C001P001R001A001": ("truncated", lambda good: good[:len(good) // 2]),
    "S001C001P001R001A002": ("wrong body count", lambda good: good.replace("\n1\n", "\n9\n", 1)),
    "S001C001P001R001A003": ("wrong joint count", lambda good: good.replace("\n25\n", "\n24\n", 1)),
    "S001C001P001R001A004": ("non-numeric field", lambda good: good.replace("250.1", "abc", 1)),
    "S001C001P001R001A005": ("empty file", lambda good: ""),
    "S001C001P001R001A006": ("no skeleton", lambda good: "3\n0\n0\n0\n"),
    "S001C001P001R001A007": ("trailing data", lambda good: good + "1\n"),
    "S001C001P001R001A008": ("wrong field count", lambda good: good.replace(" 0.9 2\n", " 0.9\n", 1)),
    "not_an_ntu_name": ("unknown file name", lambda good: good),
}


def test_malformed_files_are_skipped_counted_and_reported(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = sample_text(1, 12, 1, 1)
    for name, (_, corrupt) in BAD_FILES.items():
        (raw / f"{name}.skeleton").write_text(corrupt(good))
    for action in (9, 10):
        (raw / f"{sample_name(1, 1, 1, 1, action)}.skeleton").write_text(sample_text(action, 25, 1, 1))
    exclusions = tmp_path / "missing_skeletons.txt"
    exclusions.write_text("# NTU's list\nS001C001P001R001A010\n")
    out = tmp_path / "out.h5"
    manifest = convert(raw, out, workers=2, exclude=exclusions, progress=False)
    reasons = {entry["name"]: entry["reason"] for entry in manifest["skipped"]}
    assert reasons == {**{name: reason for name, (reason, _) in BAD_FILES.items()}, "S001C001P001R001A010": "excluded"}
    assert manifest["counts"]["samples"] == 1 and manifest["counts"]["truncated"] == 1
    with h5py.File(out, "r") as h5:
        assert [n.decode() for n in h5["name"][:]] == ["S001C001P001R001A009"]
        assert json.loads(h5.attrs["manifest"])["skipped"] == manifest["skipped"]
    table = summary_table(manifest, out)
    assert "converted" in table and all(f"skipped: {reason}" in table for reason, _ in BAD_FILES.values())


@pytest.mark.parametrize("case", ["missing", "empty", "no-args", "bad-key"])
def test_converter_command_line_errors_are_one_line(tmp_path, case):
    args = {"missing": [f"raw={tmp_path / 'nowhere'}"], "empty": [f"raw={tmp_path}"], "no-args": [],
            "bad-key": [f"raw={tmp_path}", "output=x.h5"]}[case]
    result = run_script("prepare_ntu.py", args, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines() if case != "no-args" else result.stdout.strip().splitlines()
    if case in ("missing", "empty"):
        assert len(lines) == 1 and lines[0].startswith("error: raw:") and ".skeleton files" in lines[0]
        assert ("does not exist" if case == "missing" else "no .skeleton files") in lines[0]
    elif case == "bad-key":
        assert lines == [lines[0]] and "unknown argument 'output=x.h5'" in lines[0]
    else:
        assert lines[0].startswith("usage: python prepare_ntu.py raw=PATH")


def test_converter_command_writes_the_file_and_the_summary(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for action in (1, 2):
        (raw / f"{sample_name(1, 2, 1, 1, action)}.skeleton").write_text(sample_text(action, 30, 1, 2))
    (raw / "S001C002P001R001A003.skeleton").write_text("")
    out = tmp_path / "sub" / "ntu.h5"
    result = run_script("prepare_ntu.py", [f"raw={raw}", f"out={out}", "workers=2", "dtype=float16",
                                           "progress=false"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "converted" in result.stdout and "skipped: empty file" in result.stdout
    with h5py.File(out, "r") as h5:
        assert h5["skeletons"].dtype == np.float16 and len(h5["name"]) == 2
    again = run_script("prepare_ntu.py", [f"raw={raw}", f"out={out}"], timeout=120)
    assert again.returncode == 2 and "overwrite=true" in again.stderr


def test_an_interrupted_conversion_leaves_nothing_and_the_next_run_starts_clean(learnable, tmp_path, monkeypatch):
    raw, _ = learnable
    out = tmp_path / "ntu.h5"
    real = ntu_convert.convert_file

    def interrupted(item, *args):
        if item.name.endswith("A004"):
            raise KeyboardInterrupt  # Ctrl-C in the middle of the conversion
        return real(item, *args)

    monkeypatch.setattr(ntu_convert, "convert_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(raw, out, workers=1, progress=False)
    assert not out.exists() and not partial_path(out).exists()
    monkeypatch.setattr(ntu_convert, "convert_file", real)
    # A kill -9 leaves the partial file behind: it never looks complete, and the next run replaces it.
    partial_path(out).write_bytes(b"half an HDF5 file")
    convert(raw, out, workers=1, progress=False)
    assert out.exists() and not partial_path(out).exists()
    with h5py.File(out, "r") as h5:
        assert h5.attrs["complete"] and len(h5["name"]) == 80


def test_an_incomplete_or_missing_file_is_one_line_naming_the_command(tmp_path):
    missing = tmp_path / "ntu" / "ntu60.h5"
    with pytest.raises(DownloadError, match=r"expected the HDF5 file .*ntu60\.h5; make it with `python prepare_ntu\.py "
                                            r"raw=.* out=.*ntu60\.h5`"):
        NTUDataModule(str(missing)).prepare_data()
    missing.parent.mkdir()
    with h5py.File(missing, "w") as h5:
        h5.attrs["format"], h5.attrs["complete"] = "ntu-rgbd-skeletons", False
    with pytest.raises(DownloadError, match="not a complete NTU skeleton file"):
        NTUDataModule(str(missing)).setup("fit")


def test_train_py_without_the_file_says_where_and_how(tmp_path):
    cfg = compose_train(tmp_path / "run", ["task=ntu_cs", f"paths.data_dir={tmp_path}", "trainer=cpu"])
    with pytest.raises(UserError) as error:  # train.py prints it as one line: "error: ..."
        train(cfg)
    message = str(error.value)
    assert "\n" not in message and f"{tmp_path}/ntu/ntu60.h5" in message
    assert f"python prepare_ntu.py raw=<folder of .skeleton files or nturgbd_skeletons_s001_to_s017.zip> " \
           f"out={tmp_path}/ntu/ntu60.h5" in message


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
