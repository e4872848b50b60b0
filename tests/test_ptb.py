"""Penn Treebank data: a tiny corpus in both formats written here and served from 127.0.0.1
(download, checksums, mirrors, the archive, offline message), the tokens of both levels and the
parallel-stream windows (no internet, CPU only). The language model on it: test_ptb_language_model.py."""
from __future__ import annotations

import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from datamodules.download import DownloadError, md5sum
from datamodules.ptb import EOS, PTBDataModule, StreamWindows, batchify, window_lengths
from datamodules.ptb_download import ARCHIVE, ARCHIVE_FOLDER, FILES
from tests.mnist_files import serve_directory
from tests.ptb_files import corpus, one_thread  # noqa: F401 (fixtures)
from tests.ptb_files import datamodule, one_line

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: the connection is refused at once


# Files: download, checksums, mirrors, the archive, offline ------------------------------------------

@pytest.mark.parametrize("level", ["word", "char"])
def test_download_from_a_folder_mirror_checks_md5(tmp_path, corpus, level):
    source, md5 = corpus
    requests: list[str] = []
    with serve_directory(source / "ptb", requests) as url:
        module = PTBDataModule(data_dir=str(tmp_path), level=level, mirrors=[url], md5=md5)
        module.prepare_data()
    for name in FILES[level].values():
        assert md5sum(tmp_path / "ptb" / name) == md5[name]
    assert sorted(requests) == sorted(f"/{name}" for name in FILES[level].values())
    assert not list((tmp_path / "ptb").glob(".*part*"))  # no temporary file left behind


def test_a_corrupt_mirror_is_skipped_for_the_next(tmp_path, corpus):
    source, md5 = corpus
    bad = tmp_path / "bad"
    shutil.copytree(source / "ptb", bad)
    (bad / "ptb.char.train.txt").write_text("x y z \n")  # wrong checksum on the first mirror
    with serve_directory(bad) as first, serve_directory(source / "ptb") as second:
        module = PTBDataModule(data_dir=str(tmp_path / "data"), level="char", mirrors=[UNREACHABLE, first, second],
                               md5=md5)
        module.prepare_data()
    assert md5sum(tmp_path / "data" / "ptb" / "ptb.char.train.txt") == md5["ptb.char.train.txt"]


def test_the_archive_mirror_provides_every_file(tmp_path, corpus):
    source, md5 = corpus
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / ARCHIVE, "w:gz") as bundle:
        for level in FILES.values():
            for name in level.values():
                bundle.add(source / "ptb" / name, arcname="./" + ARCHIVE_FOLDER + name)
    overrides = {**md5, ARCHIVE: md5sum(served / ARCHIVE)}
    with serve_directory(served) as url:
        for level in ("word", "char"):
            PTBDataModule(data_dir=str(tmp_path / "data"), level=level, mirrors=[f"{url}/{ARCHIVE}"],
                          md5=overrides).prepare_data()
    for level in FILES.values():
        for name in level.values():
            assert md5sum(tmp_path / "data" / "ptb" / name) == md5[name]
    assert not (tmp_path / "data" / "ptb" / ARCHIVE).exists()  # only the text files are kept


def test_offline_without_files_one_line_names_files_folder_and_urls(tmp_path):
    mirrors = [UNREACHABLE + "/simple-examples.tgz", UNREACHABLE + "/folder"]
    module = PTBDataModule(data_dir=str(tmp_path), level="word", mirrors=mirrors, timeout=2)
    with pytest.raises(DownloadError) as error:
        module.prepare_data()
    message = one_line(error)
    for name in FILES["word"].values():
        assert name in message
    assert str(tmp_path / "ptb") in message and all(url in message for url in mirrors)


def test_download_false_with_a_corrupt_file_says_so(tmp_path, corpus):
    source, md5 = corpus
    shutil.copytree(source / "ptb", tmp_path / "ptb")
    (tmp_path / "ptb" / "ptb.test.txt").write_text("changed \n")
    with pytest.raises(DownloadError) as error:
        PTBDataModule(data_dir=str(tmp_path), level="word", md5=md5, download=False).prepare_data()
    message = one_line(error)
    assert "ptb.test.txt (corrupt" in message and "download=true" in message


