"""IndRNN layer with few inputs on the CPU: the input projection and the recurrence in one kernel.

Why: with I = 1 or 2 inputs (sequential MNIST, the adding problem: the papers' first layers), the
projection z = W x + b costs 2 FLOPs per element yet, done apart, it writes z (T*B*H values),
and the backward pass writes dL/dz and reads it twice more for BLAS matrix products with a
K = 1 or 2 inner dimension, which run far below peak. Here
    forward:  h_t = act(W x_t + b + u * h_{t-1})
    backward: delta_t = clip((g_t + u * delta_{t+1}) * act'(h_t))   (clip: see indrnn_cpu)
              dL/dx_t = W^T delta_t,  dL/dW = sum delta_t x_t^T,  dL/db = sum delta_t,
              dL/du = sum delta_t * h_{t-1},  dL/dh0 = u * delta_0
run as one loop over time each, and neither z nor dL/dz is ever stored: the forward pass writes
only h, and the backward pass reads only g and h.

Only relu and identity are fused: numba's scalar tanh is slow (see :mod:`src.kernels.indrnn_cpu`).
"""
from __future__ import annotations

import torch

from src.kernels.indrnn_cpu import (ACTIVATION_CODES, NUMBA_DTYPES, clip_code, contiguous_array, gradient_rows,
                                     numba, numba_available)

if numba is not None:
    from src.kernels.indrnn_cpu import WARM_ELEMENTS, delta_of, warm_block

FUSED_ACTIVATIONS = ("relu", "identity")
# Above this many inputs a separate BLAS projection is faster than the fused per-element loops.
FUSED_MAX_INPUTS = 8

