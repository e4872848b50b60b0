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
    from src.kernels.indrnn_cpu import WARM_BELOW_BYTES, block_bottom, carry_into, warm_block

FUSED_ACTIVATIONS = ("relu", "identity")
# Above this many inputs a separate BLAS projection is faster than the fused per-element loops.
FUSED_MAX_INPUTS = 8

if numba is not None:
    import numpy as np

    # Reassociation lets LLVM vectorise the sums over units; NaN and inf semantics stay IEEE, so
    # a diverging run still shows up as a NaN loss.
    _FAST = {"reassoc", "contract"}

    @numba.njit(cache=True, nogil=True, fastmath=_FAST)
    def linear_forward_steps(x, weight_t, bias, u, h_in, activation, start, stop, out):  # pragma: no cover
        """out[t] = act(W x[t] + b + u * out[t-1]) for start <= t < stop, from out[start-1] = h_in (B, H);
        x (T, B, I), weight_t = W^T (I, H), bias (H,). The scan runs its pieces with it."""
        batch, inputs = x.shape[1], x.shape[2]
        hidden = u.shape[0]
        zero = out.dtype.type(0)
        for t in range(start, stop):
            previous = out[t - 1] if t > start else h_in
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
    def linear_backward_steps(grad_out, batch_major, out, x, weight_t, u, h0, activation, clip, start, stop,
                              delta_next, grad_x, partial_w, partial_b, partial_u, delta_first):  # pragma: no cover
        """The backward loop over steps stop-1 down to start, from delta_stop = ``delta_next`` (B, H): writes
        grad_x[t] = W^T delta_t; adds delta_t x_t^T into partial_w (B, I, H), delta_t into partial_b and
        delta_t h_{t-1} into partial_u (B, H); leaves delta_start in ``delta_first`` (B, H). relu (activation
        0) or identity. Its loops are written as indrnn_cpu.backward_steps' (see the comment there)."""
        batch, hidden = out.shape[1], out.shape[2]
        inputs = x.shape[2]
        zero, clip = out.dtype.type(0), out.dtype.type(clip)
        identity = activation != 0
        carry = carry_into(delta_next, u, delta_first)  # u * delta_{t+1}
        delta = np.empty(hidden, dtype=out.dtype)
        sink = zero
        top = stop
        while top > start:  # as indrnn_cpu.backward_steps: blocks from the last step down, some warmed first
            bottom = block_bottom(top, start, batch * hidden)
            if batch_major or batch * hidden * out.itemsize < WARM_BELOW_BYTES:
                sink += warm_block(grad_out, batch_major, out, out, bottom, top)
            for t in range(top - 1, bottom - 1, -1):
                for b in range(batch):
                    # delta_t = clip((g_t + u delta_{t+1}) act'(a_t)), as indrnn_cpu.backward_steps (relu or identity)
                    for j in range(hidden):
                        value = (grad_out[b, t, j] if batch_major else grad_out[t, b, j]) + carry[b, j]
                        delta[j] = value if (out[t, b, j] > zero) | identity else zero
                    if clip > zero:  # two selects: a NaN stays NaN
                        for j in range(hidden):
                            value = delta[j]
                            value = clip if value > clip else value
                            delta[j] = -clip if value < -clip else value
                    for j in range(hidden):
                        carry[b, j] = delta[j] * u[j]
                    if t > 0:
                        for j in range(hidden):
                            partial_u[b, j] += delta[j] * out[t - 1, b, j]
                    else:
                        for j in range(hidden):
                            partial_u[b, j] += delta[j] * h0[b, j]
                    for j in range(hidden):
                        partial_b[b, j] += delta[j]
                    for i in range(inputs):
                        total = zero
                        for j in range(hidden):
                            total += delta[j] * weight_t[i, j]
                        for j in range(hidden):
                            partial_w[b, i, j] += delta[j] * x[t, b, i]
                        grad_x[t, b, i] = total
                    if t == start:
                        delta_first[b] = delta
            top = bottom
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
        linear_forward_steps(x_array, weight_t, bias_array, u_array, h0_array, ACTIVATION_CODES[activation], 0, steps,
                             out.numpy())
        ctx.save_for_backward(x, weight, u, h0, out)
        ctx.activation_code, ctx.has_bias = ACTIVATION_CODES[activation], bias is not None
        ctx.clip = clip_code(grad_clip)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, u, h0, out = ctx.saved_tensors
        x_array, weight_t, u_array, h0_array = (contiguous_array(t) for t in (x, weight.t(), u, h0))
        grad_x, partial_w = np.empty_like(x_array), np.zeros((h0_array.shape[0],) + weight_t.shape, dtype=u_array.dtype)
        partial_b, partial_u, delta_first = np.zeros_like(h0_array), np.zeros_like(h0_array), np.empty_like(h0_array)
        linear_backward_steps(*gradient_rows(grad_out), out.numpy(), x_array, weight_t, u_array, h0_array,
                              ctx.activation_code, ctx.clip, 0, x_array.shape[0], np.zeros_like(h0_array), grad_x,
                              partial_w, partial_b, partial_u, delta_first)
        return (torch.from_numpy(grad_x), torch.from_numpy(partial_w.sum(axis=0)).t(),
                torch.from_numpy(partial_b.sum(axis=0)) if ctx.has_bias else None,
                torch.from_numpy(partial_u.sum(axis=0)), torch.from_numpy(delta_first * u_array), None, None)
