"""task=uea: the .ts reader, the archive and pooled (coRNN/LEM EigenWorms) splits, normalisation,
variable lengths, the bundled datasets of the aeon wheel (real data, no network), the EigenWorms
pipeline on small .ts files served by a local HTTP mirror, and training through train.py's driver."""
from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest
import torch

from datamodules.download import DataError, DownloadError, md5sum
from datamodules.ts_format import read_ts
from datamodules.uea import UEADataModule, bundled_folder, pooled_split
from lightning_modules.run import train
from tests.conftest import compose_train
from tests.mnist_files import serve_directory

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: the connection is refused at once
QUICK_TRAINER = ["trainer=cpu", "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0"]
needs_bundled = pytest.mark.skipif(bundled_folder() is None, reason="the aeon wheel (pip install .[uea]) is not installed")


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def write_ts(path, cases, labels, class_labels, name="Toy", equal_length=None, comment=True):
    """A .ts file: cases a list of (T_i, C) arrays (NaN written as ?), one label string per case."""
    channels = cases[0].shape[1]
    equal = len({len(c) for c in cases}) == 1 if equal_length is None else equal_length
    lines = ["#A toy problem written by the tests"] if comment else []
    lines += [f"@problemName {name}", "@timeStamps false", f"@missing {'true' if any(np.isnan(c).any() for c in cases) else 'false'}",
              f"@univariate {'true' if channels == 1 else 'false'}", f"@dimensions {channels}",
              f"@equalLength {'true' if equal else 'false'}"]
    if equal:
        lines.append(f"@seriesLength {len(cases[0])}")
    lines += [f"@classLabel true {' '.join(class_labels)}", "@data"]
    for case, label in zip(cases, labels):
        dims = [",".join("?" if np.isnan(v) else repr(float(v)) for v in case[:, d]) for d in range(channels)]
        lines.append(":".join(dims) + f":{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def toy_worms(count, steps, seed, classes=5, channels=6):
    """Learnable series: class k is a sinusoid of frequency k+1 on every channel, plus noise and an offset."""
    rng = np.random.default_rng(seed)
    labels = [str(k % classes + 1) for k in range(count)]
    time = np.arange(steps)[:, None]
    cases = [3.0 + np.sin(2 * np.pi * (int(label)) * time / steps + rng.uniform(0, 0.3, channels))
             + 0.1 * rng.standard_normal((steps, channels)) for label in labels]
    return cases, labels


# The .ts reader --------------------------------------------------------------------------------

def test_read_ts_variable_lengths_missing_values_and_labels(tmp_path):
    cases = [np.array([[1.0, 10.0], [2.0, np.nan], [3.0, 30.0]]), np.array([[4.0, 40.0]])]
    path = write_ts(tmp_path / "Toy_TRAIN.ts", cases, ["b", "a"], ["a", "b"])
    data = read_ts(path)
    assert data.name == "Toy" and data.channels == 2 and data.class_labels == ["a", "b"] and data.labels == ["b", "a"]
    assert data.lengths.tolist() == [3, 1]
    np.testing.assert_array_equal(data.series[0], cases[0])  # NaN where ? was written
    np.testing.assert_array_equal(data.series[1], cases[1])


@pytest.mark.parametrize("body, message", [
    ("@problemName X\n@classLabel true a b\n@data\n1,2:3,4:a\n1,2:3:b\n", r":5: dimensions of different lengths"),
    ("@problemName X\n@classLabel true a b\n@data\n1,2:3,4:a\n1,2:b\n", r":5: 1 dimensions, but earlier cases have 2"),
    ("@problemName X\n@classLabel true a b\n@data\n1,x,3:c\n", r":4: class label 'c' is not one of @classLabel a b"),
    ("@problemName X\n@classLabel true a b\n@data\n1,x,3:a\n", r":4: dimension 1 holds 'x', not a number or \?"),
    ("@problemName X\n@classLabel true a b\n", r"no @data line"),
    ("@problemName X\n@timeStamps true\n@classLabel true a\n@data\n", r":2: @timeStamps true is not supported"),
    ("@problemName X\n@targetLabel true\n@data\n1,2:0.5\n", r":2: a regression file"),
    ("@problemName X\n@dimensions 3\n@classLabel true a\n@data\n1,2:3,4:a\n", r"@dimensions 3 but the cases have 2"),
    ("1,2,3:a\n", r":1: expected an @ header line"),
])
def test_read_ts_rejects_bad_files_in_one_line_naming_file_and_line(tmp_path, body, message):
    path = tmp_path / "Bad_TRAIN.ts"
    path.write_text(body)
    with pytest.raises(DataError, match=message) as error:
        read_ts(path)
    assert str(path) in one_line(error)


# Splits -----------------------------------------------------------------------------------------

def test_pooled_split_is_scikit_learns_train_test_split_twice():
    model_selection = pytest.importorskip("sklearn.model_selection")
    for count, seeds in [(259, (1234, 1234)), (259, (0, 1)), (30, (7, 8)), (101, (5, 5))]:
        train, val, test = pooled_split(count, (0.3, 0.5), seeds)
        indices = np.arange(count)
        want_train, rest = model_selection.train_test_split(indices, test_size=0.3, random_state=seeds[0])
        want_val, want_test = model_selection.train_test_split(rest, test_size=0.5, random_state=seeds[1])
        for got, want in ((train, want_train), (val, want_val), (test, want_test)):
            np.testing.assert_array_equal(got, want)
    train, val, test = pooled_split(259, (0.3, 0.5), (1234, 1234))
    assert (len(train), len(val), len(test)) == (181, 39, 39)  # EigenWorms: 39 test sequences
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(259))