if numba is not None:
    import numpy as np

    # Reassociation lets LLVM vectorise the sums over units; NaN and inf semantics stay IEEE, so
    # a diverging run still shows up as a NaN loss.
    _FAST = {"reassoc", "contract"}

    @numba.njit(cache=True, nogil=True, fastmath=_FAST)
    def _linear_forward(x, weight_t, bias, u, h0, activation, out):  # pragma: no cover - compiled
        steps, batch, inputs = x.shape
        hidden = u.shape[0]
        zero = out.dtype.type(0)
        for t in range(steps):
            previous = out[t - 1] if t > 0 else h0
            for b in range(batch):
                h_t, h_prev, x_tb = out[t, b], previous[b], x[t, b]
                for j in range(hidden):
                    h_t[j] = bias[j] + u[j] * h_prev[j]
                for i in range(inputs):
                    x_i, w_i = x_tb[i], weight_t[i]
                    for j in range(hidden):
                        h_t[j] += w_i[j] * x_i
                if activation == 0:
                    for j in range(hidden):
                        h_t[j] = max(h_t[j], zero)

    @numba.njit(cache=True, nogil=True, fastmath=_FAST)
    def _linear_backward(grad_out, grad_batch_major, out, x, weight_t, u, h0, activation, clip,
                         grad_x, grad_weight_t, grad_bias, grad_u, grad_h0):  # pragma: no cover - compiled
        steps, batch, hidden = out.shape
        inputs = x.shape[2]
        zero, one, clip = out.dtype.type(0), out.dtype.type(1), out.dtype.type(clip)
        carry = np.zeros((batch, hidden), dtype=out.dtype)      # u * delta_{t+1}
        partial_u = np.zeros((batch, hidden), dtype=out.dtype)  # per-row sums, reduced at the end
        partial_b = np.zeros((batch, hidden), dtype=out.dtype)
        partial_w = np.zeros((batch, inputs, hidden), dtype=out.dtype)
        delta = np.empty(hidden, dtype=out.dtype)
        block = max(1, WARM_ELEMENTS // max(1, batch * hidden))
        sink = zero
        stop = steps
        while stop > 0:  # blocks of steps from the last down, each warmed upwards first (see indrnn_cpu)
            start = max(0, stop - block)
            sink += warm_block(grad_out, grad_batch_major, out, out, start, stop)
            for t in range(stop - 1, start - 1, -1):
                previous = out[t - 1] if t > 0 else h0
                for b in range(batch):
                    g_t = grad_out[b, t] if grad_batch_major else grad_out[t, b]
                    h_t, c_b = out[t, b], carry[b]
                    h_prev, p_u, p_b = previous[b], partial_u[b], partial_b[b]
                    for j in range(hidden):  # one pass for everything that needs no input (see indrnn_cpu)
                        d_j = delta_of(g_t[j], c_b[j], h_t[j], activation, zero, one, clip)
                        delta[j] = d_j
                        p_u[j] += d_j * h_prev[j]
                        p_b[j] += d_j
                        c_b[j] = d_j * u[j]
                    x_tb, g_x = x[t, b], grad_x[t, b]
                    for i in range(inputs):
                        w_i, p_w, x_i = weight_t[i], partial_w[b, i], x_tb[i]
                        total = zero
                        for j in range(hidden):
                            total += delta[j] * w_i[j]
                            p_w[j] += delta[j] * x_i
                        g_x[i] = total
            stop = start
        grad_h0[:] = carry
        grad_u[:] = partial_u.sum(axis=0)
        grad_bias[:] = partial_b.sum(axis=0)
        grad_weight_t[:] = partial_w.sum(axis=0)
        return sink


def fused_projection_applies(x: torch.Tensor, activation: str) -> bool:
    """Whether :class:`IndRNNLinearRecurrenceCPU` handles this input: a CPU float32/float64 tensor
    with at most ``FUSED_MAX_INPUTS`` features, relu or identity, and numba installed."""
    return (numba_available() and x.device.type == "cpu" and x.dtype in NUMBA_DTYPES
            and x.shape[-1] <= FUSED_MAX_INPUTS and activation in FUSED_ACTIVATIONS)


class IndRNNLinearRecurrenceCPU(torch.autograd.Function):
    """h_t = act(W x_t + b + u * h_{t-1}) with a hand-written backward (see the module docstring).

    Inputs: x (T, B, I), weight (H, I), bias (H,) or None, u (H,), h0 (B, H), activation
    ("relu" or "identity"), grad_clip (None, or c: dL/da_t clamped to [-c, c] at every step).
    Output: all states (T, B, H). Check :func:`fused_projection_applies` first.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, u, h0, activation: str, grad_clip: float | None = None):
        x_array, weight_t, u_array, h0_array = (contiguous_array(t) for t in (x, weight.t(), u, h0))
        bias_array = contiguous_array(bias) if bias is not None else np.zeros_like(u_array)
        steps, batch = x.shape[:2]
        # numpy's allocator asks for huge pages: first-touch faults would otherwise cost as much as the loop.
        out = torch.from_numpy(np.empty((steps, batch, u_array.shape[0]), dtype=u_array.dtype))
        _linear_forward(x_array, weight_t, bias_array, u_array, h0_array, ACTIVATION_CODES[activation], out.numpy())
        ctx.save_for_backward(x, weight, u, h0, out)
        ctx.activation_code, ctx.has_bias = ACTIVATION_CODES[activation], bias is not None
        ctx.clip = clip_code(grad_clip)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, u, h0, out = ctx.saved_tensors
        x_array, weight_t, u_array, h0_array = (contiguous_array(t) for t in (x, weight.t(), u, h0))
        grad_x, grad_weight_t = np.empty_like(x_array), np.empty_like(weight_t)
        grad_bias, grad_u, grad_h0 = np.empty_like(u_array), np.empty_like(u_array), np.empty_like(h0_array)
        _linear_backward(*gradient_rows(grad_out), out.numpy(), x_array, weight_t, u_array, h0_array,
                         ctx.activation_code, ctx.clip, grad_x, grad_weight_t, grad_bias, grad_u, grad_h0)
        return (torch.from_numpy(grad_x), torch.from_numpy(grad_weight_t).t(),
                torch.from_numpy(grad_bias) if ctx.has_bias else None,
                torch.from_numpy(grad_u), torch.from_numpy(grad_h0), None, None)
