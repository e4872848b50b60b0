"""Batch normalisation for sequences, time-major (T, B, H).

Three ways to gather statistics, as in the IndRNN papers' code:

* ``"all_steps"``: one mean/variance per unit over batch *and* time (classification: MNIST, NTU);
* ``"per_step"``: one mean/variance per unit and time step over the batch, with a shared scale
  and shift (language modelling, where step statistics differ). Running statistics are kept for
  ``max_steps`` steps (IndRNN passes its ``bound_steps``); later steps reuse the last step's
  statistics at evaluation. ``forward(x, step)`` takes the absolute step number of x[0], so a
  sequence cut into chunks uses the statistics of its true steps (IndRNN carries it in its state);
  the Deep IndRNN PyTorch PTB code (absolute position, capped).
* ``"per_window"``: as ``"per_step"``, but the row is the position inside the window given to
  ``forward`` (x[0] is row 0, whatever ``step``): the CVPR Theano character-level PTB code, whose
  windows carry the hidden state on while its batch norm restarts at every window. Chunking a
  sequence therefore changes the result, by design.

Accuracy: the batch statistics (and, in the backward pass, the sums over the batch) are computed
with torch's reductions over the normalised dimensions, which sum pairwise (CPU cascade sums, GPU
tree reductions), and the variance in two passes (the mean first, then the centred squares). In
float32 they are as accurate as, or better than, the official code's (B, H, T) layout for
F.batch_norm: 784 x 32 steps of 128 units (pixel MNIST) stay within 2e-6 of float64, forward and
gradients (tests/test_batch_norm_accuracy.py), where F.batch_norm on the flattened (T * B, H) input
accumulates one running sum per unit and drifts by ~1e-5 (forward) and much more in the gradients.
The price on a CPU: forward and backward at that shape take ~2-3x the flattened F.batch_norm
(70-100 ms vs 32-35 ms, one thread, loaded machine) and ~1/4 of the official layout's (~320 ms,
whose permutes copy the input).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from src.checks import check_choice, check_positive_int
from src.state import check_step

BATCH_NORM_STATS = ("all_steps", "per_step", "per_window")


class _BatchStatisticsNorm(torch.autograd.Function):
    """(x - mean) / sqrt(var + eps) * weight + bias with mean/var over ``dims`` of x (T, B, H).

    Returns the output (T, B, H) and the batch statistics mean, var (biased), each shaped as x
    with ``dims`` kept as size 1 (not differentiable: they feed the running statistics only).
    The backward pass recomputes the normalised input from x (nothing else of size T x B x H is
    kept) and takes its sums with the same pairwise reductions as the forward pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dims: tuple[int, ...],
                eps: float):
        mean = x.mean(dims, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dims, keepdim=True)   # two passes: no cancellation in E[x^2] - E[x]^2
        inv_std = torch.rsqrt(var + eps)
        output = centred.mul_(inv_std * weight).add_(bias)
        ctx.save_for_backward(x, weight, mean, inv_std)
        ctx.dims = dims
        ctx.mark_non_differentiable(mean, var)
        return output, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor, _grad_mean, _grad_var):
        x, weight, mean, inv_std = ctx.saved_tensors
        dims = ctx.dims
        count = 1
        for dim in dims:
            count *= x.shape[dim]
        normalised = (x - mean).mul_(inv_std)
        # Per group of statistics (one per unit, or one per unit and step): the sums of the output
        # gradient and of its product with the normalised input.
        grad_shift = grad_output.sum(dims, keepdim=True)
        grad_scale = (grad_output * normalised).sum(dims, keepdim=True)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # d/dx of the normalisation: the output gradient less its mean and its projection on the
            # normalised input, times weight / std (in place in the buffer of the normalised input).
            grad_input = (normalised.mul_(grad_scale / -count).add_(grad_output).sub_(grad_shift / count)
                          .mul_(inv_std * weight))
        features = x.shape[-1]
        if ctx.needs_input_grad[1]:
            grad_weight = grad_scale.reshape(-1, features).sum(0)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_shift.reshape(-1, features).sum(0)
        return grad_input, grad_weight, grad_bias, None, None


