"""The batch contract: what every DataModule yields and every objective reads (see ARCHITECTURE.md).

A batch is a :class:`SequenceBatch`, a NamedTuple, so Lightning moves it between devices and the
DataLoader's workers pickle it like any tuple. ``inputs`` and ``targets`` are always there;
``lengths`` marks variable-length sequences padded on the right, and ``reset`` tells a stateful
objective (truncated BPTT) which streams start afresh.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class SequenceBatch(NamedTuple):
    """One batch of sequences.

    Attributes:
        inputs: (B, T, I) float features, or (B, T) int64 token ids.
        targets: (B,) or (B, O) per sequence, (B, T) or (B, T, O) per step, or (B, L) a target sequence.
        lengths: (B,) int64 valid steps of each sequence (padding on the right), or None when every
            sequence has all T steps.
        reset: (B,) bool, True where a carried state must start afresh before this batch (a new
            document, a new epoch), or None for "never" (objectives that carry no state ignore it).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor | None = None
    reset: torch.Tensor | None = None


def as_batch(batch) -> SequenceBatch:
    """A :class:`SequenceBatch` from a SequenceBatch or a plain ``(inputs, targets)`` pair."""
    if isinstance(batch, SequenceBatch):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return SequenceBatch(batch[0], batch[1])
    raise TypeError(f"a batch is a SequenceBatch or an (inputs, targets) pair, got {type(batch).__name__}"
                    f"{'' if not isinstance(batch, (tuple, list)) else f' of {len(batch)} items'}")


def step_mask(lengths: torch.Tensor | None, steps: int) -> torch.Tensor | None:
    """(B, T) bool, True at the valid steps of each sequence; None when ``lengths`` is None."""
    if lengths is None:
        return None
    return torch.arange(steps, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
