"""Stopping a run on a NaN or infinite loss, and naming the cause: the data (the batch's non-finite
values), the weights, or an overflow inside the network. Training losses are checked without a
host-device synchronisation per step (see :meth:`NonFiniteLossCheck.check_training_loss`)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

# Training losses held before they are checked for NaN/inf at the latest (see check_training_loss).
MAX_UNCHECKED_LOSSES = 1000
# Batches whose inputs are kept (references, no copies) with their losses, so that a non-finite loss
# can be traced to non-finite data; beyond it a window's later batches are not kept (bounded memory).
MAX_KEPT_BATCHES = 100


def nonfinite_values(name: str, tensor: torch.Tensor | None) -> str:
    """"inputs hold 3 non-finite values (first nan at [0, 5, 2])" for a floating tensor with NaN/inf
    values; "" for a finite one, an integer one or None. (Synchronises: only called on a fault.)"""
    if tensor is None or not torch.is_tensor(tensor) or not tensor.is_floating_point():
        return ""
    bad = ~torch.isfinite(tensor.detach())
    count = int(bad.sum())
    if not count:
        return ""
    first = bad.nonzero()[0].tolist()
    return f"{name} hold {count} non-finite values (first {tensor[tuple(first)].item()} at {first})"


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The Trainer running ``module``, or None outside one (a step called by hand, a test)."""
    try:
        return module.trainer
    except RuntimeError:  # Lightning's "not attached to a Trainer"
        return None


def data_source_text(module: pl.LightningModule) -> str:
    """", from <file>" when the trainer's datamodule names its data (a ``data_source`` attribute), else ""."""
    trainer = attached_trainer(module)
    source = getattr(getattr(trainer, "datamodule", None), "data_source", None) if trainer is not None else None
    return f", from {source}" if source else ""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (``step``: the first step it was, when known)."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class NonFiniteLossCheck:
    """Mixed into a LightningModule (before ``pl.LightningModule``): the training-loss and
    validation-loss checks of every objective."""

    def check_training_loss(self, loss: torch.Tensor, inputs: torch.Tensor | None = None,
                            targets: torch.Tensor | None = None, logging: bool | None = None) -> None:
        """Stop with NonFiniteLossError once a training loss was NaN or infinite, naming its step.

        Without a host-device synchronisation per step: each step's loss is kept (detached, no
        kernel) and they are read together, one synchronisation, only on logging steps, on an
        epoch's last step and before each validation. A non-finite loss can so update the weights
        for up to ``trainer.log_every_n_steps`` steps before the run stops as diverged; validation
        also refuses non-finite weights before any checkpoint of them is written.

        ``inputs`` and ``targets`` (the step's batch) are kept by reference with the loss (no copy, no
        kernel; floating tensors only, at most MAX_KEPT_BATCHES per window) and looked at only once a
        loss was non-finite: when that step's data has NaN/inf values the error blames the data, not
        the weights. ``logging``: this step's :meth:`logging_step`, when the caller has it already."""
        if not hasattr(self, "_recent_losses"):
            self._recent_losses: list[tuple[int, torch.Tensor, tuple]] = []
        kept = len(self._recent_losses) < MAX_KEPT_BATCHES
        data = tuple(t if kept and torch.is_tensor(t) and t.is_floating_point() else None for t in (inputs, targets))
        self._recent_losses.append((self.global_step, loss.detach(), data))
        trainer = attached_trainer(self)
        if ((self.logging_step() if logging is None else logging) or trainer is None or trainer.is_last_batch
                or len(self._recent_losses) >= MAX_UNCHECKED_LOSSES):
            self.raise_if_loss_was_nonfinite()

    def raise_if_loss_was_nonfinite(self) -> None:
        """Raise NonFiniteLossError if a training loss since the last check was NaN or infinite."""
        recent, self._recent_losses = getattr(self, "_recent_losses", []), []
        if not recent:
            return
        values = torch.stack([loss.reshape(()).float() for _, loss, _ in recent]).cpu()
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            step, _, (inputs, targets) = recent[int(bad[0])]
            value = values[int(bad[0])].item()
            # The batch first: non-finite data makes a non-finite loss whatever the weights.
            found = [text for text in (nonfinite_values("inputs", inputs), nonfinite_values("targets", targets)) if text]
            if found:
                raise NonFiniteLossError(
                    f"training loss is {value} at step {step} (epoch {self.current_epoch}): the data has non-finite "
                    f"values, not the weights: that batch's {' and its '.join(found)}{data_source_text(self)}; "
                    f"repair or regenerate the data", step=step)
            raise NonFiniteLossError(
                f"training loss is {value} at step {step} (epoch {self.current_epoch}); "
                "lower optimizer.lr or clip gradients (trainer.gradient_clip_val=...)", step=step)

    def note_validation_batch(self, inputs: torch.Tensor) -> None:
        """Keep, per validation batch, whether its inputs have NaN/inf values (one reduction on the
        device, no synchronisation), read only if the validation loss is non-finite."""
        if torch.is_tensor(inputs) and inputs.is_floating_point():
            if not hasattr(self, "_validation_nonfinite"):
                self._validation_nonfinite: list[torch.Tensor] = []
            self._validation_nonfinite.append((~torch.isfinite(inputs.detach())).sum())

    def validation_loss_error(self, loss: float, counts: list[torch.Tensor]) -> NonFiniteLossError:
        """Why the validation loss is non-finite: the data (the first validation batch with NaN/inf
        inputs; ``counts``: per batch, from :meth:`note_validation_batch`), the weights, or neither (an
        overflow inside the network)."""
        where = f"validation loss is {loss} at step {self.global_step} (epoch {self.current_epoch})"
        if counts:
            per_batch = torch.stack(counts).cpu()
            bad = per_batch.nonzero()
            if len(bad):
                return NonFiniteLossError(
                    f"{where}: the data has non-finite values, not the weights: validation batch {int(bad[0])} "
                    f"holds {int(per_batch[int(bad[0])])} non-finite inputs ({int(per_batch.sum())} in all)"
                    f"{data_source_text(self)}; repair or regenerate the data")
        if any(not torch.isfinite(p).all() for p in self.parameters()):
            return NonFiniteLossError(f"{where}: the weights became non-finite; lower optimizer.lr or clip gradients "
                                      "(trainer.gradient_clip_val=...)")
        return NonFiniteLossError(f"{where} with finite weights and data: the network overflows; lower optimizer.lr "
                                  "or clip gradients (trainer.gradient_clip_val=...)")
