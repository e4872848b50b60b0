"""The UnICORNN recurrence (Rusch & Mishra, ICML 2021): reference loop, fused CPU kernel, dispatch.

Every unit j is an independent undamped oscillator driven by its input x_t (already projected),
advanced by symplectic Euler with its own learned time step s_j = dt * sigmoid(c_j):

    z_t = z_{t-1} - s * (tanh(w * y_{t-1} + x_t) + alpha * y_{t-1})
    y_t = y_{t-1} + s * z_t                                   (the output is y)

Shapes: x (T, B, H), w (H,), c (H,), y0 (B, H), z0 (B, H) -> y (T, B, H) and z_{T-1} (B, H), the
velocity to carry into the next chunk. ``dt`` and ``alpha`` are fixed floats.

Backward pass (hand-written, one loop from t = T-1 down to 0), with G_t the incoming gradient of y_t
and Y, Z the gradients carried into y_t and z_t from the later steps (after the last step: 0 and the
incoming gradient of z_{T-1}):

    Y   = G_t + Y                      (all of dL/dy_t)
    Z   = Z + s * Y                    (all of dL/dz_t: y_t = y_{t-1} + s z_t)
    ds += Y * z_t - Z * g_t            with g_t = tanh(a_t) + alpha * y_{t-1}, a_t = w y_{t-1} + x_t
    d   = -s * Z * (1 - tanh(a_t)^2)   (dL/da_t)
    dL/dx_t = d,   dw += d * y_{t-1}
    Y   = Y - alpha * s * Z + w * d    (dL/dy_{t-1} from step t);  Z stays (dL/dz_{t-1})

then dL/dy0 = Y, dL/dz0 = Z and dL/dc = ds * dt * sigmoid(c) * (1 - sigmoid(c)), summed over the
batch. The CPU kernel saves tanh(a_t) from the forward pass (in place of x: no exp to redo); the
Triton kernel recomputes it from the saved y and x.

Backends: ``reference`` (:func:`unicornn_recurrence_reference`, autograd, any device and dtype),
``cpu`` (:class:`UnICORNNRecurrenceCPU`, numba loops, float32/float64), ``triton``
(:mod:`src.kernels.unicornn_triton`, CUDA), ``fused`` (the fused kernel for the device and dtype, or a
one-line error) and ``auto`` (that kernel, or the reference where there is none: no numba, CPU
half precision).
"""
from __future__ import annotations

import torch

from src.checks import check_choice
from src.kernels.indrnn_cpu import contiguous_array, gradient_rows, numba_available

try:
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None

BACKENDS = ("auto", "fused", "cpu", "triton", "reference")
NUMBA_DTYPES = (torch.float32, torch.float64)


