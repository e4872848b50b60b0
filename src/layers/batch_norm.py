"""Batch normalisation for sequences, time-major (T, B, H).

Two ways to gather statistics, as in the IndRNN papers' code:

* ``"all_steps"``: one mean/variance per unit over batch *and* time (classification: MNIST, NTU);
* ``"per_step"``: one mean/variance per unit and time step over the batch, with a shared scale
  and shift (language modelling, where step statistics differ). Running statistics are kept for
  ``max_steps`` steps (IndRNN passes its ``bound_steps``); later steps reuse the last step's
  statistics at evaluation. ``forward(x, step)`` takes the absolute step number of x[0], so a
  sequence cut into chunks uses the statistics of its true steps (IndRNN carries it in its state).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from src.checks import check_choice, check_non_negative_int, check_positive_int

BATCH_NORM_STATS = ("all_steps", "per_step")


class TimeBatchNorm(nn.Module):
    """BatchNorm over (T, B, H) inputs; see the module docstring for ``stats``.

    Args:
        num_features: H.
        stats: "all_steps" or "per_step".
        max_steps: steps with their own running statistics (``per_step`` only).
        momentum, eps: as torch.nn.BatchNorm1d.
    """

    def __init__(self, num_features: int, stats: str = "all_steps", max_steps: int | None = None,
                 momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        check_choice("batch_norm_stats", stats, BATCH_NORM_STATS)
        if stats == "per_step":
            if max_steps is None:
                raise ValueError("per-step batch norm needs max_steps (IndRNN: bound_steps), the steps with "
                                 "their own statistics, got None")
            check_positive_int("max_steps", max_steps)
        self.stats, self.momentum, self.eps = stats, momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        rows = max_steps if stats == "per_step" else 1
        self.register_buffer("running_mean", torch.zeros(rows, num_features))
        self.register_buffer("running_var", torch.ones(rows, num_features))

    def forward(self, x: torch.Tensor, step: int = 0) -> torch.Tensor:
        """x: (T, B, H) -> (T, B, H); ``step``: the absolute step number of x[0] (``per_step`` only)."""
        check_non_negative_int("step", step)
        steps, batch, features = x.shape
        if self.stats == "all_steps":
            flat = F.batch_norm(x.reshape(steps * batch, features), self.running_mean[0], self.running_var[0],
                                self.weight, self.bias, self.training, self.momentum, self.eps)
            return flat.view(steps, batch, features)
        if self.training:
            mean = x.mean(dim=1)                                   # (T, H)
            var = x.var(dim=1, unbiased=False)
            with torch.no_grad():
                rows = max(0, min(steps, self.running_mean.shape[0] - step))  # steps with their own rows
                unbiased = var[:rows] * (batch / max(batch - 1, 1))
                self.running_mean[step:step + rows].lerp_(mean[:rows], self.momentum)
                self.running_var[step:step + rows].lerp_(unbiased, self.momentum)
        else:
            index = torch.arange(step, step + steps, device=x.device).clamp(max=self.running_mean.shape[0] - 1)
            mean, var = self.running_mean[index], self.running_var[index]
        normalised = (x - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + self.eps)
        return normalised * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, stats={self.stats}"
