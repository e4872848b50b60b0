"""Synthetic sequence -> sequence tasks, each sample generated on demand from (seed, split, index).

* Copy memory (Hochreiter & Schmidhuber 1997; as set up by Arjovsky et al. 2016 and the TCN paper,
  Bai et al. 2018): remember 10 symbols across T blank steps and replay them after a delimiter.
* Running parity (sequence labelling): label every step with the XOR of all bits so far.
* Sequence generation (Clockwork RNN paper, Koutnik et al. 2014): from no input, output one fixed
  waveform of T steps.

Copy memory and parity build on :class:`datamodules.seeded.SeededDataset`: every sample is generated
from (seed, split, index), identical across calls, DataLoader workers and DDP ranks, never stored.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.seeded import SeededDataModule, SeededDataset
from datamodules.splits import SplitDataModule
from src.checks import check_int, check_non_negative_int, check_positive_int

# Copy memory: symbols 1..8 to remember, 0 blank, 9 delimiter ("now replay").
COPY_NUM_SYMBOLS = 10       # symbols to remember (and to replay)
COPY_ALPHABET = 8           # symbols are drawn from 1..COPY_ALPHABET
COPY_BLANK, COPY_DELIMITER = 0, 9
COPY_NUM_CLASSES = 10       # 0 blank, 1..8 symbols, 9 delimiter: one-hot input channels and output classes


def memoryless_baseline(seq_len: int) -> float:
    """Per-step cross-entropy (nats) of the best strategy without memory on copy memory with delay T.

    It predicts a blank everywhere except the last 10 steps, where it spreads its guess evenly over
    the 8 symbols: 10 * log(8) / (T + 20), averaged over all T + 20 steps (0.1733 for T=100).
    """
    check_positive_int("copy memory: seq_len", seq_len)
    return COPY_NUM_SYMBOLS * math.log(COPY_ALPHABET) / (seq_len + 2 * COPY_NUM_SYMBOLS)


class CopyMemoryDataset(SeededDataset):
    """Copy memory with delay T: sequences of T + 20 steps (0-based positions).

    ===============  ==================  ==========================
    positions        input               target
    ===============  ==================  ==========================
    0 .. 9           10 symbols in 1..8  blank (0)
    10 .. T+8        T-1 blanks (0)      blank (0)
    T+9              delimiter (9)       blank (0)
    T+10 .. T+19     10 blanks (0)       the 10 symbols, in order
    ===============  ==================  ==========================

    The delimiter is the (T+10)-th step; the first symbol is replayed T+10 steps after it was shown.
    Returns ``(inputs, targets)``: inputs (T+20, 10) float32 one-hot; targets (T+20,) int64 in 0..8.
    """

    benchmark = "copy memory"

    def __init__(self, seq_len: int, size: int, seed: int, split: str = "train") -> None:
        check_positive_int("copy memory: seq_len", seq_len)
        super().__init__(seq_len, size, seed, split)

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n, total = COPY_NUM_SYMBOLS, self.seq_len + 2 * COPY_NUM_SYMBOLS
        symbols = rng.integers(1, COPY_ALPHABET + 1, size=n)
        codes = np.full(total, COPY_BLANK, dtype=np.int64)
        codes[:n] = symbols
        codes[self.seq_len + n - 1] = COPY_DELIMITER
        targets = np.full(total, COPY_BLANK, dtype=np.int64)
        targets[-n:] = symbols
        inputs = np.eye(COPY_NUM_CLASSES, dtype=np.float32)[codes]
        return torch.from_numpy(inputs), torch.from_numpy(targets)


class ParityDataset(SeededDataset):
    """Running parity: bits x_t ~ U{0, 1}; the label of step t is x_0 XOR ... XOR x_t.

    Returns ``(inputs, targets)``: inputs (T, 1) float32 bits; targets (T,) int64 in {0, 1}.
    """

    benchmark = "parity"

    def __init__(self, seq_len: int, size: int, seed: int, split: str = "train") -> None:
        check_positive_int("parity: seq_len", seq_len)
        super().__init__(seq_len, size, seed, split)

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        bits = rng.integers(0, 2, size=self.seq_len)
        targets = np.cumsum(bits) % 2
        return (torch.from_numpy(bits.astype(np.float32)[:, None]),
                torch.from_numpy(targets.astype(np.int64)))


def generation_waveform(seq_len: int = 320, num_sinusoids: int = 3, seed: int = 1234,
                        min_period: float = 10.0, max_period: float = 160.0) -> np.ndarray:
    """The fixed target of the generation task: a sum of sinusoids, scaled so that max |y| = 1.

    Each sinusoid has a period drawn log-uniformly from [min_period, max_period] steps, a phase from
    U(0, 2 pi) and an amplitude from U(0.5, 1), all from ``seed``. Returns (seq_len,) float32 in [-1, 1].
    """
    check_int("generation: seq_len", seq_len, minimum=2)
    check_positive_int("generation: num_sinusoids", num_sinusoids)
    check_non_negative_int("generation: seed", seed)
    if not 0 < min_period <= max_period:
        raise ValueError(f"generation: need 0 < min_period <= max_period, got {min_period!r} and {max_period!r}")
    rng = np.random.default_rng((seed, num_sinusoids))
    periods = np.exp(rng.uniform(math.log(min_period), math.log(max_period), size=num_sinusoids))
    phases = rng.uniform(0.0, 2 * math.pi, size=num_sinusoids)
    amplitudes = rng.uniform(0.5, 1.0, size=num_sinusoids)
    t = np.arange(seq_len, dtype=np.float64)[:, None]
    wave = (amplitudes * np.sin(2 * math.pi * t / periods + phases)).sum(axis=1)
    peak = np.abs(wave).max()
    return (wave / peak if peak > 0 else wave).astype(np.float32)


class GenerationDataset(Dataset):
    """The generation task: ``size`` copies of (zeros (T, 1), waveform (T, 1)), all identical."""

    def __init__(self, waveform: np.ndarray, size: int, split: str = "train") -> None:
        check_positive_int(f"generation: {split} size", size)
        self.size = size
        self.targets = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)[:, None])
        self.inputs = torch.zeros_like(self.targets)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        return self.inputs.clone(), self.targets.clone()


class CopyMemoryDataModule(SeededDataModule):
    """Copy memory with delay T (see :class:`CopyMemoryDataset` for the layout): seq_len T >= 1, the
    sequences have T + 20 steps (TCN paper: T = 1000); the other arguments are
    :class:`datamodules.seeded.SeededDataModule`'s."""

    benchmark = "copy memory"
    dataset = CopyMemoryDataset

    @property
    def baseline(self) -> float:
        """The cross-entropy of the memoryless strategy at this delay (:func:`memoryless_baseline`)."""
        return memoryless_baseline(self.seq_len)