def test_vocabulary_size_mismatch_is_one_line(corpus):
    data_dir, md5 = corpus
    with pytest.raises(ValueError, match=r"task.vocab_size is 7 .* set task.vocab_size=\d+"):
        datamodule(data_dir, md5, vocab_size=7)


# Tokens and windows ----------------------------------------------------------------------------------

def test_tokens_of_both_levels(corpus):
    data_dir, md5 = corpus
    words = datamodule(data_dir, md5, level="word")
    chars = datamodule(data_dir, md5, level="char")
    word_lines = (data_dir / "ptb" / "ptb.train.txt").read_text().splitlines()
    assert words.ids["train"].numel() == sum(len(line.split()) + 1 for line in word_lines)
    assert Counter(words.vocabulary[i] for i in words.ids["train"].tolist())[EOS] == len(word_lines)
    assert "<unk>" in words.vocabulary and EOS in words.vocabulary
    assert "_" in chars.vocabulary and EOS in chars.vocabulary
    assert all(len(token) == 1 for token in chars.vocabulary if token != EOS)
    first = chars.vocabulary
    decoded = "".join(" " if first[i] == "_" else ("\n" if first[i] == EOS else first[i])
                      for i in chars.ids["train"][:200].tolist())
    assert decoded.splitlines()[0] == " ".join(word_lines[0].split())


def test_windows_are_consecutive_per_stream_and_targets_shift(corpus):
    data_dir, md5 = corpus
    module = datamodule(data_dir, md5, batch_size=3, seq_len=7)
    streams = batchify(module.ids["train"], 3)
    batches = list(module.train_dataloader())  # max_offset 0: the streams from the start
    assert batches[0].reset.all() and not any(b.reset.any() for b in batches[1:])
    joined_inputs = torch.cat([b.inputs for b in batches], dim=1)
    joined_targets = torch.cat([b.targets for b in batches], dim=1)
    assert torch.equal(joined_inputs, streams[:, :-1]) and torch.equal(joined_targets, streams[:, 1:])
    assert all(b.inputs.dtype == torch.int64 and b.inputs.shape[1] == 7 for b in batches[:-1])


def test_random_offset_changes_per_epoch_and_ddp_ranks_get_their_own_streams(corpus):
    data_dir, md5 = corpus
    ids = datamodule(data_dir, md5).ids["train"]
    windows = StreamWindows(ids, 2, 10, max_offset=50, seed=3)
    firsts = [next(iter(windows)).inputs[0, :5].tolist() for _ in range(4)]
    assert len({tuple(f) for f in firsts}) > 1  # the dropped prefix changes from epoch to epoch
    ranks = [StreamWindows(ids, 2, 10, variable_length=True, max_offset=50, seed=3, rank=r, world_size=2)
             for r in (0, 1)]
    plans = [list(w) for w in ranks]
    assert len(plans[0]) == len(plans[1])  # the same number of steps on every rank (no DDP hang)
    assert [b.inputs.shape for b in plans[0]] == [b.inputs.shape for b in plans[1]]
    rows = torch.cat([torch.cat([b.inputs for b in plan], dim=1) for plan in plans])  # (4 streams, L)
    offset = int(np.random.default_rng([3, 0]).integers(0, 50))
    assert torch.equal(rows, batchify(ids[offset:], 4)[:, :rows.shape[1]])


def test_variable_window_lengths_follow_the_official_rule():
    rng = np.random.default_rng(0)
    lengths = window_lengths(200_000, 50, True, rng)
    assert sum(lengths) == 200_000
    body = np.array(lengths[:-1])
    assert body.min() >= 5 and body.max() <= 60
    short = np.mean(body < 38)  # the p = 0.05 half-length windows, N(25, 5)
    assert 0.03 < short < 0.07
    assert abs(np.mean(body[body >= 38]) - 50) < 0.3
    assert window_lengths(23, 10, False, rng) == [10, 10, 3]
