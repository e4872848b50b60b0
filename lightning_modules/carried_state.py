"""Objectives that carry a recurrent state across batches (streams, truncated BPTT) read which streams
restart (the batch contract's ``reset``, (B,) bool) while the batch is still on the host.

Branching on ``reset`` inside the training step would read a device tensor back every step, a full
synchronisation on a GPU. :class:`HostResetFlags` reads the flags in ``on_before_batch_transfer``,
before Lightning moves the batch, and keeps them as Python booleans for the step.
"""
from __future__ import annotations

import warnings

import torch

from src.batch import as_batch

# Lightning warns whenever a LightningModule overrides a batch-transfer hook while a DataModule is passed,
# even when the DataModule does not override it (then the module's hook is the one used, as wanted here).
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule`")


def host_resets(reset: torch.Tensor | None) -> tuple[bool, bool]:
    """(every stream restarts, some stream restarts) from a batch's ``reset`` flags (B,) bool, or None."""
    if reset is None:
        return False, False
    return bool(reset.all()), bool(reset.any())


class HostResetFlags:
    """Mixin for a LightningModule: :meth:`reset_flags` gives the step the flags read on the host.

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
