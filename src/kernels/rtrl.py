"""The forward-mode sensitivity update of real-time recurrent learning (RTRL) for one diagonal layer.

A diagonal recurrent layer (IndRNN, a diagonal leaky unit) updates unit j of sample b from its own
previous value only, so the derivative of h_t with respect to the layer's parameters is carried in
structured form, updated once per step and contracted with the loss gradient of h_t where it arrives:

    s_t[p]  = c_t * s_{t-1}[p] + d_t[p]          per-unit parameters p (bias, u, leak logit): (P, B, H)
    S_t     = c_t * S_{t-1}    + e_t (x) x_t     the input weights W: (B, H, I), S[b, j, i] = dh_t[b, j] / dW[j, i]
    grad[p] += sum_b g_t * s_t[p],  grad_W[j, i] += sum_b g_t[b, j] * S_t[b, j, i]

with c_t = dh_t/dh_{t-1} (B, H) (IndRNN: f'(a_t) u), e_t = dh_t/da_t (B, H) (IndRNN: f'(a_t)), d_t[p]
the direct derivative of h_t with respect to p at fixed h_{t-1}, x_t (B, I) the layer's input and
g_t (B, H) the gradient of the loss at step t with respect to h_t (zero where no loss arrives). The
cost per step is O(B H I), like the forward pass; nothing of the past is stored.

:func:`sensitivity_chunk` runs this update over K steps in place. Backends: ``"reference"`` (the plain
loop below: the reference every fused loop is tested against), ``"cpu"`` (numba,
:mod:`src.kernels.rtrl_cpu`), ``"triton"`` (CUDA, :mod:`src.kernels.rtrl_triton`) and ``"auto"``
(numba for CPU float32/float64 tensors where numba is installed, Triton on CUDA where it is
installed, else the plain loop).
"""
from __future__ import annotations

import torch

from src.kernels.rtrl_cpu import numba_chunk_applies, sensitivity_chunk_numba
from src.kernels.rtrl_triton import sensitivity_chunk_triton, triton_chunk_applies

# The same vocabulary as the recurrence kernels (src/kernels/__init__.py): "reference" is the plain loop.
SENSITIVITY_BACKENDS = ("auto", "reference", "cpu", "triton")


def sensitivity_chunk_torch(carry, gain, inputs, direct, grad_h, s_diag, s_weight, grad_diag, grad_weight) -> None:
    """The plain loop over K steps (arguments as :func:`sensitivity_chunk`)."""
    gain_rows = gain.unsqueeze(-1)
    for t in range(carry.shape[0]):
        s_diag.mul_(carry[t]).add_(direct[:, t])
        s_weight.mul_(carry[t].unsqueeze(-1)).addcmul_(gain_rows[t], inputs[t].unsqueeze(1))
        if grad_h is not None:
            grad_diag.add_((grad_h[t] * s_diag).sum(dim=1))
            grad_weight.add_(torch.einsum("bh,bhi->hi", grad_h[t], s_weight))


def resolve_sensitivity_backend(backend: str, tensor: torch.Tensor) -> str:
    """Map "auto" to the fastest backend for ``tensor``'s device and dtype; reject impossible choices."""
    if backend not in SENSITIVITY_BACKENDS:
        raise ValueError(f"unknown RTRL sensitivity backend {backend!r}; choose one of {SENSITIVITY_BACKENDS}")
    if backend == "auto":
        if numba_chunk_applies(tensor):
            return "cpu"
        return "triton" if triton_chunk_applies(tensor) else "reference"
    if backend == "cpu" and not numba_chunk_applies(tensor):
        raise ValueError(f"RTRL backend 'cpu' needs numba and CPU float32/float64 tensors, got {tensor.device} "
                         f"{tensor.dtype}; use backend='auto'")
    if backend == "triton" and not triton_chunk_applies(tensor):
        raise ValueError(f"RTRL backend 'triton' needs triton and CUDA float32 tensors, got {tensor.device} "
                         f"{tensor.dtype}; use backend='auto'")
    return backend


def sensitivity_chunk(carry: torch.Tensor, gain: torch.Tensor, inputs: torch.Tensor, direct: torch.Tensor,
                      grad_h: torch.Tensor | None, s_diag: torch.Tensor, s_weight: torch.Tensor,
                      grad_diag: torch.Tensor, grad_weight: torch.Tensor, backend: str = "auto") -> None:
    """Advance the sensitivities of one diagonal layer over K steps and accumulate the gradients, in place.

    Args:
        carry: c_t = dh_t / dh_{t-1}, shape (K, B, H).
        gain: e_t = dh_t / da_t (a_t = W x_t + ...), shape (K, B, H).
        inputs: the layer's inputs x_t, shape (K, B, I).
        direct: d_t[p], the direct derivative of h_t for each per-unit parameter p, shape (P, K, B, H).
        grad_h: g_t = dloss_t / dh_t, shape (K, B, H), or None when no loss arrives in these steps.
        s_diag: sensitivities of the per-unit parameters, shape (P, B, H) (updated).
        s_weight: sensitivities of the input weights, shape (B, H, I) (updated).
        grad_diag: gradients of the per-unit parameters, shape (P, H) (accumulated).
        grad_weight: gradient of the input weights, shape (H, I) (accumulated).
        backend: one of ``SENSITIVITY_BACKENDS``.
    """
    chosen = resolve_sensitivity_backend(backend, s_weight)
    if chosen == "cpu":
        sensitivity_chunk_numba(carry, gain, inputs, direct, grad_h, s_diag, s_weight, grad_diag, grad_weight)
    elif chosen == "triton":
        sensitivity_chunk_triton(carry, gain, inputs, direct, grad_h, s_diag, s_weight, grad_diag, grad_weight)
    else:
        sensitivity_chunk_torch(carry, gain, inputs, direct, grad_h, s_diag, s_weight, grad_diag, grad_weight)
