"""Every NTU RGB+D data fault is one line naming the file, what is wrong and the fix (issue 19, section 4).

Each case writes a tiny NTU HDF5 file with the real converter, damages it as a user's disk or copy
would, and goes through the real path: the DataModule's setup and loaders (DataLoader workers
included), the converter, the training driver; a few cases run the entry points as subprocesses,
where the process boundary (what reaches stderr) is the point. The other data sets' faults:
tests/test_data_faults.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from datamodules.download import DataError
from datamodules.ntu import NTUDataModule
from datamodules.ntu_convert import ConvertError, convert, lock_path, partial_path
from datamodules.ntu_hdf5 import write_samples
from datamodules.ntu_synthetic import sample_name, sample_text
from lightning_modules.run import UserError, train
from tests.conftest import ROOT, compose_train, run_script
from tests.ntu_files import converted_learnable_set


def one_line(error) -> str:
    message = str(error.value if hasattr(error, "value") else error)
    assert message and "\n" not in message, message
    return message


# NTU RGB+D ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ntu(tmp_path_factory):
    """(raw folder, a converted HDF5 file) of 40 synthetic samples; tests damage copies of the file."""
    return converted_learnable_set(tmp_path_factory.mktemp("ntu"), replications=(1,), workers=1)


@pytest.fixture
def ntu_copy(ntu, tmp_path):
    """A fresh copy of the converted file, to damage."""
    path = tmp_path / "ntu60.h5"
    shutil.copy(ntu[1], path)
    return path


def ntu_module(path, **kwargs) -> NTUDataModule:
    return NTUDataModule(str(path), **{"batch_size": 8, "num_workers": 0, "test_samplings": 2, **kwargs})


def sample_bytes(path: Path, row: int) -> tuple[int, int, str]:
    """(byte offset in the file, byte count, name) of sample ``row``'s frames in a contiguous file."""
    with h5py.File(path, "r") as h5:
        skeletons = h5["skeletons"]
        frame = int(np.prod(skeletons.shape[1:])) * skeletons.dtype.itemsize
        offset, length = int(h5["offset"][row]), int(h5["length"][row])
        return skeletons.id.get_offset() + offset * frame, length * frame, h5["name"][row].decode()