def unicornn_recurrence_reference(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, y0: torch.Tensor,
                                  z0: torch.Tensor, dt: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence of the module docstring as an autograd loop: (y (T, B, H), z_{T-1} (B, H))."""
    step = dt * torch.sigmoid(c)
    y, z = y0, z0
    ys = []
    for x_t in x.unbind(0):
        z = z - step * (torch.tanh(w * y + x_t) + alpha * y)
        y = y + step * z
        ys.append(y)
    return (torch.stack(ys) if ys else x.new_zeros(x.shape)), z


if numba is not None:

    @numba.njit(inline="always")
    def _tanh(a, one, two):  # pragma: no cover - compiled
        """tanh from one exp: 4x faster than numba's libm tanh here (no SVML), error ~1e-16 (float64) /
        2e-7 (float32); exp overflowing to inf gives exactly 1, and exp(-inf) = 0 gives -1 (no NaN).
        ``one`` and ``two`` carry the array's dtype (a float64 literal would promote float32 work)."""
        return one - two / (one + np.exp(two * a))

    # Loops run time-outer over the whole (B, H) block, as the IndRNN kernels do: every pass streams
    # through memory in order and the carried state (2 B*H values) stays in cache. (Unit-outer loops,
    # one oscillator over all T at a time, stride B*H elements per step and ran ~3x slower.)
    @numba.njit(cache=True, nogil=True)
    def _numba_forward(x, w, step, y0, z0, alpha, ys, zs, fs):  # pragma: no cover - compiled
        steps, batch, hidden = x.shape
        one, two = x.dtype.type(1), x.dtype.type(2)
        for t in range(steps):
            for b in range(batch):
                x_t, y_t, z_t, f_t = x[t, b], ys[t, b], zs[t, b], fs[t, b]
                y_prev = ys[t - 1, b] if t > 0 else y0[b]
                z_prev = zs[t - 1, b] if t > 0 else z0[b]
                for j in range(hidden):
                    y = y_prev[j]
                    f = _tanh(w[j] * y + x_t[j], one, two)
                    f_t[j] = f
                    z = z_prev[j] - step[j] * (f + alpha * y)
                    z_t[j] = z
                    y_t[j] = y + step[j] * z

    @numba.njit(cache=True, nogil=True)
    def _numba_backward(grad, batch_major, grad_z_last, fs, w, step, y0, ys, zs, alpha, grad_x, grad_w, grad_step,
                        grad_y0, grad_z0):  # pragma: no cover - compiled
        steps, batch, hidden = fs.shape
        one = fs.dtype.type(1)
        carry_y = np.zeros((batch, hidden), dtype=fs.dtype)  # dL/dy_t from the later steps
        carry_z = grad_z_last.copy()                          # dL/dz_t from the later steps
        partial_w = np.zeros((batch, hidden), dtype=fs.dtype)
        partial_step = np.zeros((batch, hidden), dtype=fs.dtype)
        for t in range(steps - 1, -1, -1):
            for b in range(batch):
                g_t = grad[b, t] if batch_major else grad[t, b]
                f_t, z_t, d_t = fs[t, b], zs[t, b], grad_x[t, b]
                y_prev = ys[t - 1, b] if t > 0 else y0[b]
                c_y, c_z, p_w, p_s = carry_y[b], carry_z[b], partial_w[b], partial_step[b]
                for j in range(hidden):
                    s, u, y = step[j], w[j], y_prev[j]
                    f = f_t[j]
                    total_y = g_t[j] + c_y[j]
                    total_z = c_z[j] + s * total_y
                    p_s[j] += total_y * z_t[j] - total_z * (f + alpha * y)
                    d = -s * total_z * (one - f * f)
                    d_t[j] = d
                    p_w[j] += d * y
                    c_y[j] = total_y - alpha * s * total_z + u * d
                    c_z[j] = total_z
        grad_y0[:] = carry_y
        grad_z0[:] = carry_z
        grad_w[:] = partial_w.sum(axis=0)
        grad_step[:] = partial_step.sum(axis=0)


def _check_inputs(x, w, c, y0, z0) -> None:
    if x.dim() != 3 or w.shape != x.shape[2:] or c.shape != x.shape[2:] or y0.shape != x.shape[1:] \
            or z0.shape != x.shape[1:]:
        raise ValueError(f"UnICORNN recurrence: expected x (T, B, H), w (H,), c (H,), y0 (B, H), z0 (B, H); got "
                         f"{tuple(x.shape)}, {tuple(w.shape)}, {tuple(c.shape)}, {tuple(y0.shape)}, {tuple(z0.shape)}")


class UnICORNNRecurrenceCPU(torch.autograd.Function):
    """Fused UnICORNN recurrence on CPU (numba), with the backward pass of the module docstring.

    ``UnICORNNRecurrenceCPU.apply(x, w, c, y0, z0, dt, alpha)``: x (T, B, H), w (H,), c (H,),
    y0, z0 (B, H) -> (y (T, B, H), z_{T-1} (B, H)); gradients for x, w, c, y0 and z0. Needs numba
    and float32 or float64 tensors (:func:`unicornn_recurrence` checks).
    """

    @staticmethod
    def forward(ctx, x, w, c, y0, z0, dt: float, alpha: float):
        step = dt * torch.sigmoid(c.detach())
        arrays = [contiguous_array(t) for t in (x, w, step, y0, z0)]
        ys = torch.from_numpy(np.empty_like(arrays[0]))
        # Kept for the backward pass: z_t and tanh(a_t) (instead of x: the same memory, no exp to redo).
        zs = torch.from_numpy(np.empty_like(arrays[0]))
        fs = torch.from_numpy(np.empty_like(arrays[0]))
        _numba_forward(*arrays, arrays[0].dtype.type(alpha), ys.numpy(), zs.numpy(), fs.numpy())
        ctx.save_for_backward(fs, w, c, y0, ys, zs)
        ctx.dt, ctx.alpha = dt, alpha
        z_last = zs[-1].clone() if len(zs) else z0.detach().clone()
        return ys, z_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_z_last):
        fs, w, c, y0, ys, zs = ctx.saved_tensors
        sigmoid = torch.sigmoid(c.detach())
        step = ctx.dt * sigmoid
        f_array, w_array, step_array, y0_array = (contiguous_array(t) for t in (fs, w, step, y0))
        grad_y = torch.zeros_like(ys) if grad_y is None else grad_y
        grad_z_last = torch.zeros_like(y0) if grad_z_last is None else grad_z_last
        grads = [torch.from_numpy(np.empty_like(a)) for a in (f_array, w_array, step_array, y0_array, y0_array)]
        _numba_backward(*gradient_rows(grad_y), contiguous_array(grad_z_last), f_array, w_array, step_array,
                        y0_array, ys.numpy(), zs.numpy(), f_array.dtype.type(ctx.alpha), *(g.numpy() for g in grads))
        grad_x, grad_w, grad_step, grad_y0, grad_z0 = grads
        grad_c = grad_step * ctx.dt * sigmoid * (1 - sigmoid)
        return grad_x, grad_w, grad_c, grad_y0, grad_z0, None, None


