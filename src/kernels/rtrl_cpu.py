"""The RTRL sensitivity update of :mod:`src.kernels.rtrl` as one numba loop on the CPU.

Why: the plain loop issues about six PyTorch operations per step, each a pass over the (B, H, I)
weight sensitivities or a (B, H) block plus a dispatch of a few microseconds; at small widths and
long sequences (the regime RTRL is for) the dispatch dominates. Here one compiled loop runs the
whole chunk, time-outer over contiguous (B, H) rows (so every read streams in memory order, as in
:mod:`src.kernels.indrnn_cpu`; a unit-outer order that kept S[b, j, :] in registers across steps
was 10x slower, one cache miss per coefficient read), and the weight gradient is accumulated only
at steps where a loss arrives (g != 0). The loops follow :mod:`src.kernels.indrnn_cpu`'s numba
style: compiled once per dtype, cached on disk, constants in the array's dtype; without numba,
:func:`numba_chunk_applies` is False and the plain loop runs instead.
"""
from __future__ import annotations

import torch

from src.kernels.indrnn_cpu import NUMBA_DTYPES, numba_available

if numba_available():
    import numba
    import numpy as np

    @numba.njit(cache=True, nogil=True)
    def _numba_chunk(carry, gain, inputs, direct, grad_h, has_grad, s_diag, s_weight, grad_diag,
                     grad_weight):  # pragma: no cover - compiled
        steps, batch, hidden = carry.shape
        n_inputs, n_diag = inputs.shape[2], direct.shape[0]
        zero = carry.dtype.type(0)
        for t in range(steps):
            for b in range(batch):
                c_row, e_row, x = carry[t, b], gain[t, b], inputs[t, b]
                for p in range(n_diag):
                    s_row, d_row = s_diag[p, b], direct[p, t, b]
                    for j in range(hidden):
                        s_row[j] = c_row[j] * s_row[j] + d_row[j]
                    if has_grad:
                        g_row, acc = grad_h[t, b], grad_diag[p]
                        for j in range(hidden):
                            acc[j] += g_row[j] * s_row[j]
                for j in range(hidden):
                    c, e = c_row[j], e_row[j]
                    row = s_weight[b, j]
                    g = grad_h[t, b, j] if has_grad else zero
                    if g != zero:
                        grad_row = grad_weight[j]
                        for i in range(n_inputs):
                            value = c * row[i] + e * x[i]
                            row[i] = value
                            grad_row[i] += g * value
                    else:
                        for i in range(n_inputs):
                            row[i] = c * row[i] + e * x[i]


def numba_chunk_applies(tensor: torch.Tensor) -> bool:
    """True when the numba loop can update sensitivities stored like ``tensor`` (CPU, float32/64)."""
    return numba_available() and tensor.device.type == "cpu" and tensor.dtype in NUMBA_DTYPES


def _writable_array(tensor: torch.Tensor):
    if not tensor.is_contiguous():
        raise ValueError("RTRL numba loop: sensitivities and gradient accumulators must be contiguous")
    return tensor.detach().numpy()


def sensitivity_chunk_numba(carry, gain, inputs, direct, grad_h, s_diag, s_weight, grad_diag, grad_weight) -> None:
    """:func:`src.kernels.rtrl.sensitivity_chunk` as one compiled loop (same arguments, updated in place)."""
    dtype = s_weight.dtype
    read = [np.ascontiguousarray(t.detach().to(dtype).numpy()) for t in (carry, gain, inputs, direct)]
    grad = (np.ascontiguousarray(grad_h.detach().to(dtype).numpy()) if grad_h is not None
            else np.zeros((1, 1, 1), dtype=read[0].dtype))
    _numba_chunk(*read, grad, grad_h is not None,
                 *(_writable_array(t) for t in (s_diag, s_weight, grad_diag, grad_weight)))
