"""Every data fault is one line naming the file, what is wrong and the fix (issue 19, section 4), and the
PTB character count (issue 23, section 3). NTU RGB+D's faults: tests/test_ntu_faults.py.

Each case writes a tiny file in the real format (PTB text, MNIST IDX), damages it as a user's disk or
download would, and goes through the real path: the DataModule's setup and loaders; a non-finite
loss names the data before the weights.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules.download import DataError
from datamodules.idx import write_idx
from datamodules.mnist import MNISTDataModule, TRAIN_LABELS
from datamodules.ptb import EOS, read_tokens
from datamodules.ptb_download import FILES
from lightning_modules.nonfinite import NonFiniteLossError
from lightning_modules.classification import SequenceClassificationModule
from src.batch import SequenceBatch
from src.networks import RecurrentNetwork
from tests.mnist_files import write_tiny_mnist
from tests.ptb_files import datamodule as ptb_datamodule
from tests.ptb_files import language_model, write_corpus


def one_line(error) -> str:
    message = str(error.value if hasattr(error, "value") else error)
    assert message and "\n" not in message, message
    return message


# PTB ---------------------------------------------------------------------------------------------


@pytest.fixture
def ptb_corpus(tmp_path):
    return tmp_path, write_corpus(tmp_path / "ptb", lines={"train": 60, "val": 12, "test": 12})


def test_a_non_utf8_byte_in_a_ptb_file_names_the_file(ptb_corpus):
    data_dir, md5 = ptb_corpus
    path = data_dir / "ptb" / FILES["char"]["train"]
    path.write_bytes(path.read_bytes()[:50] + b"\xff" + path.read_bytes()[50:])
    md5[FILES["char"]["train"]] = None  # as the real file: no published checksum
    with pytest.raises(DataError) as error:
        ptb_datamodule(data_dir, md5, level="char")
    message = one_line(error)
    assert f"{path} is not UTF-8 text (byte 0xff at offset 50)" in message and "download=true" in message


def test_a_whitespace_only_tail_is_not_a_line(ptb_corpus):
    """ptb.char.valid.txt ends with a newline and one space: its lines, not one more, end with <eos>,
    and bits per character are the same as for the file without the tail."""
    data_dir, md5 = ptb_corpus
    folder = data_dir / "ptb"
    for split in ("val", "test"):
        path = folder / FILES["char"][split]
        path.write_text(path.read_text() + " ")
    text = (folder / FILES["char"]["val"]).read_text()
    lines = text.count("\n")
    symbols = len(text.split())
    tokens = read_tokens(folder / FILES["char"]["val"], "char")
    assert len(tokens) == symbols + lines and tokens.count(EOS) == lines and tokens[-2:] != [EOS, EOS]
    for name in (FILES["char"]["val"], FILES["char"]["test"]):
        md5[name] = None
    with_tail = ptb_datamodule(data_dir, md5, level="char")
    assert with_tail.ids["val"].numel() == symbols + lines
    model = language_model(len(with_tail.vocabulary), level="char")

    def test_bpc(module) -> float:
        trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        return trainer.test(model, datamodule=module, verbose=False)[0]["test/bpc"]

    tailed = test_bpc(with_tail)
    path = folder / FILES["char"]["test"]
    path.write_text(path.read_text()[:-1])  # the same file without the space
    assert test_bpc(ptb_datamodule(data_dir, md5, level="char")) == tailed
    word = read_tokens(folder / FILES["word"]["val"], "word")  # word level unchanged: one <eos> per line
    assert word.count(EOS) == (folder / FILES["word"]["val"]).read_text().count("\n")


# MNIST -------------------------------------------------------------------------------------------


def test_mnist_with_150_labels_for_200_images_is_one_line(tmp_path):
    md5 = write_tiny_mnist(tmp_path / "mnist", train=200, test=20)
    write_idx(tmp_path / "mnist" / TRAIN_LABELS, np.arange(150, dtype=np.uint8) % 10, gzip=True)
    datamodule = MNISTDataModule(str(tmp_path), md5={name: None for name in md5}, download=False)
    datamodule.prepare_data()
    with pytest.raises(DataError) as error:
        datamodule.setup("fit")
    message = one_line(error)
    assert f"{tmp_path / 'mnist' / TRAIN_LABELS}: 150 uint8 labels for the 200 images" in message
    assert "fetch them again" in message


# Non-finite losses: the data first ---------------------------------------------------------------


class NamedData(pl.LightningDataModule):
    """Tiny (B, T, I) sequences with a ``data_source``, one batch of which may hold a NaN."""

    data_source = "tiny.h5"

    def __init__(self, nan_in: str | None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.inputs = {split: torch.randn(16, 5, 3, generator=generator) for split in ("train", "val")}
        self.targets = {split: torch.arange(16) % 2 for split in ("train", "val")}
        if nan_in is not None:
            self.inputs[nan_in][5, 2, 1] = float("nan")  # batch 1 of 4 in training, batch 0 of 1 in validation

    def loader(self, split: str, batch_size: int) -> DataLoader:
        return DataLoader(TensorDataset(self.inputs[split], self.targets[split]), batch_size=batch_size,
                          collate_fn=lambda rows: SequenceBatch(torch.stack([r[0] for r in rows]),
                                                                torch.stack([r[1] for r in rows])))

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", 4)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", 16)


def fit(data: NamedData, poison_weights: bool = False) -> None:
    torch.manual_seed(0)
    network = RecurrentNetwork(functools.partial(torch.nn.GRU), input_size=3, output_size=2, hidden_size=4)
    if poison_weights:
        with torch.no_grad():
            next(network.parameters())[0, 0] = float("nan")
    objective = SequenceClassificationModule(network, optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                                             num_classes=2)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="cpu", num_sanity_val_steps=1)
    trainer.fit(objective, datamodule=data)


def test_a_nan_training_input_blames_the_data_not_the_weights():
    with pytest.raises(NonFiniteLossError) as error:
        fit(NamedData("train"))
    message = one_line(error)
    assert message.startswith("training loss is nan at step 1 (epoch 0): the data has non-finite values, not the "
                              "weights: that batch's inputs hold 1 non-finite values (first nan at [1, 2, 1])")
    assert message.endswith("from tiny.h5; repair or regenerate the data") and error.value.step == 1


def test_a_nan_validation_input_blames_the_data_and_nan_weights_still_blame_the_weights():
    with pytest.raises(NonFiniteLossError) as error:
        fit(NamedData("val"))
    assert one_line(error).startswith("validation loss is nan at step 0 (epoch 0): the data has non-finite values, "
                                      "not the weights: validation batch 0 holds 1 non-finite inputs")
    with pytest.raises(NonFiniteLossError) as error:
        fit(NamedData(None), poison_weights=True)
    assert "the weights became non-finite" in one_line(error)
