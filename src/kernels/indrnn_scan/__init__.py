"""IndRNN in parallel over time, exactly: the clamp-affine scan (derivation: src/kernels/README.md).

A relu or identity IndRNN step h_t = act(u * h_{t-1} + z_t) is the map h -> clamp(a h + b, lo, hi);
such maps are closed under composition, so all states are an inclusive scan over 4-tuples applied to
h0, and the backward pass is again such a scan, from the last step down. Side by side, as
flash-linear-attention lays out an operator (naive | fused recurrent | chunk; the fused recurrent
kernels are the sequential ones, :mod:`src.kernels.indrnn_cpu`, :mod:`src.kernels.indrnn_linear_cpu`,
:mod:`src.kernels.indrnn_triton`):

* :mod:`.naive`: :class:`IndRNNScanTorch`, the log-depth scan in plain PyTorch (any dtype and device),
  the reference the tests check the others with; :func:`compose`, the algebra.
* :mod:`.chunk_cpu`: :class:`IndRNNScanCPU`, the chunked scan on CPU threads along time, and its
  schedule (:func:`~.chunk_cpu.chunked_scan`).
* :mod:`.chunk_linear_cpu`: :class:`IndRNNLinearScanCPU`, the same with the input projection inside its
  loops for few inputs (I <= 8).
* :mod:`.chunk_triton`: :class:`~.chunk_triton.IndRNNScanTriton`, the Triton chunk kernel (CUDA, or
  Triton's CPU interpreter).

tanh is not clamp-affine: :func:`scan_applies` is False and the dispatcher (src/kernels/__init__.py)
uses the sequential kernel.
"""
from src.kernels.indrnn_scan.chunk_cpu import IndRNNScanCPU, cpu_scan_applies, parallel_threads
from src.kernels.indrnn_scan.chunk_linear_cpu import IndRNNLinearScanCPU
from src.kernels.indrnn_scan.naive import SCAN_ACTIVATIONS, IndRNNScanTorch, compose, scan_applies

__all__ = ["IndRNNLinearScanCPU", "IndRNNScanCPU", "IndRNNScanTorch", "SCAN_ACTIVATIONS", "compose",
           "cpu_scan_applies", "parallel_threads", "scan_applies"]
