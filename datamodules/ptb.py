"""Penn Treebank language modelling (Mikolov's preprocessed PTB), word and character level.

The files, their checksums and mirrors, and fetching them into ``<data_dir>/ptb``:
datamodules/ptb_download.py.

Tokens: word level splits each line on spaces and ends it with ``<eos>`` (the files already map
rare words to ``<unk>``: 10,000 types with ``<eos>``); character level reads the ``ptb.char`` files
(one symbol per space-separated item, ``_`` between words) and ends each line with ``<eos>``. The
vocabulary comes from the training split, in order of first appearance.

Each split is cut into B parallel streams (B contiguous pieces of the token sequence); a batch is
a window of T consecutive steps of every stream, and the windows come in order, so a recurrent
state carried from one batch to the next continues each stream (truncated BPTT). Under DDP each
rank reads its own B streams of the B x world-size. The training windows start at a random offset
each epoch and may have the official random lengths (:func:`window_lengths`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.download import DataError
from datamodules.ptb_download import FILES, LEVELS, SPLITS, PTBFiles
from src.batch import SequenceBatch
from src.checks import check_choice, check_int, check_positive_int

EOS = "<eos>"
UNK = "<unk>"


def read_tokens(path: str | os.PathLike, level: str) -> list[str]:
    """The token sequence of one file: each line's space-separated items, then ``<eos>``.

    Both levels split on whitespace (the char files separate their symbols by spaces); a line is
    whatever ends with a newline, plus a last line without one if the file does not end in a newline
    and that line has a symbol. A whitespace-only tail is not a line: ``ptb.char.valid.txt`` ends with
    a newline and one space, and its 3,370 lines must give 3,370 ``<eos>`` (bits per character are
    normalised by the symbols plus one ``<eos>`` per line).

    Raises:
        DataError: the file is not UTF-8 text (one line naming the file, the byte and the fix).
    """
    check_choice("PTB level", level, LEVELS)
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"PTB: {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}): the "
                        f"file is damaged; delete it and run again to fetch it (download=true), or put an intact copy "
                        f"there") from None
    lines = text.split("\n")
    if lines and not lines[-1].strip():
        lines.pop()
    tokens: list[str] = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


def build_vocabulary(tokens: list[str]) -> list[str]:
    """The distinct tokens in order of first appearance (deterministic, no sorting ties)."""
    return list(dict.fromkeys(tokens))


def encode(tokens: list[str], vocabulary: list[str], source: str) -> torch.Tensor:
    """Token ids (N,) int64; a token outside the vocabulary becomes ``<unk>`` where there is one."""
    index = {token: position for position, token in enumerate(vocabulary)}
    unk = index.get(UNK)
    ids = []
    for token in tokens:
        position = index.get(token, unk)
        if position is None:
            raise DataError(f"PTB: {source} has the token {token!r}, which the training split lacks, and the "
                             f"vocabulary has no {UNK}")
        ids.append(position)
    return torch.tensor(ids, dtype=torch.long)


def batchify(ids: torch.Tensor, streams: int) -> torch.Tensor:
    """(N,) -> (streams, N // streams): stream s is the s-th contiguous piece (the rest dropped)."""
    length = ids.numel() // streams
    if length < 2:
        raise ValueError(f"PTB: {ids.numel()} tokens cannot make {streams} streams of at least 2 tokens; "
                         f"lower the batch size")
    return ids[:streams * length].view(streams, length)


def window_lengths(total: int, base: int, variable: bool, generator: np.random.Generator,
                   long_probability: float = 0.95, std: float = 5.0, minimum: int = 5) -> list[int]:
    """Window lengths covering ``total`` prediction steps, in order.

    Fixed: ``base`` each (the last one shorter). Variable (official IndRNN/AWD-LSTM): with probability
    ``long_probability`` the mean is ``base``, else ``base / 2``; the length is drawn from
    N(mean, ``std``), rounded, and kept in [``minimum``, ``base + 10``]; the last window takes what is left.
    """
    lengths, done = [], 0
    while done < total:
        length = base
        if variable:
            mean = base if generator.random() < long_probability else base / 2
            length = int(min(max(round(generator.normal(mean, std)), minimum), base + 10))
        length = min(length, total - done)
        lengths.append(length)
        done += length
    return lengths


class StreamWindows(IterableDataset):
    """Consecutive windows over parallel streams of a token sequence, as :class:`src.batch.SequenceBatch`.

    Each pass drops a random prefix of the sequence (training; the official ``rand_drop_ini``), cuts
    the rest into ``streams x world_size`` contiguous streams, keeps this rank's ``streams`` of them
    and walks them in windows.

    Args:
        ids: (N,) int64 token ids.
        streams: B, streams of this rank.
        seq_len: the (base) window length T.
        variable_length: draw window lengths as :func:`window_lengths` (training); else fixed T.
        max_offset: the dropped prefix is drawn from [0, max_offset) tokens each pass (0: none).
        seed: the prefix and lengths of pass k come from (seed, k): the same on every DDP rank, so
            all ranks run the same number of windows.
        rank, world_size: this process's share of the streams under DDP.

    Yields ``SequenceBatch(inputs (B, t), targets (B, t), reset=(B,) bool)``: targets are the inputs
    shifted by one step; ``reset`` is all True on a pass's first window (the streams start afresh)
    and all False after it.
    """

    def __init__(self, ids: torch.Tensor, streams: int, seq_len: int, variable_length: bool = False,
                 max_offset: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.ids, self.streams, self.seq_len = ids, streams, seq_len
        self.variable_length, self.max_offset, self.seed = variable_length, max_offset, seed
        self.rank, self.world_size = rank, world_size
        # Checked once here, with the largest prefix: every pass then has streams of >= 2 tokens.
        batchify(ids[max(max_offset - 1, 0):], streams * world_size)
        self.passes = 0  # passes started: the epoch number of a training loader
        self._running: int | None = None  # windows of the pass being read, while one is

    def _plan(self, epoch: int) -> tuple[torch.Tensor, list[int]]:
        generator = np.random.default_rng([self.seed, epoch])
        offset = int(generator.integers(0, self.max_offset)) if self.max_offset > 0 else 0
        data = batchify(self.ids[offset:], self.streams * self.world_size)
        data = data[self.rank * self.streams:(self.rank + 1) * self.streams]
        return data, window_lengths(data.shape[1] - 1, self.seq_len, self.variable_length, generator)

    def __len__(self) -> int:
        """Windows in the pass being read, else in the next one (the plan fixes them in advance)."""
        return self._running if self._running is not None else len(self._plan(self.passes)[1])

    def __iter__(self) -> Iterator[SequenceBatch]:
        data, lengths = self._plan(self.passes)
        self.passes += 1
        self._running, start = len(lengths), 0
        for number, length in enumerate(lengths):
            window = data[:, start:start + length + 1]
            reset = torch.full((data.shape[0],), number == 0, dtype=torch.bool)
            yield SequenceBatch(window[:, :-1], window[:, 1:], reset=reset)
            start += length
        self._running = None


def _identity(batch):
    return batch


class PTBDataModule(pl.LightningDataModule):
    """Penn Treebank at word or character level, as windows over parallel streams.

    Args:
        data_dir: the files live in ``data_dir/ptb``.
        level: "word" (10k words, ``<eos>`` at line ends) or "char" (the ptb.char files).
        vocab_size: the vocabulary size the model was built for (the decoder's width); checked
            against the training split's, so a mismatch fails before training with the right value.
        batch_size: B, parallel streams of the training split.
        seq_len: T, the (base) training window; validation and test windows too (``eval_seq_len``).
        variable_length: official random training windows (see :func:`window_lengths`).
        max_offset: each training epoch drops a random prefix of [0, max_offset) tokens before cutting
            the streams (official: seq_len x batch x rand_drop_ini / 2); 0: none.
        val_batch_size, test_batch_size: streams of validation and test (papers: 10 and 1).
        eval_seq_len: window length of validation and test (None: ``seq_len``).
        seed: seed of the training windows' offsets and lengths (epoch k uses (seed, k)).
        mirrors: archive URLs (``.tgz``) and folder URLs, tried in order (None: DEFAULT_MIRRORS).
        md5: per-file checksum overrides {file name: md5 or None}; ``simple-examples.tgz`` included.
        download: fetch missing files; False: fail at once if a file is missing.
        timeout: seconds per connection or read before the next mirror.
    """

    def __init__(self, data_dir: str, level: str = "word", vocab_size: int | None = None, batch_size: int = 20,
                 seq_len: int = 35, variable_length: bool = False, max_offset: int = 0,
                 val_batch_size: int = 10, test_batch_size: int = 1, eval_seq_len: int | None = None,
                 seed: int = 0, mirrors: list[str] | None = None, md5: dict | None = None, download: bool = True,
                 timeout: float = 30) -> None:
        super().__init__()
        if data_dir is None or str(data_dir) == "":
            raise ValueError("PTB: data_dir must be a folder path; the files go to <data_dir>/ptb")
        self.level = check_choice("PTB level", level, LEVELS)
        self.vocab_size = None if vocab_size is None else check_positive_int("PTB vocab_size", vocab_size)
        self.batch_size = check_positive_int("PTB batch_size", batch_size)
        self.seq_len = check_int("PTB seq_len", seq_len, minimum=2)
        self.val_batch_size = check_positive_int("PTB val_batch_size", val_batch_size)
        self.test_batch_size = check_positive_int("PTB test_batch_size", test_batch_size)
        self.eval_seq_len = self.seq_len if eval_seq_len is None else check_int("PTB eval_seq_len", eval_seq_len,
                                                                                  minimum=1)
        if not isinstance(variable_length, bool):
            raise ValueError(f"PTB: variable_length must be true or false, got {variable_length!r}")
        self.variable_length = variable_length
        self.max_offset = check_int("PTB max_offset", max_offset, minimum=0)
        self.seed = check_int("PTB seed", seed)
        self.data_dir = data_dir
        self.source = PTBFiles(Path(data_dir) / "ptb", level, mirrors=mirrors, md5=md5, download=download,
                               timeout=timeout)
        self.vocabulary: list[str] | None = None
        self.ids: dict[str, torch.Tensor] = {}
        self._train_windows: StreamWindows | None = None
        self._resumed_passes = 0  # training passes already run, from a checkpoint being resumed

    # Files ----------------------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        """Where the text files live: ``data_dir/ptb``."""
        return self.source.folder

    @property
    def files(self) -> list[str]:
        """The three files of this level: train, validation, test."""
        return self.source.names

    def prepare_data(self) -> None:
        """Fetch the missing or corrupt files of this level; one line naming them all if that fails
        (:meth:`datamodules.ptb_download.PTBFiles.fetch`)."""
        self.source.fetch()

    # Tokens and loaders ----------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Read the three files, build the vocabulary from train, check it against ``vocab_size``."""
        if self.vocabulary is not None:
            return
        missing = [name for name in self.files if not (self.folder / name).is_file()]
        if missing:  # setup without prepare_data (e.g. a second node): the same one-line message
            self.prepare_data()
        tokens = {split: read_tokens(self.folder / FILES[self.level][split], self.level) for split in SPLITS}
        vocabulary = build_vocabulary(tokens["train"])
        if self.vocab_size is not None and len(vocabulary) != self.vocab_size:
            raise DataError(f"PTB: task.vocab_size is {self.vocab_size} but {FILES[self.level]['train']} has "
                             f"{len(vocabulary)} distinct tokens (with {EOS}); set task.vocab_size={len(vocabulary)}")
        self.vocabulary = vocabulary
        self.ids = {split: encode(tokens[split], vocabulary, FILES[self.level][split]) for split in SPLITS}

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def windows(self, split: str, batch_size: int, seq_len: int, training: bool = False) -> StreamWindows:
        """The windows of ``split`` over this rank's ``batch_size`` streams."""
        rank, world = self._rank()
        return StreamWindows(self.ids[split], batch_size, seq_len, variable_length=training and self.variable_length,
                             max_offset=self.max_offset if training else 0, seed=self.seed, rank=rank,
                             world_size=world)

    def _loader(self, windows: StreamWindows) -> DataLoader:
        # batch_size=None: the dataset yields whole batches, in order, in this process.
        return DataLoader(windows, batch_size=None, collate_fn=_identity)

    def train_dataloader(self) -> DataLoader:
        if self._train_windows is None:  # one object across epochs: its pass counter is the epoch
            self._train_windows = self.windows("train", self.batch_size, self.seq_len, training=True)
            self._train_windows.passes = self._resumed_passes
        return self._loader(self._train_windows)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.windows("val", self.val_batch_size, self.eval_seq_len))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.windows("test", self.test_batch_size, self.eval_seq_len))

    def state_dict(self) -> dict:
        """The vocabulary (a plain list) and the training pass counter, saved in checkpoints (Lightning
        keeps a DataModule's state under its class name): the one place a checkpoint holds the
        vocabulary, which :func:`saved_vocabulary` reads back (generate.py)."""
        passes = self._train_windows.passes if self._train_windows is not None else 0
        return {"vocabulary": list(self.vocabulary or []), "level": self.level, "passes": passes}

    def load_state_dict(self, state: dict) -> None:
        """Continue a checkpoint's training pass counter. Lightning calls it after :meth:`setup`, so the
        checkpoint's vocabulary is compared with the one the files give: a model's token ids must mean
        the same tokens (DataError, one line, if not)."""
        saved = state.get("vocabulary")
        if saved and self.vocabulary is not None and list(saved) != self.vocabulary:
            ours = self.vocabulary
            first = next((i for i, (a, b) in enumerate(zip(saved, ours)) if a != b), min(len(saved), len(ours)))
            where = (f"token {first} is {saved[first]!r} there, {ours[first]!r} here" if first < min(len(saved), len(ours))
                     else f"{len(saved)} tokens there, {len(ours)} here")
            raise DataError(f"PTB: the checkpoint's vocabulary is not the one {self.folder / FILES[self.level]['train']} "
                            f"gives ({where}): its token ids would mean other tokens; point data_dir at the corpus "
                            f"the model was trained on")
        self._resumed_passes = int(state.get("passes", 0))
        if self._train_windows is not None:
            self._train_windows.passes = self._resumed_passes


def saved_vocabulary(checkpoint: dict) -> list[str] | None:
    """The vocabulary, a list of V token strings (index = token id), that a checkpoint of a PTB run
    holds in its DataModule's state (:meth:`PTBDataModule.state_dict`); None if it holds none."""
    state = checkpoint.get(PTBDataModule.__qualname__)
    vocabulary = state.get("vocabulary") if isinstance(state, dict) else None
    return list(vocabulary) if vocabulary else None