class TimeBatchNorm(nn.Module):
    """BatchNorm over (T, B, H) inputs; see the module docstring for ``stats``.

    Args:
        num_features: H.
        stats: "all_steps", "per_step" or "per_window".
        max_steps: steps with their own running statistics (``per_step``: absolute steps;
            ``per_window``: positions in a window); later ones reuse the last row at evaluation.
        momentum, eps: as torch.nn.BatchNorm1d (running = (1 - momentum) running + momentum batch,
            the running variance unbiased).
    """

    def __init__(self, num_features: int, stats: str = "all_steps", max_steps: int | None = None,
                 momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        check_choice("batch_norm_stats", stats, BATCH_NORM_STATS)
        if stats != "all_steps":
            if max_steps is None:
                raise ValueError(f"{stats.replace('_', '-')} batch norm needs max_steps (IndRNN: bound_steps), the "
                                 "steps with their own statistics, got None")
            check_positive_int("max_steps", max_steps)
        self.stats, self.momentum, self.eps = stats, momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        rows = 1 if stats == "all_steps" else max_steps
        self.register_buffer("running_mean", torch.zeros(rows, num_features))
        self.register_buffer("running_var", torch.ones(rows, num_features))

    def forward(self, x: torch.Tensor, step: int | torch.Tensor = 0) -> torch.Tensor:
        """x: (T, B, H) -> (T, B, H); ``step``: the absolute step number of x[0] (``per_step`` only), an int,
        or a (B,) int64 tensor when the streams are at different steps (after a per-stream restart, see
        :func:`src.state.reset_streams`): each stream then reads the rows of its own steps at evaluation.
        In training the batch statistics stay those of each position of the window over the whole batch,
        and each running row moves toward the mean of the positions' statistics that fell on it.

        Half-precision inputs (bf16/fp16 under autocast) are normalised in float32 (statistics,
        arithmetic) and returned in their own dtype, as cuDNN's batch norm does."""
        if x.dtype in (torch.float16, torch.bfloat16):
            return self.forward(x.float(), step).to(x.dtype)
        steps, batch, _ = x.shape
        check_step(step, batch, "batch norm step")
        per_stream = isinstance(step, torch.Tensor) and self.stats == "per_step"
        first = step if self.stats == "per_step" and not per_stream else 0   # the running-statistics row of x[0]
        last_row = self.running_mean.shape[0] - 1
        if self.training:
            dims = (0, 1) if self.stats == "all_steps" else (1,)
            output, mean, var = _BatchStatisticsNorm.apply(x, self.weight, self.bias, dims, self.eps)
            count = steps * batch if self.stats == "all_steps" else batch
            with torch.no_grad():
                mean, var = mean.flatten(0, 1), var.flatten(0, 1)       # (1, H) or (T, H)
                unbiased = var * (count / max(count - 1, 1))
                if per_stream:
                    self._update_rows_per_stream(mean, unbiased, step)
                    return output
                # The rows of x that have running statistics of their own (later steps have none).
                rows = max(0, min(mean.shape[0], last_row + 1 - first))
                self.running_mean[first:first + rows].lerp_(mean[:rows].to(self.running_mean.dtype), self.momentum)
                self.running_var[first:first + rows].lerp_(unbiased[:rows].to(self.running_var.dtype), self.momentum)
            return output
        if self.stats == "all_steps":
            mean, var = self.running_mean.unsqueeze(1), self.running_var.unsqueeze(1)      # (1, 1, H)
        elif per_stream:
            index = (step.view(1, -1) + torch.arange(steps, device=x.device).view(-1, 1)).clamp(max=last_row)
            mean, var = self.running_mean[index], self.running_var[index]                  # (T, B, H)
        else:
            index = torch.arange(first, first + steps, device=x.device).clamp(max=last_row)
            mean, var = self.running_mean[index].unsqueeze(1), self.running_var[index].unsqueeze(1)  # (T, 1, H)
        scale = torch.rsqrt(var + self.eps) * self.weight
        return (x - mean) * scale + self.bias

    def _update_rows_per_stream(self, mean: torch.Tensor, unbiased: torch.Tensor, step: torch.Tensor) -> None:
        """Running statistics when stream b's position t is at row step[b] + t: each row touched moves (by
        ``momentum``) toward the average of the positions' batch statistics (T, H) that fell on it; rows past
        ``max_steps`` are dropped (a scratch row). Without a host synchronisation."""
        steps, rows = mean.shape[0], self.running_mean.shape[0]
        index = (step.view(1, -1) + torch.arange(steps, device=step.device).view(-1, 1)).clamp(max=rows)  # (T, B)
        # hits[t, r]: how many streams are at row r at position t (whole numbers: any summation order is exact).
        hits = mean.new_zeros(steps, rows + 1).scatter_add_(1, index, mean.new_ones(index.shape))[:, :rows]
        counts = hits.sum(0).unsqueeze(1)                                      # (R, 1)
        touched = counts > 0
        for running, batch_value in ((self.running_mean, mean), (self.running_var, unbiased)):
            average = (hits.t() @ batch_value) / counts.clamp(min=1)           # (R, H)
            running.lerp_(torch.where(touched, average, running).to(running.dtype), self.momentum)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, stats={self.stats}"