# Bundled datasets (real data, no network) -------------------------------------------------------

@needs_bundled
def test_bundled_basic_motions_loads_splits_and_normalises_from_the_training_split(tmp_path):
    module = UEADataModule(str(tmp_path), "BasicMotions", val_fraction=0.25, split_seed=3, download=False,
                           input_size=6, output_size=4, seq_len=100)
    module.prepare_data()  # bundled: nothing to fetch, nothing written
    module.setup()
    assert not (tmp_path / "uea").exists()
    assert {name: len(split) for name, split in module.splits.items()} == {"train": 30, "val": 10, "test": 40}
    train_steps = torch.cat(module.splits["train"].series)
    torch.testing.assert_close(train_steps.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(train_steps.std(0, unbiased=False), torch.ones(6), atol=1e-4, rtol=0)
    batch = next(iter(module.val_dataloader()))
    assert batch.inputs.shape == (10, 100, 6) and batch.inputs.dtype == torch.float32 and batch.lengths is None
    assert sorted(set(torch.cat([module.splits[s].labels for s in module.splits]).tolist())) == [0, 1, 2, 3]
    # The hold-out is seeded: the same seed gives the same validation series, another seed others.
    again = UEADataModule(str(tmp_path), "BasicMotions", val_fraction=0.25, split_seed=3)
    again.setup()
    other = UEADataModule(str(tmp_path), "BasicMotions", val_fraction=0.25, split_seed=4)
    other.setup()
    assert torch.equal(torch.stack(again.splits["val"].series), torch.stack(module.splits["val"].series))
    assert not torch.equal(torch.stack(other.splits["val"].series), torch.stack(module.splits["val"].series))


@needs_bundled
def test_bundled_japanese_vowels_batches_carry_each_series_length(tmp_path):
    module = UEADataModule(str(tmp_path), "JapaneseVowels", batch_size=16, input_size=12, output_size=9, seq_len=29)
    module.setup()
    test = module.splits["test"]
    assert len(test) == 370 and min(len(s) for s in test.series) == 7 and max(len(s) for s in test.series) == 29
    batch = next(iter(module.test_dataloader()))
    expected = torch.tensor([len(s) for s in test.series[:16]])
    assert torch.equal(batch.lengths, expected) and batch.inputs.shape == (16, int(expected.max()), 12)
    for row, length in enumerate(expected.tolist()):  # padding is zeros, the series is itself
        assert torch.equal(batch.inputs[row, :length], test.series[row])
        assert batch.inputs[row, length:].abs().sum() == 0


@needs_bundled
def test_sizes_that_do_not_match_the_files_name_the_values_to_set(tmp_path):
    module = UEADataModule(str(tmp_path), "GunPoint", input_size=1, output_size=3, seq_len=150)
    with pytest.raises(DataError, match=r"UEA GunPoint: the files have 1 channels, 2 classes and series of up to 150 "
                                        r"steps, but the config says task.output_size=3; set task.output_size=2") as error:
        module.setup()
    one_line(error)
    with pytest.raises(ValueError, match=r"set task.input_size=1 task.output_size=2 task.seq_len=24$"):
        UEADataModule(str(tmp_path), "ItalyPowerDemand", sizes_required=True)


# EigenWorms from a (local) mirror ---------------------------------------------------------------

@pytest.fixture
def worms_mirror(tmp_path):
    """A local HTTP mirror serving EigenWorms.zip with small files in the archive's format (the real
    recordings are 6 x 17,984 steps; these are 6 x 40): yields (url, md5, requests, train cases, test cases)."""
    served = tmp_path / "mirror"
    served.mkdir()
    train_cases, train_labels = toy_worms(21, 40, seed=0)
    test_cases, test_labels = toy_worms(9, 40, seed=1)
    labels = ["1", "2", "3", "4", "5"]
    write_ts(tmp_path / "EigenWorms_TRAIN.ts", train_cases, train_labels, labels, name="EigenWorms")
    write_ts(tmp_path / "EigenWorms_TEST.ts", test_cases, test_labels, labels, name="EigenWorms")
    with zipfile.ZipFile(served / "EigenWorms.zip", "w", zipfile.ZIP_DEFLATED) as bundle:
        for part in ("TRAIN", "TEST"):  # inside a folder, as some of the archive's zips are
            bundle.write(tmp_path / f"EigenWorms_{part}.ts", f"EigenWorms/EigenWorms_{part}.ts")
        bundle.writestr("EigenWorms/EigenWorms_TRAIN.arff", "not read")
    requests: list[str] = []
    with serve_directory(served, requests) as url:
        yield url, md5sum(served / "EigenWorms.zip"), requests, (train_cases, train_labels), (test_cases, test_labels)


def test_eigenworms_downloads_extracts_and_splits_as_the_lem_code(worms_mirror, tmp_path):
    url, md5, requests, (train_cases, train_labels), (test_cases, test_labels) = worms_mirror
    data_dir = tmp_path / "data"
    module = UEADataModule(str(data_dir), "EigenWorms", split="pooled", mirrors=[UNREACHABLE, url], md5=md5,
                           input_size=6, output_size=5, seq_len=40)
    module.prepare_data()
    module.setup()
    folder = data_dir / "uea" / "EigenWorms"
    assert sorted(p.name for p in folder.iterdir()) == ["EigenWorms_TEST.ts", "EigenWorms_TRAIN.ts"]  # no .part
    assert sorted(p.name for p in (data_dir / "uea").iterdir()) == ["EigenWorms", "EigenWorms.zip"]
    assert requests == ["/EigenWorms.zip"]
    # 30 pooled series (train file first): 21 / 4 / 5, the indices of train_test_split(0.3, 1234) twice.
    pooled = train_cases + test_cases
    labels = [int(label) - 1 for label in train_labels + test_labels]
    train, val, test = pooled_split(30, (0.3, 0.5), (1234, 1234))
    assert (len(train), len(val), len(test)) == (21, 4, 5)
    steps = np.concatenate([pooled[i] for i in train])
    mean, std = steps.mean(0), steps.std(0)
    for name, indices in (("train", train), ("val", val), ("test", test)):
        split = module.splits[name]
        assert split.labels.tolist() == [labels[i] for i in indices]
        for series, i in zip(split.series, indices):
            np.testing.assert_allclose(series.numpy(), (pooled[i] - mean) / std, rtol=1e-5, atol=1e-5)
    # A second run finds the extracted files: no request.
    again = UEADataModule(str(data_dir), "EigenWorms", split="pooled", mirrors=[url], md5=md5)
    again.prepare_data()
    again.setup()
    assert requests == ["/EigenWorms.zip"]


def test_eigenworms_offline_names_the_files_and_the_folder_in_one_line(tmp_path):
    module = UEADataModule(str(tmp_path), "EigenWorms", mirrors=[UNREACHABLE])
    with pytest.raises(DownloadError) as error:
        module.prepare_data()
    message = one_line(error)
    assert message.startswith("cannot download the UEA EigenWorms files EigenWorms.zip (missing)")
    assert f"{UNREACHABLE}/EigenWorms.zip" in message
    assert message.endswith(f"with no network, put EigenWorms_TRAIN.ts and EigenWorms_TEST.ts (or EigenWorms.zip) "
                            f"in {tmp_path / 'uea' / 'EigenWorms'}")
    with pytest.raises(DataError, match="are not in .* and download=false; put them") as error:
        UEADataModule(str(tmp_path), "EigenWorms", download=False).prepare_data()
    one_line(error)


def test_a_corrupt_zip_is_refused_in_one_line(tmp_path):
    (tmp_path / "uea").mkdir()
    archive = tmp_path / "uea" / "EigenWorms.zip"
    archive.write_bytes(b"PK\x03\x04 this is not a zip")
    module = UEADataModule(str(tmp_path), "EigenWorms", mirrors=[UNREACHABLE])
    with pytest.raises(DataError, match="EigenWorms.zip: not a valid zip .* delete it to fetch it again") as error:
        module.prepare_data()
    one_line(error)
    with zipfile.ZipFile(archive, "w") as bundle:  # a valid zip without the two files
        bundle.writestr("Other_TRAIN.ts", "x")
    with pytest.raises(DataError, match=r"no EigenWorms_TRAIN.ts or EigenWorms_TEST.ts inside \(it holds Other_TRAIN.ts\)"):
        module.prepare_data()


# Through train.py's driver ----------------------------------------------------------------------

def test_eigenworms_pipeline_trains_through_the_driver(worms_mirror, tmp_path):
    url, md5, _, _, _ = worms_mirror
    overrides = ["task=uea", "task.dataset=EigenWorms", "task.seq_len=40", "task.datamodule.split=pooled",
                 f"task.datamodule.mirrors=[{url}]", f"task.datamodule.md5={md5}", f"paths.data_dir={tmp_path / 'data'}",
                 "model=unicornn", "model.hidden_size=8", "model.num_layers=1", "model.layer.dt=0.5",
                 "task.max_epochs=2", "task.datamodule.batch_size=8", *QUICK_TRAINER]
    train(compose_train(tmp_path / "run", overrides))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished" and math.isfinite(results["test/loss"])


@needs_bundled
def test_basic_motions_real_data_loss_falls(tmp_path):
    """Real data end to end in the default suite: a tiny UnICORNN on BasicMotions (40 series, 4 classes),
    10 epochs of 4 steps; the held-out loss falls well below chance's log(4) = 1.386."""
    overrides = ["task=uea", "task.dataset=BasicMotions", "model=unicornn", "model.hidden_size=16",
                 "model.num_layers=1", "model.layer.dt=0.5", "model.layer.alpha=0", "optimizer.lr=0.01",
                 "task.max_epochs=10", "task.datamodule.batch_size=8", *QUICK_TRAINER]
    train(compose_train(tmp_path / "run", overrides))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished"
    assert results["val/loss"] < 0.7 * math.log(4) and results["test/loss"] < 0.7 * math.log(4), results
    assert results["test/acc"] >= 0.6, results  # chance: 0.25


@pytest.mark.slow
@needs_bundled
@pytest.mark.parametrize("experiment, at_least", [("uea_japanesevowels_indrnn", 0.924), ("uea_japanesevowels_lem", 0.924),
                                                  ("uea_japanesevowels_unicornn", 0.924),
                                                  ("uea_basicmotions_lem", 0.9), ("uea_basicmotions_indrnn", 0.9)])
def test_bundled_datasets_train_to_the_archive_baselines(tmp_path, experiment, at_least):
    """The CPU-sized experiments reach the archive paper's 1-NN Euclidean baseline (JapaneseVowels 92.4%)
    or 90% (BasicMotions, whose baselines are 67.6% Euclidean, 97.5% DTW_D) on the archive's test split."""
    train(compose_train(tmp_path / "run", [f"experiment={experiment}", *QUICK_TRAINER]))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished" and results["test/acc"] >= at_least, results
