"""Fused recurrence kernels, selected automatically by device, with the reference loop as fallback.

``indrnn_recurrence(z, u, h0, activation, backend="auto", grad_clip=None)`` computes
h_t = act(z_t + u * h_{t-1}) for all t; ``grad_clip=c`` clamps the gradient with respect to each
pre-activation z_t + u * h_{t-1} to [-c, c] at every step of the backward pass (the official Theano
code's per-step recurrent clipping), identically in every backend. Backends:

* ``"reference"``: the autograd loop in :mod:`src.kernels.reference` (any device, any dtype).
* ``"cpu"``: :class:`src.kernels.indrnn_cpu.IndRNNRecurrenceCPU` (numba loops, or vectorised
  PyTorch loops where numba is missing), both with a hand-written backward; ``"cpu_torch"`` forces
  the PyTorch loops.
* ``"triton"``: :class:`src.kernels.indrnn_triton.IndRNNRecurrenceTriton` on CUDA tensors
  (float32, bfloat16, float16 with a float32 state).
* ``"auto"``: the fused CPU kernel for CPU tensors; on CUDA the Triton kernel where triton is
  installed and the dtype is supported, else the reference loop.

``indrnn_linear_recurrence(x, weight, bias, u, h0, ...)`` adds the input projection: on the
``"cpu"`` backend with few inputs (I <= 8, relu or identity) projection and recurrence run as one
kernel (:mod:`src.kernels.indrnn_linear_cpu`), else as ``F.linear`` followed by the recurrence.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from src.kernels.indrnn_cpu import IndRNNRecurrenceCPU, numba_available
from src.kernels.indrnn_linear_cpu import IndRNNLinearRecurrenceCPU, fused_projection_applies
from src.kernels.indrnn_triton import SUPPORTED_DTYPES as TRITON_DTYPES
from src.kernels.indrnn_triton import IndRNNRecurrenceTriton, triton_available
from src.kernels.reference import ACTIVATIONS, check_grad_clip, indrnn_recurrence_reference

BACKENDS = ("auto", "cpu", "cpu_torch", "triton", "reference")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Map "auto" to the fastest backend for ``device`` and ``dtype``; reject impossible choices."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown recurrence backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda" and triton_available() and dtype in TRITON_DTYPES:
            return "triton"
        return "reference"
    if backend in ("cpu", "cpu_torch") and device.type != "cpu":
        raise ValueError(f"backend {backend!r} runs on CPU tensors only, got device {device}; use backend='auto'")
    if backend == "triton" and not (device.type == "cuda" and triton_available()):
        raise ValueError(f"backend 'triton' needs CUDA tensors and the triton package (device {device}); "
                         "use backend='auto'")
    return backend


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown IndRNN activation {activation!r}; choose one of {ACTIVATIONS}")


def indrnn_recurrence(
    z: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, activation: str = "relu", backend: str = "auto",
    grad_clip: float | None = None,
) -> torch.Tensor:
    """All hidden states of h_t = act(z_t + u * h_{t-1}).

    Args:
        z: input projections W x_t + b, shape (T, B, H).
        u: recurrent weights, shape (H,).
        h0: initial state, shape (B, H).
        activation: one of ``ACTIVATIONS``.
        backend: one of ``BACKENDS``.
        grad_clip: None, or c > 0: clamp dL/d(z_t + u * h_{t-1}) to [-c, c] at every step.

    Returns:
        Hidden states, shape (T, B, H).
    """
    _check_activation(activation)
    grad_clip = check_grad_clip(grad_clip)
    chosen = resolve_backend(backend, z.device, z.dtype)
    if chosen == "reference":
        return indrnn_recurrence_reference(z, u, h0, activation, grad_clip)
    if chosen == "triton":
        return IndRNNRecurrenceTriton.apply(z, u, h0, activation, grad_clip)
    return IndRNNRecurrenceCPU.apply(z, u, h0, activation, chosen == "cpu", grad_clip)


def indrnn_linear_recurrence(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor, h0: torch.Tensor,
    activation: str = "relu", backend: str = "auto", grad_clip: float | None = None
) -> torch.Tensor:
    """All hidden states of h_t = act(W x_t + b + u * h_{t-1}): projection and recurrence.

    Args:
        x: inputs, shape (T, B, I).
        weight: W, shape (H, I); bias: b, shape (H,), or None.
        u, h0, activation, backend, grad_clip: as :func:`indrnn_recurrence` (the clipped dL/da_t is
            what reaches W, b and x).

    Returns:
        Hidden states, shape (T, B, H). Equal to ``indrnn_recurrence(F.linear(x, weight, bias), ...)``;
        one fused kernel computes it where that is faster (see the module docstring).
    """
    _check_activation(activation)
    grad_clip = check_grad_clip(grad_clip)
    chosen = resolve_backend(backend, x.device, x.dtype)
    if chosen == "cpu" and fused_projection_applies(x, activation):
        return IndRNNLinearRecurrenceCPU.apply(x, weight, bias, u, h0, activation, grad_clip)
    return indrnn_recurrence(F.linear(x, weight, bias), u, h0, activation, chosen, grad_clip)


__all__ = ["ACTIVATIONS", "BACKENDS", "indrnn_linear_recurrence", "indrnn_recurrence", "indrnn_recurrence_reference",
           "numba_available", "triton_available"]