def resolve_unicornn_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto" -> the fused kernel for the device and dtype ("cpu" with numba, "triton" on CUDA with
    triton), else "reference"; "fused" -> that kernel or a one-line error; explicit names are checked."""
    from src.kernels.unicornn_triton import SUPPORTED_DTYPES, triton_available

    check_choice("UnICORNN backend", backend, BACKENDS)
    cpu_ok = device.type == "cpu" and numba_available() and dtype in NUMBA_DTYPES
    gpu_ok = device.type == "cuda" and triton_available() and dtype in SUPPORTED_DTYPES
    fused = "cpu" if cpu_ok else "triton" if gpu_ok else None
    if backend == "auto":
        return fused or "reference"
    if backend == "fused":
        if fused is None:
            raise ValueError(f"no fused UnICORNN kernel for {device} {dtype}; use backend='auto' or 'reference'")
        return fused
    if backend == "cpu" and not cpu_ok:
        raise ValueError(f"UnICORNN backend 'cpu' needs numba and float32/float64 CPU tensors, got {device} {dtype}; "
                         "use backend='auto'")
    if backend == "triton" and not gpu_ok:
        raise ValueError(f"UnICORNN backend 'triton' needs CUDA tensors and the triton package, got {device} {dtype}; "
                         "use backend='auto'")
    return backend


def unicornn_recurrence(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, y0: torch.Tensor, z0: torch.Tensor,
                        dt: float, alpha: float, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """All outputs y (T, B, H) and the last velocity z_{T-1} (B, H) of the UnICORNN recurrence.

    Args:
        x: projected inputs (T, B, H); w: recurrent weights (H,); c: time-step logits (H,), the time
            step of unit j being dt * sigmoid(c_j); y0, z0: the state before the first step (B, H).
        dt: the layer's largest time step; alpha: the restoring force alpha * y.
        backend: one of :data:`BACKENDS` (see the module docstring).
    """
    _check_inputs(x, w, c, y0, z0)
    chosen = resolve_unicornn_backend(backend, x.device, x.dtype)
    if chosen == "reference":
        return unicornn_recurrence_reference(x, w, c, y0, z0, dt, alpha)
    if chosen == "triton":
        from src.kernels.unicornn_triton import UnICORNNRecurrenceTriton

        return UnICORNNRecurrenceTriton.apply(x, w, c, y0, z0, float(dt), float(alpha))
    return UnICORNNRecurrenceCPU.apply(x, w, c, y0, z0, float(dt), float(alpha))
