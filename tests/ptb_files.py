"""Test helpers for Penn Treebank: a tiny learnable corpus in Mikolov's two formats (words and
characters), and small DataModules and language models built on it."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from datamodules.download import md5sum
from datamodules.ptb import PTBDataModule, read_tokens
from datamodules.ptb_download import FILES
from lightning_modules.language_model import LanguageModel
from src.layers import IndRNN
from src.networks import RecurrentNetwork

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "big", "red", "house", "<unk>"]


def sentence(rng: np.random.Generator, words: list[str]) -> list[str]:
    """A learnable sentence: each word is mostly followed by the next word of ``words``."""
    tokens = [words[int(rng.integers(0, 3))]]
    for _ in range(int(rng.integers(3, 9))):
        step = 1 if rng.random() < 0.8 else 2
        tokens.append(words[(words.index(tokens[-1]) + step) % len(words)])
    return tokens


def write_corpus(folder: Path, lines: dict[str, int] | None = None, seed: int = 0,
                 test_words: list[str] | None = None) -> dict[str, str]:
    """The six PTB files in ``folder`` (word lines ' w1 w2 \\n', char lines 'c a t _ s a t \\n');
    returns {file name: md5}. ``test_words`` gives the test split another word order (a shift)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = lines or {"train": 300, "val": 40, "test": 40}
    for split, count in counts.items():
        order = test_words if (split == "test" and test_words) else WORDS
        sentences = [sentence(rng, order) for _ in range(count)]
        (folder / FILES["word"][split]).write_text("".join(f" {' '.join(s)} \n" for s in sentences))
        (folder / FILES["char"][split]).write_text(
            "".join(" _ ".join(" ".join(word) for word in s) + " \n" for s in sentences))
    return {name: md5sum(folder / name) for level in FILES.values() for name in level.values()}


def vocab_size(data_dir: Path, level: str) -> int:
    return len(set(read_tokens(data_dir / "ptb" / FILES[level]["train"], level)))


def datamodule(data_dir: Path, md5: dict, level: str = "char", **kwargs) -> PTBDataModule:
    settings = {"data_dir": str(data_dir), "level": level, "md5": md5, "download": False, "batch_size": 4,
                "seq_len": 10, **kwargs}
    module = PTBDataModule(**settings)
    module.prepare_data()
    module.setup("fit")
    return module


def language_model(vocab: int, layer: str = "lstm", embedding: int = 8, hidden: int = 16, tie: bool = False,
                   seed: int = 0, **kwargs) -> LanguageModel:
    torch.manual_seed(seed)
    layers = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
    if layer == "indrnn":
        factory = functools.partial(IndRNN, u_bound=0.99)
    else:
        factory = layers[layer]
    net = RecurrentNetwork(factory, input_size=embedding, output_size=embedding if tie else vocab, hidden_size=hidden,
                           num_layers=2, readout="all")
    return LanguageModel(net, optimizer=lambda params: torch.optim.SGD(params, lr=0.1), vocab_size=vocab,
                         embedding_size=embedding, level=kwargs.pop("level", "char"), tie_weights=tie, **kwargs)


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def reference_loss(model: LanguageModel, ids: torch.Tensor, streams: int, window: int) -> float:
    """The papers' evaluation written out: batchify, walk the windows, carry the state, sum the NLL."""
    data = ids[: ids.numel() // streams * streams].view(streams, -1)
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for start in range(0, data.shape[1] - 1, window):
            inputs = data[:, start:start + window]
            targets = data[:, start + 1:start + 1 + window]
            inputs = inputs[:, :targets.shape[1]]
            logits, state = model(inputs, state)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    return total / count


def ptb_overrides(data_dir: Path, md5: dict, level: str = "char") -> list[str]:
    md5_override = "{" + ",".join(f"{name}:{value}" for name, value in md5.items()) + "}"
    return [f"task=ptb_{level}", f"paths.data_dir={data_dir}", f"task.datamodule.md5={md5_override}",
            "task.datamodule.download=false", f"task.vocab_size={vocab_size(data_dir, level)}",
            "task.datamodule.batch_size=4", "task.seq_len=12", "task.datamodule.max_offset=40", "trainer=cpu",
            "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0", "logger=csv",
            "objective.embedding_size=8"]


# Fixtures of the PTB test files (import them into a test module to use them) ---------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(data_dir with ptb/ holding the tiny corpus, {file name: md5})."""
    data_dir = tmp_path_factory.mktemp("data")
    return data_dir, write_corpus(data_dir / "ptb")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for these small models: on a shared 2-core machine, torch's default two
    threads per process made each step ~25x slower (measured: 0.76 s vs 0.028 s for an LSTM step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
