"""The IndRNN recurrence as a plain PyTorch loop over time.

This is the reference that every fused kernel is tested against, and the fallback for dtypes and
devices that have no fused kernel. Autograd records every step, so it is slower than the fused
kernels (about 2-4x on CPU at T=784, B=64, H=128: see benchmarks/recurrence.py) but obviously correct.

Per-step recurrent gradient clipping (``grad_clip=c``), as Theano's ``grad_clip`` / Lasagne's
``grad_clipping`` in the official CVPR'18 IndRNN code: the forward pass is unchanged; in the
backward pass the gradient with respect to each pre-activation a_t = z_t + u * h_{t-1} is clamped
to [-c, c] before it flows on to h_{t-1}, u and z_t (hence to W, b and the inputs).
"""
from __future__ import annotations

import math

import torch

from src.activations import activate

ACTIVATIONS = ("relu", "tanh", "identity")


def check_grad_clip(grad_clip: float | None) -> float | None:
    """``grad_clip`` as a float, or None (no clipping); a one-line ValueError unless None or finite > 0."""
    if grad_clip is None:
        return None
    if isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float)) or not (
            math.isfinite(grad_clip) and grad_clip > 0):
        raise ValueError(f"grad_clip must be null (no clipping) or a finite number > 0, got {grad_clip!r}")
    return float(grad_clip)


class ClipGradient(torch.autograd.Function):
    """Identity forward; the backward pass clamps the incoming gradient to [-bound, bound] (NaN stays NaN)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bound: float) -> torch.Tensor:
        ctx.bound = bound
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp(-ctx.bound, ctx.bound), None


def indrnn_recurrence_reference(
    input_projection: torch.Tensor, recurrent_weight: torch.Tensor, h0: torch.Tensor, activation: str,
    grad_clip: float | None = None,
) -> torch.Tensor:
    """h_t = act(z_t + u * h_{t-1}) for t = 0..T-1, with h_{-1} = h0.

    Args:
        input_projection: z, shape (T, B, H): W x_t + b for every step.
        recurrent_weight: u, shape (H,).
        h0: initial state, shape (B, H).
        activation: "relu", "tanh" or "identity".
        grad_clip: None, or c > 0: clamp dL/da_t to [-c, c] at every step (see the module docstring).

    Returns:
        All hidden states, shape (T, B, H). The final state is the last row.
    """
    grad_clip = check_grad_clip(grad_clip)
    state = h0
    outputs = []
    for z_t in input_projection.unbind(0):
        pre_activation = z_t + recurrent_weight * state
        if grad_clip is not None and pre_activation.requires_grad:
            pre_activation = ClipGradient.apply(pre_activation, grad_clip)
        state = activate(pre_activation, activation)
        outputs.append(state)
    return torch.stack(outputs)
