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
* ``"scan"``: the clamp-affine scan, parallel over time as well (relu and identity; tanh has no
  scan and runs on the sequential kernel, with a warning): on CPU
  :class:`src.kernels.indrnn_scan.chunk_cpu.IndRNNScanCPU` (threads along time), on CUDA
  :class:`src.kernels.indrnn_scan.chunk_triton.IndRNNScanTriton`, else (no numba/triton, other dtypes)
  the log-depth scan in plain PyTorch, :class:`src.kernels.indrnn_scan.naive.IndRNNScanTorch`.
* ``"auto"``: the fused CPU kernel for CPU tensors; on CUDA the Triton kernel where triton is
  installed and the dtype is supported, else the reference loop. On CPU with 4 threads or more,
  "auto" takes the scan for long sequences with few columns (:func:`prefer_scan`), where the
  sequential kernel can use one core only.

``indrnn_linear_recurrence(x, weight, bias, u, h0, ...)`` adds the input projection: on the
``"cpu"`` backend with few inputs (I <= 8, relu or identity) projection and recurrence run as one
kernel (:mod:`src.kernels.indrnn_linear_cpu`; on ``"scan"``
:class:`src.kernels.indrnn_scan.chunk_linear_cpu.IndRNNLinearScanCPU`), else as ``F.linear`` followed by the recurrence.

