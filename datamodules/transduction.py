"""Asynchronous sequence -> sequence tasks for encoder-decoders: reverse or sort a random sequence.

The network reads the whole source, then writes a target of its own length followed by an
end-of-sequence token (Sutskever et al. 2014 trained on reversed sources; reversal and sorting are
the standard sanity tasks for sequence-to-sequence models). Sources have a random length in
[min_len, max_len] and are padded on the left, so that the encoder's last step is always the last
symbol; targets are padded on the right, after their end token.

Token ids, shared by sources and targets:

=====  ===========================================
0      PAD: padding, ignored by the loss and metrics
1      BOS: the decoder's first input ("start writing")
2      EOS: the end of a target
3..    the symbols: 3 .. num_symbols + 2
=====  ===========================================
"""
from __future__ import annotations

import numpy as np
import torch

from datamodules.seeded import SeededDataset
from datamodules.splits import SplitDataModule
from src.checks import check_choice, check_int, check_positive_int

PAD, BOS, EOS = 0, 1, 2
FIRST_SYMBOL = 3
TRANSFORMS = ("reverse", "sort")


def vocabulary_size(num_symbols: int) -> int:
    """Token ids in use: PAD, BOS, EOS and ``num_symbols`` symbols."""
    return FIRST_SYMBOL + num_symbols


class TransductionDataset(SeededDataset):
    """Random symbol sequences and their reversed (or sorted) copies.

    Returns ``(source, target)``: source (max_len,) int64, the symbols left-padded with PAD;
    target (max_len + 1,) int64, the transformed symbols, then EOS, then PAD.
    """

    benchmark = "transduction"

    def __init__(self, min_len: int, max_len: int, num_symbols: int, transform: str, size: int, seed: int,
                 split: str = "train") -> None:
        check_choice("transform", transform, TRANSFORMS)
        check_positive_int(f"{transform}: min_len", min_len)
        check_positive_int(f"{transform}: max_len", max_len)
        check_int(f"{transform}: num_symbols", num_symbols, minimum=2)
        if min_len > max_len:
            raise ValueError(f"{transform}: min_len ({min_len}) must not exceed max_len ({max_len})")
        self.benchmark = transform
        super().__init__(max_len, size, seed, split)
        self.min_len, self.max_len, self.num_symbols, self.transform = min_len, max_len, num_symbols, transform

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        length = int(rng.integers(self.min_len, self.max_len + 1))
        symbols = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + self.num_symbols, size=length)
        source = np.full(self.max_len, PAD, dtype=np.int64)
        source[self.max_len - length:] = symbols
        target = np.full(self.max_len + 1, PAD, dtype=np.int64)
        target[:length] = symbols[::-1] if self.transform == "reverse" else np.sort(symbols)
        target[length] = EOS
        return torch.from_numpy(source), torch.from_numpy(target)


class TransductionDataModule(SplitDataModule):
    """Reverse or sort random sequences (see :class:`TransductionDataset` and the module docstring).

    Batches: :class:`src.batch.SequenceBatch` with inputs = source (B, max_len) and targets = target
    (B, max_len + 1), int64 token ids; ``lengths`` is None (sources are left-padded with PAD).

    Args:
        transform: "reverse" or "sort".
        min_len, max_len: source lengths are drawn uniformly from [min_len, max_len].
        num_symbols: symbols in the alphabet (>= 2); token ids are 3 .. num_symbols + 2.
        train_size, val_size, test_size: samples per split.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (0: load in the training process).
        seed: the data seed; the same seed gives the same sets everywhere.
    """

    def __init__(self, transform: str = "reverse", min_len: int = 1, max_len: int = 10, num_symbols: int = 8,
                 train_size: int = 10_000, val_size: int = 1_000, test_size: int = 1_000, batch_size: int = 32,
                 num_workers: int = 0, seed: int = 1234) -> None:
        self.benchmark = str(transform)
        super().__init__(batch_size, num_workers)
        self.splits = self.sized_splits(
            lambda size, name: TransductionDataset(min_len, max_len, num_symbols, transform, size, seed, name),
            train_size, val_size, test_size)
        self.vocab_size = vocabulary_size(num_symbols)
