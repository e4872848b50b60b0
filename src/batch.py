"""The batch contract: what every DataModule yields and every objective reads (see ARCHITECTURE.md).

A batch is a :class:`SequenceBatch`, a NamedTuple, so Lightning moves it between devices and the
DataLoader's workers pickle it like any tuple. ``inputs`` and ``targets`` are always there;
``lengths`` marks variable-length sequences padded on the right, ``reset`` tells a stateful
objective (truncated BPTT) which streams start afresh, and ``groups`` marks test-time augmentation:
several samplings of one example, whose predictions the objective averages (:func:`average_samplings`).
Read the fields by name (``batch.inputs``), not by unpacking: the tuple may grow.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class SequenceBatch(NamedTuple):
    """One batch of B sequences.

    Attributes:
        inputs: (B, T, I) float features, or (B, T) int64 token ids.
        targets: (B,) or (B, O) per sequence, (B, T) or (B, T, O) per step, or (B, L) a target sequence.
        lengths: (B,) int64 valid steps of each sequence (padding on the right), or None when every
            sequence has all T steps.
        reset: (B,) bool, True where a carried state must start afresh before this batch (a new
            document, a new epoch), or None for "never" (objectives that carry no state ignore it).
        groups: (B,) int64, or None (every sequence is its own example). Test-time augmentation: the
            sequences with the same id are samplings of one example (e.g. NTU's K sets of frames per
            skeleton sequence), so they share its target and length. Ids number the G examples of the
            batch 0, 1, ..., G - 1 in order, non-decreasing (the samplings of one example adjacent),
            e.g. [0, 0, 0, 1, 1, 1] for G = 2 examples of K = 3 samplings. An objective averages the
            samplings' predictions (logits) per example and scores the G examples
            (:func:`average_samplings`).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor | None = None
    reset: torch.Tensor | None = None
    groups: torch.Tensor | None = None


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


def repeat_samplings(count: int, samplings: int) -> torch.Tensor:
    """The ``groups`` of ``count`` examples with ``samplings`` (K) samplings each, adjacent:
    int64 (count * K,) = [0] * K + [1] * K + ... + [count - 1] * K."""
    return torch.arange(count, dtype=torch.int64).repeat_interleave(samplings)


def average_samplings(predictions: torch.Tensor, batch: SequenceBatch
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One prediction per example: the mean of its samplings' predictions (``batch.groups``).

    Args:
        predictions: (B, ...) per sequence, e.g. logits (B, C) or per-step outputs (B, T, O).
        batch: the batch they were computed from (its ``targets``, ``lengths`` and ``groups``).

    Returns:
        ``(predictions (G, ...), targets (G, ...), lengths (G,) or None)``: per example, the mean of its
        samplings' predictions, and its target and length (those of its first sampling). Without
        ``groups``: the batch's own predictions, targets and lengths, untouched (G = B).

    Reading G costs one host synchronisation on an accelerator, in batches with groups only
    (evaluation batches: training batches carry no groups).
    """
    groups = batch.groups
    if groups is None:
        return predictions, batch.targets, batch.lengths
    groups = groups.to(predictions.device)
    count = int(groups[-1]) + 1 if len(groups) else 0
    sizes = torch.bincount(groups, minlength=count)                        # (G,) samplings per example
    if len(sizes) != count:
        raise ValueError(f"batch.groups must number the examples 0, 1, ..., G - 1 in order, but its last id is "
                         f"{count - 1} and its largest {len(sizes) - 1}")
    first = torch.cumsum(sizes, 0) - sizes                                 # (G,) where each example starts
    sums = predictions.new_zeros((count, *predictions.shape[1:])).index_add_(0, groups, predictions)
    means = sums / sizes.view(-1, *(1,) * (predictions.dim() - 1)).to(predictions.dtype)
    targets = batch.targets[first.to(batch.targets.device)]
    lengths = None if batch.lengths is None else batch.lengths[first.to(batch.lengths.device)]
    return means, targets, lengths
