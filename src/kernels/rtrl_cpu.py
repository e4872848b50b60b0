"""The RTRL sensitivity update of :mod:`src.kernels.rtrl` as one numba loop on the CPU.

Why: the plain loop issues about six PyTorch operations per step, each a pass over the (B, H, I)
weight sensitivities or a (B, H) block plus a dispatch of a few microseconds; at small widths and
long sequences (the regime RTRL is for) the dispatch dominates. Here one compiled loop runs the
whole chunk: for each (sample, unit) the sensitivity row S[b, j, :] (I values) and the per-unit
sensitivities stay in registers/L1 across all K steps, and the weight gradient is accumulated only
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
        for b in range(batch):
            for j in range(hidden):
                row, grad_row = s_weight[b, j], grad_weight[j]
                for t in range(steps):
                    c, e, x = carry[t, b, j], gain[t, b, j], inputs[t, b]
                    g = grad_h[t, b, j] if has_grad else zero
                    for p in range(n_diag):
                        s = c * s_diag[p, b, j] + direct[p, t, b, j]
                        s_diag[p, b, j] = s
                        grad_diag[p, j] += g * s
                    if g != zero:
                        for i in range(n_inputs):
                            s = c * row[i] + e * x[i]
                            row[i] = s
                            grad_row[i] += g * s
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