def overwrite(path: Path, position: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(position)
        file.write(data)


def quick_rows(path: Path) -> set[int]:
    """The rows whose checksum the quick check reads (the datamodule's rule: 16 spread over the file)."""
    from datamodules.ntu_hdf5 import QUICK_CHECKSUMS
    with h5py.File(path, "r") as h5:
        count = len(h5["name"])
    return set(np.linspace(0, count - 1, min(QUICK_CHECKSUMS, count)).round().astype(int).tolist())


def unchecked_training_row(path: Path) -> int:
    """A row of the cross-subject training split (validation held out) that the quick check does not read."""
    datamodule = ntu_module(path)
    datamodule.setup("fit")
    checked = quick_rows(path)
    return next(int(row) for row in datamodule.splits["train"].rows if int(row) not in checked)


def test_truncated_hdf5_is_one_line_naming_the_file_and_the_fix(ntu_copy):
    size = ntu_copy.stat().st_size
    with open(ntu_copy, "r+b") as file:
        file.truncate(size // 2)
    with pytest.raises(DataError) as error:
        ntu_module(ntu_copy).setup("fit")
    message = one_line(error)
    assert str(ntu_copy) in message and "truncated" in message and "prepare_ntu.py" in message


def test_training_on_a_truncated_file_through_the_driver_is_one_line(ntu_copy, tmp_path):
    with open(ntu_copy, "r+b") as file:
        file.truncate(ntu_copy.stat().st_size // 2)
    cfg = compose_train(tmp_path / "run", ["task=ntu_cs", f"task.datamodule.path={ntu_copy}", "trainer=cpu",
                                            "task.datamodule.num_workers=0"])
    with pytest.raises(UserError) as error:  # train.py prints it as "error: ..." and exits 1
        train(cfg)
    assert str(ntu_copy) in one_line(error) and "prepare_ntu.py" in str(error.value)


def test_a_partial_file_names_the_file_the_conversion_writes(ntu_copy):
    partial = partial_path(ntu_copy)
    ntu_copy.rename(partial)
    with pytest.raises(DataError) as error:
        ntu_module(partial).setup("fit")
    message = one_line(error)
    assert "temporary file of a prepare_ntu.py conversion" in message
    assert f"task.datamodule.path={ntu_copy}" in message


def test_a_missing_label_dataset_is_one_line(ntu_copy):
    with h5py.File(ntu_copy, "r+") as h5:
        del h5["label"]
    with pytest.raises(DataError) as error:
        ntu_module(ntu_copy).setup("fit")
    message = one_line(error)
    assert str(ntu_copy) in message and "'label'" in message and "overwrite=true" in message


def test_a_label_of_200_is_one_line_naming_the_sample(ntu_copy):
    with h5py.File(ntu_copy, "r+") as h5:
        h5["label"][3] = 200
        name = h5["name"][3].decode()
    with pytest.raises(DataError) as error:
        ntu_module(ntu_copy).setup("fit")
    message = one_line(error)
    assert str(ntu_copy) in message and f"sample {name} (row 3) has label 200" in message


def test_converting_a_folder_where_every_file_is_bad_fails_and_writes_nothing(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for action in (1, 2, 3):
        text = sample_text(action, 20, 1, 1)
        (raw / f"{sample_name(1, 1, 1, 1, action)}.skeleton").write_text(text[:len(text) // 3])  # truncated
    out = tmp_path / "ntu.h5"
    with pytest.raises(ConvertError) as error:
        convert(raw, out, workers=1, progress=False)
    message = one_line(error)
    assert "none of the 3 .skeleton files" in message and "3 truncated" in message and str(out) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no file, no partial, no lock


def test_prepare_ntu_on_only_bad_files_exits_non_zero_with_one_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / f"{sample_name(1, 1, 1, 1, 1)}.skeleton").write_text("")
    (raw / f"{sample_name(1, 1, 1, 1, 2)}.skeleton").write_text("3\n1\nnot a body\n")
    out = tmp_path / "ntu.h5"
    result = run_script("prepare_ntu.py", [f"raw={raw}", f"out={out}", "workers=1", "progress=false"], timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: raw: none of the 2 .skeleton files"), result.stderr
    assert not out.exists()


def test_a_file_without_samples_is_one_line(tmp_path):
    """What prepare_ntu.py wrote before it refused inputs without a single good file: 0 samples."""
    empty = tmp_path / "empty.h5"
    samples, frames = write_samples(empty, iter(()), 0)
    with h5py.File(empty, "a") as h5:
        h5.attrs["manifest"] = json.dumps({"counts": {"samples": 0, "frames": frames}, "content": samples.content()})
        h5.attrs["complete"] = True
    with pytest.raises(DataError) as error:
        ntu_module(empty).setup("fit")
    message = one_line(error)
    assert f"{empty} gives 0 training and 0 test samples (validation 0) of its 0" in message
    assert "prepare_ntu.py" in message


def test_nonfinite_bytes_are_caught_by_the_batch_check_in_workers_and_by_the_full_verification(ntu_copy):
    row = unchecked_training_row(ntu_copy)
    position, count, name = sample_bytes(ntu_copy, row)
    overwrite(ntu_copy, position, b"\xff" * count)  # 0xFF bytes: NaN in float32
    with pytest.raises(DataError) as error:
        ntu_module(ntu_copy, verify="full").setup("fit")
    assert f"sample {name} (row {row}) differs from what prepare_ntu.py wrote" in one_line(error)
    datamodule = ntu_module(ntu_copy, num_workers=1, batch_size=64)  # quick: this sample is not one it reads
    datamodule.setup("fit")
    with pytest.raises(DataError) as error:  # raised in a DataLoader worker, re-raised here by torch
        for _ in datamodule.train_dataloader():
            pass
    message = one_line(error)
    assert message.startswith(f"{ntu_copy}: sample {name} (row {row}) has the coordinate nan, not a number")
    assert "verify=full" in message and "prepare_ntu.py" in message


def test_coordinates_of_a_million_metres_are_refused_when_read(ntu_copy):
    row = unchecked_training_row(ntu_copy)
    with h5py.File(ntu_copy, "r+") as h5:
        offset, length = int(h5["offset"][row]), int(h5["length"][row])
        h5["skeletons"][offset:offset + length, 0, 3, 0] = 1e6  # one joint's x in every frame
        name = h5["name"][row].decode()
    datamodule = ntu_module(ntu_copy, batch_size=64)
    datamodule.setup("fit")
    with pytest.raises(DataError) as error:
        for _ in datamodule.train_dataloader():
            pass
    assert f"sample {name} (row {row}) has the coordinate 1e+06, beyond 10 m" in one_line(error)


def test_the_quick_check_compares_checksums_and_the_recorded_range(ntu_copy, tmp_path):
    first = min(quick_rows(ntu_copy))
    position, count, name = sample_bytes(ntu_copy, first)
    pristine = ntu_copy.read_bytes()
    overwrite(ntu_copy, position + 4, np.float32(0.5).tobytes())  # a plausible value: only the checksum tells
    with pytest.raises(DataError) as error:
        ntu_module(ntu_copy).setup("fit")
    assert f"sample {name} (row {first}) differs from what prepare_ntu.py wrote" in one_line(error)
    # A file whose converter recorded coordinates beyond the physical range (not metres): refused at setup.
    scaled = tmp_path / "millimetres.h5"
    ntu_copy.write_bytes(pristine)
    with h5py.File(ntu_copy, "r") as h5:
        names = [n.decode() for n in h5["name"][:]]
        arrays = [h5["skeletons"][o:o + n] * 1000 for o, n in zip(h5["offset"][:], h5["length"][:])]
        manifest = json.loads(h5.attrs["manifest"])
    samples, frames = write_samples(scaled, ((n, a, "", "") for n, a in zip(names, arrays)), len(names))
    with h5py.File(scaled, "a") as h5:
        manifest.update(content=samples.content(), counts={**manifest["counts"], "frames": frames})
        h5.attrs["manifest"], h5.attrs["complete"] = json.dumps(manifest), True
    with pytest.raises(DataError) as error:
        ntu_module(scaled).setup("fit")
    assert "beyond +-10 m: not NTU skeletons in metres" in one_line(error)


def test_a_file_from_the_previous_converter_still_loads_with_a_warning(ntu_copy, caplog):
    with h5py.File(ntu_copy, "r+") as h5:  # version 1: no checksums, no content record
        del h5["checksum"]
        manifest = json.loads(h5.attrs["manifest"])
        del manifest["content"]
        h5.attrs["manifest"], h5.attrs["converter_version"] = json.dumps(manifest), 1
    datamodule = ntu_module(ntu_copy)
    with caplog.at_level("WARNING", logger="datamodules.ntu_hdf5"):
        datamodule.setup("fit")
    assert "no checksums" in caplog.text and "overwrite=true" in caplog.text
    assert next(iter(datamodule.train_dataloader())).inputs.shape == (8, 20, 150)


def test_the_converter_records_checksums_and_ranges_and_skips_impossible_coordinates(ntu, tmp_path):
    _, out = ntu
    with h5py.File(out, "r") as h5:
        manifest = json.loads(h5.attrs["manifest"])
        checksums = h5["checksum"][:]
        frames = h5["skeletons"][:]
        for row in (0, len(checksums) - 1):
            offset, length = int(h5["offset"][row]), int(h5["length"][row])
            assert zlib.crc32(frames[offset:offset + length].tobytes()) == checksums[row]
    content = manifest["content"]
    assert content["checksum_of_checksums"] == zlib.crc32(checksums.astype("<u4").tobytes())
    assert content["min"] == float(frames.min()) and content["max"] == float(frames.max())
    raw = tmp_path / "raw"
    raw.mkdir()
    for action in (1, 2):
        (raw / f"{sample_name(1, 1, 1, 1, action)}.skeleton").write_text(sample_text(action, 20, 1, 1))
    text = sample_text(3, 20, 1, 1).splitlines()
    text[4] = "1000000.0 " + text[4].split(" ", 1)[1]  # the first joint's x of the first frame
    (raw / f"{sample_name(1, 1, 1, 1, 3)}.skeleton").write_text("\n".join(text) + "\n")
    manifest = convert(raw, tmp_path / "out.h5", workers=1, progress=False)
    assert manifest["counts"]["samples"] == 2 and manifest["counts"]["out of range"] == 1
    assert manifest["skipped"][0]["detail"] == "a coordinate of 1e+06 m (beyond 10 m)"


@pytest.mark.slow  # 5-25 s (loaded): make test-slow, which CI runs too
def test_a_second_converter_on_the_same_output_is_refused_and_leaves_the_first_alone(ntu, tmp_path):
    raw, _ = ntu
    out = tmp_path / "ntu.h5"
    # The first converter: another process, holding the lock while its partial file grows.
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from storage.lock import FileLock; "
                               f"FileLock({str(lock_path(out))!r}, purpose='converting').acquire(); print('held', "
                               "flush=True); sys.stdin.read()"], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        partial_path(out).write_bytes(b"the first converter's frames")
        with pytest.raises(ConvertError) as error:
            convert(raw, out, workers=1, progress=False)
        message = one_line(error)
        assert f"another converter is writing {out}" in message and f"process {holder.pid}" in message
        assert partial_path(out).read_bytes() == b"the first converter's frames" and not out.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # The first is gone (its lock file is left behind, as after a kill -9): the next converter takes over.
    lock_path(out).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "purpose": "converting"}))
    manifest = convert(raw, out, workers=1, progress=False)
    assert manifest["counts"]["samples"] == 40 and not partial_path(out).exists() and not lock_path(out).exists()


def test_an_output_that_cannot_be_written_is_one_line(ntu):
    raw, _ = ntu
    with pytest.raises(ConvertError) as error:
        convert(raw, "/proc/x.h5", workers=1, progress=False)
    assert one_line(error).startswith("out: cannot write in /proc (")


# Through train.py, as a user runs it --------------------------------------------------------------


@pytest.mark.slow
def test_train_py_prints_one_line_for_a_damaged_ntu_file_read_in_workers(ntu, tmp_path):
    path = tmp_path / "ntu60.h5"
    shutil.copy(ntu[1], path)
    row = unchecked_training_row(path)
    position, count, name = sample_bytes(path, row)
    overwrite(path, position, b"\xff" * count)
    result = run_script("train.py", ["task=ntu_cs", f"task.datamodule.path={path}", "task.datamodule.num_workers=2",
                                     "task.datamodule.batch_size=64", "model.hidden_size=8", "trainer=cpu",
                                     f"hydra.run.dir={tmp_path / 'run'}", "callbacks.progress_bar.refresh_rate=0"],
                        timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert errors == [errors[0]] and f"sample {name} (row {row}) has the coordinate nan" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "Original" not in result.stderr


def test_prepare_ntu_into_proc_is_one_line(ntu):
    raw, _ = ntu
    result = run_script("prepare_ntu.py", [f"raw={raw}", "out=/proc/x.h5", "workers=1", "progress=false"], timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "/proc" in result.stderr
