"""Batch normalisation for sequences, time-major (T, B, H).

Two ways to gather statistics, as in the IndRNN papers' code:

* ``"all_steps"``: one mean/variance per unit over batch *and* time (classification: MNIST, NTU);
* ``"per_step"``: one mean/variance per unit and time step over the batch, with a shared scale
  and shift (language modelling, where step statistics differ). Running statistics are kept for
  ``max_steps`` steps; longer sequences reuse the last step's statistics at evaluation.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

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
        if stats not in BATCH_NORM_STATS:
            raise ValueError(f"unknown batch_norm_stats {stats!r}; choose one of {BATCH_NORM_STATS}")
        if stats == "per_step" and not (isinstance(max_steps, int) and max_steps >= 1):
            raise ValueError(f"per-step batch norm needs max_steps >= 1 (the sequence length), got {max_steps!r}")
        self.stats, self.momentum, self.eps = stats, momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        rows = max_steps if stats == "per_step" else 1
        self.register_buffer("running_mean", torch.zeros(rows, num_features))
        self.register_buffer("running_var", torch.ones(rows, num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, B, H) -> (T, B, H)."""
        steps, batch, features = x.shape
        if self.stats == "all_steps":
            flat = F.batch_norm(x.reshape(steps * batch, features), self.running_mean[0], self.running_var[0],
                                self.weight, self.bias, self.training, self.momentum, self.eps)
            return flat.view(steps, batch, features)
        if self.training:
            mean = x.mean(dim=1)                                   # (T, H)
            var = x.var(dim=1, unbiased=False)
            with torch.no_grad():
                rows = min(steps, self.running_mean.shape[0])
                unbiased = var[:rows] * (batch / max(batch - 1, 1))
                self.running_mean[:rows].lerp_(mean[:rows], self.momentum)
                self.running_var[:rows].lerp_(unbiased, self.momentum)
        else:
            index = torch.arange(steps, device=x.device).clamp(max=self.running_mean.shape[0] - 1)
            mean, var = self.running_mean[index], self.running_var[index]
        normalised = (x - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + self.eps)
        return normalised * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, stats={self.stats}"