class ParityDataModule(SeededDataModule):
    """Running parity of random bits, labelled at every step (see :class:`ParityDataset`): seq_len T >= 1
    bits; the other arguments are :class:`datamodules.seeded.SeededDataModule`'s."""

    benchmark = "parity"
    dataset = ParityDataset


class GenerationDataModule(SplitDataModule):
    """Sequence generation: every sample of every split is the same (zeros, waveform) pair.

    Args:
        seq_len: T, steps of the waveform (>= 2; Clockwork RNN paper: 320).
        num_sinusoids, min_period, max_period, seed: the waveform (see :func:`generation_waveform`).
        train_size, val_size, test_size: copies per split (1: one sequence per epoch).
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
    """

    benchmark = "generation"

    def __init__(self, seq_len: int = 320, num_sinusoids: int = 3, min_period: float = 10.0,
                 max_period: float = 160.0, train_size: int = 1, val_size: int = 1, test_size: int = 1,
                 batch_size: int = 1, num_workers: int = 0, seed: int = 1234) -> None:
        super().__init__(batch_size, num_workers)
        self.waveform = generation_waveform(seq_len, num_sinusoids, seed, min_period, max_period)
        self.splits = self.sized_splits(lambda size, name: GenerationDataset(self.waveform, size, name),
                                       train_size, val_size, test_size)
