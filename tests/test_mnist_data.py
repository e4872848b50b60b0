"""MNIST data: IDX files, downloading from mirrors, and the sequence DataModule (tiny local files, no internet)."""
from __future__ import annotations

import gzip
import io
import logging
import shutil

import numpy as np
import pytest
import torch

from datamodules import download as download_module
from datamodules.download import DownloadError, download_file, ensure_files, md5sum
from datamodules.idx import read_idx, write_idx
from datamodules.mnist import ALL_FILES, DEFAULT_MIRRORS, MD5, PIXELS, MNISTDataModule, MNISTSequences, make_permutation
from src.batch import SequenceBatch
from tests.mnist_files import serve_directory, write_tiny_mnist

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once
TRAIN, TEST = 200, 100


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A data_dir whose mnist/ folder holds tiny files; returns (data_dir, {file name: md5})."""
    data_dir = tmp_path_factory.mktemp("data")
    return data_dir, write_tiny_mnist(data_dir / "mnist", train=TRAIN, test=TEST)


@pytest.fixture
def module(tiny):
    """Factory: a DataModule on the tiny files (no download), keyword arguments overriding the defaults."""
    data_dir, md5 = tiny
    return lambda **kwargs: MNISTDataModule(**{"data_dir": str(data_dir), "md5": md5, "download": False, **kwargs})


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


# IDX --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    # Names that lie about compression: detection goes by the gzip magic bytes.
    image_path = write_idx(tmp_path / ("images" if compress else "images.gz"), images, gzip=compress)
    label_path = write_idx(tmp_path / "labels", labels, gzip=compress)
    raw = image_path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == compress
    header = gzip.decompress(raw)[:16] if compress else raw[:16]
    assert header == bytes.fromhex("00000803") + (7).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2  # 2051
    np.testing.assert_array_equal(read_idx(image_path), images)
    read_labels = read_idx(label_path)
    assert read_labels.dtype == np.uint8 and read_labels.shape == (7,)  # magic 2049
    np.testing.assert_array_equal(read_labels, labels)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("payload, message", [
    (bytes.fromhex("00001234") + bytes(10), r"not an IDX file \(magic 0x00001234"),
    (bytes.fromhex("00000803") + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(1000),
     "truncated: header says 10x28x28 .* but 1000 bytes follow"),
    (bytes.fromhex("00000801") + (3).to_bytes(4, "big") + bytes(5), "size mismatch: header says 3 .* but 5 bytes"),
    (bytes.fromhex("00000803") + bytes(3), "truncated: the header needs 16 bytes"),
])
def test_idx_rejects_bad_files(tmp_path, compress, payload, message):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    with pytest.raises(ValueError, match=message) as error:
        read_idx(path)
    assert str(path) in one_line(error)


def test_idx_rejects_truncated_gzip_stream(tmp_path):
    path = write_idx(tmp_path / "images.gz", np.zeros((50, 28, 28), np.uint8) + 7, gzip=True)
    path.write_bytes(path.read_bytes()[:-20])  # a download cut short
    with pytest.raises(ValueError, match="truncated gzip stream") as error:
        read_idx(path)
    one_line(error)


# Download ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A served folder with one good file; returns (base_url, folder, content, md5, request log)."""
    folder = tmp_path_factory.mktemp("mirror")
    content = np.random.default_rng(1).bytes(2_500_000)  # three 1 MiB streaming blocks
    (folder / "file.bin").write_bytes(content)
    requests: list[str] = []
    with serve_directory(folder, requests) as url:
        yield url, folder, content, md5sum(folder / "file.bin"), requests


@pytest.fixture(scope="module")
def bad_mirror(tmp_path_factory):
    """A served folder whose file.bin has the wrong bytes (and no other file: anything else is a 404)."""
    folder = tmp_path_factory.mktemp("bad_mirror")
    (folder / "file.bin").write_bytes(b"not the file")
    with serve_directory(folder) as url:
        yield url


def test_download_checks_md5(tmp_path, mirror):
    url, _, content, md5, requests = mirror
    path = download_file("file.bin", [url + "/"], md5, tmp_path / "new" / "folder")
    assert path == tmp_path / "new" / "folder" / "file.bin" and path.read_bytes() == content
    assert "/file.bin" in requests
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]