``clockwork_recurrence(x, weight_ih, bias, weight_hh, h0, periods, ...)`` is the Clockwork RNN
(:mod:`src.kernels.clockwork`) with the same vocabulary: ``"auto"`` and ``"fused"`` (its
hand-written backward, plain PyTorch, any device) or ``"reference"``. ``"fused"`` for IndRNN means
the hand-written kernel for the device ("cpu" or "triton"). Every layer validates its ``backend``
against :data:`BACKENDS`.
"""
from __future__ import annotations

import warnings

import torch
from torch.nn import functional as F

from src.checks import check_choice
from src.kernels.clockwork import ClockworkFunction, clockwork_mask, clockwork_reference
from src.kernels.clockwork import check_recurrence_args as check_clockwork_arguments
from src.kernels.indrnn_cpu import IndRNNRecurrenceCPU, numba_available
from src.kernels.indrnn_linear_cpu import IndRNNLinearRecurrenceCPU, fused_projection_applies
from src.kernels.indrnn_scan import (IndRNNLinearScanCPU, IndRNNScanCPU, IndRNNScanTorch, cpu_scan_applies,
                                     parallel_threads, scan_applies)
from src.kernels.indrnn_scan.chunk_triton import IndRNNScanTriton, triton_scan_applies
from src.kernels.indrnn_triton import SUPPORTED_DTYPES as TRITON_DTYPES
from src.kernels.indrnn_triton import IndRNNRecurrenceTriton, triton_available
from src.kernels.reference import ACTIVATIONS, check_grad_clip, indrnn_recurrence_reference

BACKENDS = ("auto", "fused", "cpu", "cpu_torch", "triton", "scan", "reference")
# The backends each recurrence has besides "auto", "fused" and "reference".
KERNEL_BACKENDS = {"indrnn": ("cpu", "cpu_torch", "triton", "scan"), "clockwork": ("triton",),
                   # src/kernels/dense_triton.py, chosen by the layers (LeakyRNN, SkipRNN, ClockworkRNN backend=)
                   "leaky": ("triton",), "skip": ("triton",), "jordan": ("triton",)}  # + src/kernels/jordan_triton.py


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32,
                    kernel: str = "indrnn") -> str:
    """Map "auto" to the fastest backend for ``device`` and ``dtype``; reject impossible choices.

    ``kernel`` ("indrnn" or "clockwork") names the recurrence; Clockwork's one fused kernel is plain
    PyTorch ("fused", any device), IndRNN's are "cpu"/"cpu_torch" (CPU) and "triton" (CUDA).
    """
    check_choice("recurrence backend", backend, BACKENDS)
    if kernel == "clockwork":
        if backend in KERNEL_BACKENDS["indrnn"]:
            raise ValueError(f"backend {backend!r} is an IndRNN kernel; Clockwork takes one of "
                             f"('auto', 'fused', 'reference')")
        return "reference" if backend == "reference" else "fused"
    if backend == "fused":  # the hand-written backward for this device, or a one-line error
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda" and triton_available() and dtype in TRITON_DTYPES:
            return "triton"
        raise ValueError(f"no fused IndRNN kernel for {device} {dtype}; use backend='auto' or 'reference'")
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
    check_choice("IndRNN activation", activation, ACTIVATIONS)


# "auto" on CPU takes the chunked scan for long sequences with few columns (B*H), where the sequential
# kernel leaves all cores but one idle, and only with SCAN_MIN_THREADS threads or more: composing a
# step costs about half a step (r = 0.5 at B=1, H=128; above 1 at B=64), so 2 threads can at best
# reach 0.67x of the sequential time and measured no gain on the loaded 2-core VM, while 4 threads
# predict 0.36x (src/kernels/README.md; benchmarks/recurrence.py --shape-set stream).
SCAN_MIN_STEPS = 20_000
SCAN_MAX_COLUMNS = 1024
SCAN_MIN_THREADS = 4


def prefer_scan(steps: int, columns: int, device: torch.device, activation: str) -> bool:
    """Whether "auto" runs the scan: CPU, relu/identity, T >= SCAN_MIN_STEPS, B*H <= SCAN_MAX_COLUMNS and
    at least SCAN_MIN_THREADS threads (``numba.get_num_threads()``)."""
    return (device.type == "cpu" and scan_applies(activation) and steps >= SCAN_MIN_STEPS
            and columns <= SCAN_MAX_COLUMNS and parallel_threads(steps) >= SCAN_MIN_THREADS)


def _choose_backend(backend: str, x: torch.Tensor, hidden: int, activation: str) -> str:
    """The backend for inputs x (T, B, *) with ``hidden`` units: "auto" may take the scan (see
    :func:`prefer_scan`); "scan" with tanh warns once and takes the sequential kernel."""
    if backend == "auto" and prefer_scan(x.shape[0], x.shape[1] * hidden, x.device, activation):
        return "scan"
    chosen = resolve_backend(backend, x.device, x.dtype)
    if chosen == "scan" and not scan_applies(activation):
        warnings.warn(f"IndRNN backend 'scan': {activation} is not clamp-affine, so it has no exact scan; "
                      "running the sequential kernel instead", stacklevel=3)
        chosen = resolve_backend("auto", x.device, x.dtype)
    return chosen


def _scan(z: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, activation: str, grad_clip: float | None):
    """The scan for the device: numba threads on CPU, Triton on CUDA, else the log-depth torch scan."""
    if cpu_scan_applies(z, activation):
        return IndRNNScanCPU.apply(z, u, h0, activation, grad_clip)
    if z.is_cuda and triton_available() and triton_scan_applies(z, activation):
        return IndRNNScanTriton.apply(z, u, h0, activation, grad_clip)
    return IndRNNScanTorch.apply(z, u, h0, activation, grad_clip)


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
    chosen = _choose_backend(backend, z, z.shape[-1], activation)
    if chosen == "scan":
        return _scan(z, u, h0, activation, grad_clip)
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
    chosen = _choose_backend(backend, x, weight.shape[0], activation)
    if chosen == "cpu" and fused_projection_applies(x, activation):
        return IndRNNLinearRecurrenceCPU.apply(x, weight, bias, u, h0, activation, grad_clip)
    if chosen == "scan" and fused_projection_applies(x, activation):  # few inputs: the projection in the scan
        return IndRNNLinearScanCPU.apply(x, weight, bias, u, h0, activation, grad_clip)
    return indrnn_recurrence(F.linear(x, weight, bias), u, h0, activation, chosen, grad_clip)


def clockwork_recurrence(x: torch.Tensor, weight_ih: torch.Tensor, bias: torch.Tensor | None,
                         weight_hh: torch.Tensor, h0: torch.Tensor, periods, nonlinearity: str = "tanh",
                         time_origin: int = 0, backend: str = "auto", mask: torch.Tensor | None = None) -> torch.Tensor:
    """All hidden states (T, B, H) of the Clockwork RNN (see :mod:`src.kernels.clockwork`).

    Args:
        x: inputs (T, B, I); weight_ih: W_x (H, I); bias: b (H,) or None.
        weight_hh: W_h (H, H), multiplied by ``mask`` (default: block-upper-triangular).
        h0: the state before the first step (B, H).
        periods: one clock period per module (module size H / len(periods)).
        nonlinearity: "tanh", "relu" or "identity".
        time_origin: absolute step number of x[0] (module i runs when step mod periods[i] == 0).
        backend: "auto"/"fused" (:class:`ClockworkFunction`) or "reference" (:func:`clockwork_reference`).
    """
    chosen = resolve_backend(backend, x.device, x.dtype, kernel="clockwork")
    if chosen == "reference":
        return clockwork_reference(x, weight_ih, bias, weight_hh, h0, periods, nonlinearity, time_origin, mask)
    check_clockwork_arguments(x, weight_ih, bias, weight_hh, h0, periods, nonlinearity, time_origin)
    if mask is None:
        mask = clockwork_mask(weight_hh.shape[0], len(periods), x.device)
    # Masking through autograd: the masked-out entries of W_h get exactly zero gradient.
    return ClockworkFunction.apply(x, weight_ih, bias, weight_hh * mask, h0, tuple(periods), time_origin,
                                   nonlinearity)


__all__ = ["ACTIVATIONS", "BACKENDS", "clockwork_recurrence", "indrnn_linear_recurrence", "indrnn_recurrence", "indrnn_recurrence_reference",
           "numba_available", "triton_available"]
