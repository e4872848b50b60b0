"""NTU RGB+D's converter, raw .skeleton files -> HDF5 (datamodules/ntu_convert.py, ntu_hdf5.py): the
exact layout value by value, body selection, zip vs folder, bad files, the command line,
interruption, and the one-line messages when the file is missing. The DataModule: tests/test_ntu.py."""
from __future__ import annotations

import json
import zipfile

import h5py
import numpy as np
import pytest
import torch

from datamodules import ntu_convert, ntu_hdf5, ntu_skeleton
from datamodules.download import DownloadError
from datamodules.ntu import NTUDataModule
from datamodules.ntu_convert import convert, partial_path, summary_table
from datamodules.ntu_synthetic import sample_name, sample_text, skeleton_text
from lightning_modules.run import UserError, train
from tests.conftest import compose_train, run_script
from tests.ntu_files import converted_learnable_set


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """(raw folder, converted HDF5 path) of the learnable synthetic set."""
    return converted_learnable_set(tmp_path_factory.mktemp("ntu"))


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