@pytest.mark.parametrize("first, reason", [("bad", "md5 mismatch"), ("missing", "HTTP 404")])
def test_download_falls_back_to_the_next_mirror(tmp_path, mirror, bad_mirror, caplog, first, reason):
    url, _, content, md5, _ = mirror
    first_url = bad_mirror if first == "bad" else bad_mirror + "/nowhere"
    with caplog.at_level(logging.WARNING, logger="datamodules.download"):
        path = download_file("file.bin", [first_url, url], md5, tmp_path)
    assert path.read_bytes() == content
    assert any(first_url in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_failed_download_leaves_nothing_behind(tmp_path, mirror, bad_mirror):
    _, _, _, md5, _ = mirror
    with pytest.raises(DownloadError) as error:
        download_file("file.bin", [bad_mirror, bad_mirror + "/nowhere", UNREACHABLE], md5, tmp_path)
    message = one_line(error)
    for url in (bad_mirror, bad_mirror + "/nowhere", UNREACHABLE):
        assert f"{url}/file.bin" in message
    assert f"put the file in {tmp_path}" in message
    assert list(tmp_path.iterdir()) == []  # no partial, no corrupt file under any name


def test_download_is_an_atomic_rename_from_the_same_folder(tmp_path, mirror, monkeypatch):
    url, _, content, md5, _ = mirror
    (tmp_path / "file.bin").write_bytes(b"corrupt old copy")  # a wrong md5 is not trusted
    renames = []
    real_replace = download_module.os.replace

    def spy(source, destination):
        renames.append((source, destination))
        assert (tmp_path / "file.bin").read_bytes() == b"corrupt old copy", "final name untouched until the rename"
        real_replace(source, destination)

    monkeypatch.setattr(download_module.os, "replace", spy)
    download_file("file.bin", [url], md5, tmp_path)
    (source, destination), = renames
    assert source.parent == destination.parent == tmp_path and source.name.startswith(".file.bin.part-")
    assert (tmp_path / "file.bin").read_bytes() == content and not source.exists()


def test_existing_corrupt_file_with_no_mirror_says_so(tmp_path, mirror):
    _, _, _, md5, _ = mirror
    (tmp_path / "file.bin").write_bytes(b"corrupt")
    with pytest.raises(DownloadError, match="is corrupt") as error:
        download_file("file.bin", [UNREACHABLE], md5, tmp_path)
    assert error.value.corrupt and "\n" not in str(error.value)


@pytest.mark.parametrize("checked", [True, False])
def test_existing_valid_file_needs_no_network(tmp_path, mirror, checked):
    _, folder, _, md5, requests = mirror
    shutil.copy(folder / "file.bin", tmp_path / "file.bin")
    before = len(requests)
    assert download_file("file.bin", [UNREACHABLE], md5 if checked else None, tmp_path) == tmp_path / "file.bin"
    assert len(requests) == before


def test_file_url_mirror(tmp_path, mirror):
    _, folder, content, md5, _ = mirror
    path = download_file("file.bin", [UNREACHABLE, folder.as_uri()], md5, tmp_path / "out")
    assert path.read_bytes() == content


def test_ensure_files_names_every_missing_or_corrupt_file(tmp_path, mirror):
    _, folder, _, md5, requests = mirror
    shutil.copy(folder / "file.bin", tmp_path / "file.bin")
    (tmp_path / "bad.bin").write_bytes(b"corrupt")
    files = {"file.bin": md5, "bad.bin": md5, "gone.bin": None, "other.bin": md5}
    with pytest.raises(DownloadError) as error:
        ensure_files(tmp_path, files, dataset="Toy", remedy="put them there")
    assert one_line(error) == (f"Toy files not available in {tmp_path}: bad.bin (corrupt: wrong md5), "
                               f"gone.bin (missing), other.bin (missing); put them there")
    assert error.value.filenames == ["bad.bin", "gone.bin", "other.bin"]
    # With mirrors: the first file no mirror serves stops the run, naming it and every file after it.
    before = len(requests)
    with pytest.raises(DownloadError) as error:
        ensure_files(tmp_path, {"file.bin": md5, "bad.bin": md5, "gone.bin": None}, [UNREACHABLE], dataset="Toy")
    message = one_line(error)
    assert message.startswith("cannot download the Toy files bad.bin (corrupt: wrong md5), gone.bin (missing) "
                              f"(tried {UNREACHABLE}/bad.bin")
    assert str(tmp_path) in message and error.value.filenames == ["bad.bin", "gone.bin"]
    assert len(requests) == before, "a good file is never fetched"
    assert ensure_files(tmp_path, {"file.bin": md5}) == {"file.bin": tmp_path / "file.bin"}


# DataModule: files --------------------------------------------------------------------------------

def test_datamodule_downloads_from_a_local_mirror(tmp_path, tiny):
    served, md5 = tiny
    with serve_directory(served / "mnist") as url:
        datamodule = MNISTDataModule(str(tmp_path), mirrors=[UNREACHABLE, url], md5=md5, layout="rows")
        datamodule.prepare_data()
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(ALL_FILES)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert isinstance(batch, SequenceBatch) and batch.lengths is None
    assert batch.inputs.shape == (32, 28, 28) and batch.targets.shape == (32,)


def test_offline_error_is_one_line_naming_files_folder_and_urls(tmp_path):
    mirrors = [UNREACHABLE, UNREACHABLE + "/mnist"]
    datamodule = MNISTDataModule(str(tmp_path), mirrors=mirrors)
    with pytest.raises(DownloadError) as error:
        datamodule.prepare_data()
    message = one_line(error)
    for name in ALL_FILES:
        assert name in message
    assert str(tmp_path / "mnist") in message
    for url in mirrors:
        assert url in message
    assert list((tmp_path / "mnist").iterdir()) == []


def test_download_false_with_missing_files(tmp_path, tiny):
    _, md5 = tiny
    datamodule = MNISTDataModule(str(tmp_path), download=False, md5=md5)
    with pytest.raises(DownloadError, match="download=false") as error:
        datamodule.prepare_data()
    message = one_line(error)
    assert all(name in message for name in ALL_FILES) and str(tmp_path / "mnist") in message
    assert all(url in message for url in DEFAULT_MIRRORS)
    with pytest.raises(DownloadError, match="call prepare_data"):
        datamodule.setup("fit")


def test_official_checksums_and_unchecked_files(tiny):
    data_dir, _ = tiny
    assert MD5["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    # The tiny files are not the official ones ...
    with pytest.raises(DownloadError, match="corrupt"):
        MNISTDataModule(str(data_dir), download=False).prepare_data()
    # ... but None entries switch the check off, so no network is needed.
    MNISTDataModule(str(data_dir), download=False, md5={name: None for name in ALL_FILES}).prepare_data()


# DataModule: sequences ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout, shape", [("pixels", (784, 1)), ("rows", (28, 28))])
def test_shapes(module, layout, shape):
    datamodule = module(layout=layout, batch_size=8)  # val has 10
    assert (datamodule.seq_len, datamodule.input_size) == shape
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()):
        inputs, labels, lengths, *_ = next(iter(loader))
        assert lengths is None and inputs.shape == (8, *shape) and inputs.dtype == torch.float32
        assert labels.shape == (8,) and labels.dtype == torch.int64
    inputs, label = datamodule.splits["test"][3]
    assert inputs.shape == shape and label.shape == () and label.dtype == torch.int64
    torch.testing.assert_close(inputs, next(iter(datamodule.test_dataloader()))[0][3])


def test_rows_are_the_pixels_reshaped(module):
    pixels = next(iter(module(layout="pixels").test_dataloader()))[0]
    rows = next(iter(module(layout="rows").test_dataloader()))[0]
    torch.testing.assert_close(pixels.reshape(rows.shape), rows)


def test_permutation_is_fixed_by_its_seed(module):
    first, second, other = module(permute=True), module(permute=True), module(permute=True, permutation_seed=1)
    assert first.permutation.dtype == torch.int64 and sorted(first.permutation.tolist()) == list(range(PIXELS))
    assert torch.equal(first.permutation, second.permutation)
    assert not torch.equal(first.permutation, other.permutation)
    assert torch.equal(first.permutation, make_permutation(0))
    plain = next(iter(module().test_dataloader()))[0]
    permuted = next(iter(first.test_dataloader()))[0]
    torch.testing.assert_close(permuted, plain[:, first.permutation])  # step t reads pixel permutation[t]


def test_batches_identical_across_workers(module):
    datamodule, with_workers = module(permute=True, batch_size=50), module(permute=True, batch_size=50, num_workers=2)
    loader = with_workers.val_dataloader()
    assert loader.persistent_workers
    for (inputs, labels, *_), (other_inputs, other_labels, *_) in zip(datamodule.test_dataloader(),
                                                               with_workers.test_dataloader(), strict=True):
        torch.testing.assert_close(inputs, other_inputs)
        assert torch.equal(labels, other_labels)


def test_state_dict_round_trip_and_mismatch(module):
    buffer = io.BytesIO()
    torch.save(module(permute=True, permutation_seed=3).state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # as checkpoints are loaded
    module(permute=True, permutation_seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="permutation_seed=4 .*set permutation_seed=3") as error:
        module(permute=True, permutation_seed=4).load_state_dict(state)
    one_line(error)
    with pytest.raises(ValueError, match="permute=false"):
        module().load_state_dict(state)
    with pytest.raises(ValueError, match="set permute=false"):
        module(permute=True).load_state_dict(module().state_dict())
    module().load_state_dict(module().state_dict())


@pytest.mark.parametrize("normalization, low, high", [
    ("official", -1.0, 255 / 128 - 1),
    ("symmetric", -1.0, 1.0),
    ("mean_std", -0.1307 / 0.3081, (1 - 0.1307) / 0.3081),
    ("none", 0.0, 1.0),
])
def test_normalization(normalization, low, high):
    images = torch.zeros(2, PIXELS, dtype=torch.uint8)
    images[1] = 255
    inputs, _ = MNISTSequences(images, torch.tensor([0, 1]), "pixels", normalization).__getitems__([0, 1])
    torch.testing.assert_close(inputs[0], torch.full((PIXELS, 1), low))
    torch.testing.assert_close(inputs[1], torch.full((PIXELS, 1), high))
    if normalization != "mean_std":  # exact: the float32 value nearest the formula's
        assert inputs[0, 0, 0].item() == np.float32(low) and inputs[1, 0, 0].item() == np.float32(high)


def test_validation_split(module):
    def split(**kwargs):
        datamodule = module(**kwargs)
        datamodule.setup("fit")
        return datamodule.splits["train"].images, datamodule.splits["val"].images

    train, val = split()
    assert (len(train), len(val)) == (TRAIN - round(0.05 * TRAIN), round(0.05 * TRAIN))
    rows = {bytes(row.numpy()) for row in torch.cat([train, val])}
    assert len(rows) == TRAIN  # disjoint and together the whole training file
    assert torch.equal(split()[1], val)
    assert not torch.equal(split(split_seed=1)[1], val)
    assert len(split(val_fraction=0.2)[1]) == 40


def test_full_epoch_and_learnable_content(module):
    datamodule = module(layout="rows", batch_size=7)
    count, sums = 0, torch.zeros(10, 28)
    for inputs, labels, *_ in datamodule.train_dataloader():  # includes the short last batch
        count += len(labels)
        sums.index_add_(0, labels, inputs.mean(dim=2))
    assert count == len(datamodule.splits["train"])
    # Class means of the row brightness tell the classes apart: nearest mean classifies the test set.
    means = sums / torch.bincount(torch.cat([batch.targets for batch in datamodule.train_dataloader()]), minlength=10)[:, None]
    inputs, labels, *_ = next(iter(module(layout="rows", batch_size=TEST).test_dataloader()))
    predicted = torch.cdist(inputs.mean(dim=2), means).argmin(dim=1)
    assert (predicted == labels).float().mean() > 0.9


@pytest.mark.parametrize("kwargs, message", [
    ({"layout": "columns"}, "unknown layout 'columns'"),
    ({"layout": "rows", "permute": True}, "permute=true needs layout='pixels'"),
    ({"normalization": "zscore"}, "unknown normalization 'zscore'"),
    ({"val_fraction": 0}, r"val_fraction must be a number in \(0.0, 1.0\)"),
    ({"val_fraction": 1.0}, r"val_fraction must be a number in \(0.0, 1.0\)"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"num_workers": -1}, "num_workers must be a non-negative integer"),
    ({"permutation_seed": "0"}, "permutation_seed must be an integer"),
    ({"mirrors": "http://a"}, "mirrors must be a non-empty list"),
    ({"mirrors": []}, "mirrors must be a non-empty list"),
    ({"md5": {"train.gz": None}}, r"md5 has unknown file names \['train.gz'\]"),
])
def test_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        MNISTDataModule(str(tmp_path), **kwargs)
    one_line(error)


def test_rejects_a_validation_split_that_empties_a_split(module):
    with pytest.raises(ValueError, match="leaves 0 for validation") as error:
        module(val_fraction=0.001).setup("fit")
    one_line(error)


@pytest.mark.parametrize("drop_last", [False, True])
def test_drop_last_keeps_every_training_batch_full(module, drop_last):
    """The official recipes drop the epoch's short last batch (the official loader cycles); the default keeps it."""
    datamodule = module(batch_size=32, drop_last=drop_last)
    datamodule.prepare_data()
    datamodule.setup("fit")
    sizes = [batch.inputs.shape[0] for batch in datamodule.train_dataloader()]
    train_size = len(datamodule.train_dataloader().dataset)
    assert train_size % 32 != 0  # the tiny split has a short last batch to drop or keep
    assert sizes == [32] * (train_size // 32) + ([] if drop_last else [train_size % 32])
    assert sum(batch.inputs.shape[0] for batch in datamodule.val_dataloader()) == len(datamodule.val_dataloader().dataset)
