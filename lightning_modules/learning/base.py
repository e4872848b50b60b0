"""The interface of a learning rule (see the package docstring)."""
from __future__ import annotations

import torch


class LearningRule:
    """How an objective's network learns from a training batch.

    The objective calls :meth:`attach` once, from its constructor, then :meth:`training_step` for
    every training batch and :meth:`on_train_epoch_end` after each training epoch. A rule that steps
    the optimizer itself sets ``objective.automatic_optimization = False`` in :meth:`attach`, and
    refuses there, in one line, an objective or network it cannot train.
    """

    name = "learning rule"

    def attach(self, objective) -> None:
        """Check that ``objective`` (and its network ``objective.net``) can be trained by this rule."""

    def training_step(self, objective, batch) -> torch.Tensor:
        """Train on one batch (a :class:`src.batch.SequenceBatch`); return the loss to log."""
        raise NotImplementedError

    def on_train_epoch_end(self, objective) -> None:
        """After each training epoch (e.g. a manual-optimization rule steps the epoch schedulers)."""
