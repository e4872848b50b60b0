"""Objectives that carry a recurrent state across batches (streams, truncated BPTT): which streams
restart, read on the host, and the state each batch starts from.

The batch contract's ``reset`` ((B,) bool) says which streams start afresh. Branching on it inside the
training step would read a device tensor back every step, a full synchronisation on a GPU.
:class:`CarriedState` reads the flags in ``on_before_batch_transfer``, before Lightning moves the
batch, and keeps them as Python booleans for the step; the streams that restart are then reset by the
state contract (:func:`src.state.reset_streams`, right for every layer's state format), on the device.

Also here, for the objectives with their own steps (these and the encoder-decoder), which cannot
average test-time samplings: :func:`refuse_samplings`.
"""
from __future__ import annotations

import torch

from src.batch import SequenceBatch, as_batch
from src.state import State, reset_streams


def host_resets(reset: torch.Tensor | None) -> tuple[bool, bool]:
    """(every stream restarts, some stream restarts) from a batch's ``reset`` flags (B,) bool, or None."""
    if reset is None:
        return False, False
    return bool(reset.all()), bool(reset.any())


def refuse_samplings(batch: SequenceBatch, objective: str, why: str) -> None:
    """One-line ValueError if ``batch`` has ``groups`` (test-time samplings of one example, see
    :func:`src.batch.average_samplings`), which an objective with its own steps cannot average (``why``)."""
    if batch.groups is not None:
        raise ValueError(f"{objective}: the batch has groups (test-time samplings of one example), but {why}; "
                         f"give it batches without groups (a DataModule without test samplings, test_samplings=1)")


class CarriedState:
    """Mixin for a LightningModule with a network ``self.net``: the reset flags read on the host
    (:meth:`reset_flags`) and the carried state restarted stream by stream (:meth:`restart`).

    Outside a Trainer (a step called by hand, no transfer hook ran) the flags are read from the tensor.
    """

    _host_flags: tuple[bool, bool] | None = None

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        self._host_flags = host_resets(as_batch(batch).reset)
        return batch

    def reset_flags(self, reset: torch.Tensor | None) -> tuple[bool, bool]:
        """(every stream restarts, some stream restarts) for the batch of this step (read once)."""
        flags, self._host_flags = self._host_flags, None
        return flags if flags is not None else host_resets(reset)

    def restart(self, state: State, reset: torch.Tensor | None) -> State:
        """The state to start this step's batch from: ``state`` (the network's, carried from the last
        batch, or None) with the streams flagged in ``reset`` (B,) bool started afresh: None when every
        stream restarts, ``state`` itself when none does, else :func:`src.state.reset_streams` (no host
        synchronisation: the flags were read before the batch moved)."""
        all_reset, any_reset = self.reset_flags(reset)
        if state is None or reset is None or not any_reset:
            return state
        if all_reset:
            return None
        return reset_streams(self.net, state, reset)


__all__ = ["CarriedState", "host_resets", "refuse_samplings"]
