"""The chunked CPU scan with the input projection inside its loops, for few inputs (I <= 8, relu or identity).

As :mod:`src.kernels.indrnn_linear_cpu` does step by step, z = W x + b and dL/dz are never stored, so
the scan moves no more memory than the fused sequential kernel. The schedule is
:func:`src.kernels.indrnn_scan.chunk_cpu.chunked_scan`'s; each piece runs the fused sequential kernel's
loops (:func:`~src.kernels.indrnn_linear_cpu.linear_forward_steps`,
:func:`~src.kernels.indrnn_linear_cpu.linear_backward_steps`); a piece's forward map is composed from
the projected rows (:func:`linear_compose`), its backward map needs no input (the plain scan's).
"""
from __future__ import annotations

import torch

from src.kernels.indrnn_cpu import ACTIVATION_CODES, clip_code, contiguous_array, gradient_rows, numba
from src.kernels.indrnn_scan.chunk_cpu import chunked_scan, schedule
from src.kernels.indrnn_scan.naive import check_activation

if numba is not None:
    import numpy as np

    from src.kernels.indrnn_linear_cpu import linear_backward_steps, linear_forward_steps
    from src.kernels.indrnn_scan.chunk_cpu import _compose_forward_rows, backward_compose, open_map

    @numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def linear_compose(x, weight_t, bias, u, activation, start, stop, mapping):  # pragma: no cover - compiled
        """chunk_cpu.forward_compose with z_t = W x_t + b computed row by row (x (T, B, I), weight_t (I, H))."""
        has_negative = open_map(mapping, u, activation, stop - start)
        _compose_forward_rows(x, weight_t, bias, u, activation, has_negative, True, start, stop, mapping)


class IndRNNLinearScanCPU(torch.autograd.Function):
    """h_t = act(W x_t + b + u * h_{t-1}) (relu or identity, I <= 8) by the chunked scan with the
    projection inside its loops (never storing z or dL/dz), as
    :class:`src.kernels.indrnn_linear_cpu.IndRNNLinearRecurrenceCPU` does step by step.

    Inputs: x (T, B, I), weight (H, I), bias (H,) or None, u (H,), h0 (B, H), activation, grad_clip.
    Output: all states (T, B, H). Check ``fused_projection_applies`` first.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, u, h0, activation: str, grad_clip: float | None = None):
        check_activation(activation)
        code = ACTIVATION_CODES[activation]
        x_array, weight_t, u_array, h0_array = (contiguous_array(t) for t in (x, weight.t(), u, h0))
        bias_array = contiguous_array(bias) if bias is not None else np.zeros_like(u_array)
        steps, batch = x_array.shape[:2]
        out = np.empty((steps, batch, u_array.shape[0]), dtype=u_array.dtype)
        threads, pieces = schedule(steps, backward=False)
        states = np.empty((len(pieces) + 1,) + h0_array.shape, dtype=out.dtype)
        states[0] = h0_array
        maps = np.empty((len(pieces), 4) + h0_array.shape, dtype=out.dtype)
        head = (x_array, weight_t, bias_array, u_array)
        chunked_scan(threads, pieces, states,
                     lambda k: linear_forward_steps(*head, states[k], code, *pieces[k], out),
                     lambda k: out[pieces[k][1] - 1],
                     lambda k: linear_compose(*head, code, *pieces[k], maps[k]), maps)
        out = torch.from_numpy(out)
        ctx.save_for_backward(x, weight, u, h0, out)
        ctx.activation_code, ctx.has_bias, ctx.clip = code, bias is not None, clip_code(grad_clip)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, u, h0, out = ctx.saved_tensors
        x_array, weight_t, u_array, h0_array = (contiguous_array(t) for t in (x, weight.t(), u, h0))
        out_array = out.numpy()
        grad_rows, batch_major = gradient_rows(grad_out)
        threads, pieces = schedule(out_array.shape[0], backward=True)
        count, shape, dtype = len(pieces), h0_array.shape, out_array.dtype
        grad_x = np.empty_like(x_array)
        partial_w = np.zeros((count, shape[0]) + weight_t.shape, dtype=dtype)
        partial_b, partial_u = np.zeros((count,) + shape, dtype=dtype), np.zeros((count,) + shape, dtype=dtype)
        states = np.zeros((count + 1,) + shape, dtype=dtype)  # states[k]: delta entering piece k from above
        delta_first, maps = np.empty((count,) + shape, dtype=dtype), np.empty((count, 4) + shape, dtype=dtype)
        common = (grad_rows, batch_major, out_array)
        chunked_scan(threads, pieces, states,
                     lambda k: linear_backward_steps(*common, x_array, weight_t, u_array, h0_array, ctx.activation_code,
                                                     ctx.clip, *pieces[k], states[k], grad_x, partial_w[k],
                                                     partial_b[k], partial_u[k], delta_first[k]),
                     lambda k: delta_first[k],
                     lambda k: backward_compose(*common, u_array, ctx.activation_code, ctx.clip, *pieces[k], maps[k]),
                     maps)
        grad_weight = torch.from_numpy(partial_w.sum(axis=(0, 1))).t()
        grad_bias = torch.from_numpy(partial_b.sum(axis=(0, 1))) if ctx.has_bias else None
        return (torch.from_numpy(grad_x), grad_weight, grad_bias, torch.from_numpy(partial_u.sum(axis=(0, 1))),
                torch.from_numpy(delta_first[-1] * u_array), None, None)
