"""Fused UnICORNN recurrence on CUDA with Triton: an autograd Function with a hand-written backward.

The recurrence, shapes and backward equations are those of :mod:`src.kernels.unicornn_cpu`:
x (T, B, H), w (H,), c (H,), y0 (B, H), z0 (B, H) -> y (T, B, H), z_{T-1} (B, H), with unit j's time
step s_j = dt * sigmoid(c_j) computed once by torch before the launch.

Layout as the IndRNN Triton kernel (:mod:`src.kernels.indrnn_triton`, whose launch configuration,
tanh and interpreter helpers this module reuses): the B*H independent oscillators are columns, one
program owns BLOCK adjacent columns and loops over time with (y, z) in float32 registers. The
forward pass stores y (in x's dtype) and z (float32, for the backward pass). The backward pass runs
from t = T-1 to 0, recomputes tanh(w y_{t-1} + x_t) and writes dL/dx_t; the partial sums of dL/dw and
dL/ds per column, (B, H) in float32, are summed over B by torch (deterministic: no atomics).

Under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported) CPU tensors are accepted,
which is how tests check the kernel without a GPU.
"""
from __future__ import annotations

import torch

from src.kernels.indrnn_triton import (SUPPORTED_DTYPES, _device_guard, _interpreting, _launch_config, loop_count,
                                       triton, triton_available)

__all__ = ["SUPPORTED_DTYPES", "UnICORNNRecurrenceTriton", "triton_available"]

if triton is not None:
    import triton.language as tl

    from src.kernels.indrnn_triton import _tanh

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, step_ptr, y0_ptr, z0_ptr, y_ptr, z_ptr, T, BH, H, alpha,
                        BLOCK: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < BH
        w = tl.load(w_ptr + cols % H, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(step_ptr + cols % H, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y0_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z0_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x_ptrs = x_ptr + cols
        y_ptrs = y_ptr + cols
        z_ptrs = z_ptr + cols
        for _ in range(T):
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            z = z - s * (_tanh(w * y + x) + alpha * y)
            y = y + s * z
            tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(z_ptrs, z, mask=mask)
            x_ptrs += BH
            y_ptrs += BH
            z_ptrs += BH

    @triton.jit
    def _backward_step(grad_ptr, x_ptr, z_ptr, grad_x_ptr, offset, mask, y_prev, w, s, alpha, carry_y, carry_z,
                       dw, ds):
        # One step t of the backward pass (equations in src/kernels/unicornn_cpu.py); offset -> (t, b, j).
        x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offset, mask=mask, other=0.0)
        g = tl.load(grad_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        f = _tanh(w * y_prev + x)
        total_y = g + carry_y
        total_z = carry_z + s * total_y
        ds += total_y * z - total_z * (f + alpha * y_prev)
        d = -s * total_z * (1.0 - f * f)
        tl.store(grad_x_ptr + offset, d.to(grad_x_ptr.dtype.element_ty), mask=mask)
        dw += d * y_prev
        return total_y - alpha * s * total_z + w * d, total_z, dw, ds

    @triton.jit
    def _backward_kernel(grad_ptr, grad_z_last_ptr, x_ptr, w_ptr, step_ptr, y0_ptr, y_ptr, z_ptr,
                         grad_x_ptr, grad_w_ptr, grad_step_ptr, grad_y0_ptr, grad_z0_ptr,
                         T, BH, H, last_row, alpha, BLOCK: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < BH
        w = tl.load(w_ptr + cols % H, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(step_ptr + cols % H, mask=mask, other=0.0).to(tl.float32)
        carry_y = tl.zeros([BLOCK], dtype=tl.float32)
        carry_z = tl.load(grad_z_last_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        ds = tl.zeros([BLOCK], dtype=tl.float32)
        offset = last_row + cols  # element (t, b, j), from t = T-1 down
        # Steps T-1 .. 1 read y_{t-1} from the outputs; step 0 (after the loop) reads y0.
        for _ in range(T - 1):
            y_prev = tl.load(y_ptr + offset - BH, mask=mask, other=0.0).to(tl.float32)
            carry_y, carry_z, dw, ds = _backward_step(grad_ptr, x_ptr, z_ptr, grad_x_ptr, offset, mask, y_prev, w, s,
                                                      alpha, carry_y, carry_z, dw, ds)
            offset -= BH
        y_prev = tl.load(y0_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        carry_y, carry_z, dw, ds = _backward_step(grad_ptr, x_ptr, z_ptr, grad_x_ptr, offset, mask, y_prev, w, s,
                                                  alpha, carry_y, carry_z, dw, ds)
        tl.store(grad_w_ptr + cols, dw, mask=mask)
        tl.store(grad_step_ptr + cols, ds, mask=mask)
        tl.store(grad_y0_ptr + cols, carry_y.to(grad_y0_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_z0_ptr + cols, carry_z.to(grad_z0_ptr.dtype.element_ty), mask=mask)


def _check_inputs(x, w, c, y0, z0) -> None:
    if triton is None:
        raise RuntimeError("the Triton UnICORNN kernel needs the 'triton' package; use backend='auto'")
    for name, tensor in (("x", x), ("w", w), ("c", c), ("y0", y0), ("z0", z0)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"Triton UnICORNN kernel: {name} has dtype {tensor.dtype}; supported: {SUPPORTED_DTYPES}")
        if tensor.device != x.device:
            raise ValueError(f"Triton UnICORNN kernel: {name} is on {tensor.device}, x on {x.device}")
    if not x.is_cuda and not _interpreting():
        raise ValueError(f"the Triton UnICORNN kernel runs on CUDA tensors, got device {x.device}")


class UnICORNNRecurrenceTriton(torch.autograd.Function):
    """``UnICORNNRecurrenceTriton.apply(x, w, c, y0, z0, dt, alpha)`` -> (y (T, B, H) in x's dtype,
    z_{T-1} (B, H) in z0's dtype); see the module docstring."""

    @staticmethod
    def forward(ctx, x, w, c, y0, z0, dt: float, alpha: float):
        _check_inputs(x, w, c, y0, z0)
        x, w, y0, z0 = (t.detach().contiguous() for t in (x, w, y0, z0))
        step = (dt * torch.sigmoid(c.detach().float())).contiguous()
        steps, batch, hidden = x.shape
        ys = torch.empty_like(x)
        zs = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        columns = batch * hidden
        if steps > 0 and columns > 0:
            block, warps = _launch_config(columns)
            with _device_guard(x):
                _forward_kernel[(triton.cdiv(columns, block),)](
                    x, w, step, y0, z0, ys, zs, loop_count(steps), columns, hidden, float(alpha),
                    BLOCK=block, num_warps=warps)
        ctx.save_for_backward(x, w, c, y0, ys, zs)
        ctx.dt, ctx.alpha = dt, alpha
        z_last = zs[-1].to(z0.dtype) if steps else z0.clone()
        return ys, z_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_z_last):
        x, w, c, y0, ys, zs = ctx.saved_tensors
        steps, batch, hidden = x.shape
        sigmoid = torch.sigmoid(c.detach().float())
        step = (ctx.dt * sigmoid).contiguous()
        grad_y = torch.zeros_like(ys) if grad_y is None else grad_y.contiguous()
        grad_z_last = torch.zeros_like(y0) if grad_z_last is None else grad_z_last.contiguous()
        grad_x = torch.empty_like(x)
        partial_w = torch.zeros(batch, hidden, dtype=torch.float32, device=x.device)
        partial_step = torch.zeros(batch, hidden, dtype=torch.float32, device=x.device)
        grad_y0, grad_z0 = torch.zeros_like(y0), grad_z_last.clone()  # as they are when T == 0
        columns = batch * hidden
        if steps > 0 and columns > 0:
            block, warps = _launch_config(columns)
            with _device_guard(x):
                _backward_kernel[(triton.cdiv(columns, block),)](
                    grad_y, grad_z_last, x, w, step, y0, ys, zs, grad_x, partial_w, partial_step, grad_y0, grad_z0,
                    loop_count(steps), columns, hidden, (steps - 1) * columns, float(ctx.alpha),
                    BLOCK=block, num_warps=warps)
        grad_c = partial_step.sum(0) * ctx.dt * sigmoid * (1 - sigmoid)
        return grad_x, partial_w.sum(0).to(w.dtype), grad_c.to(c.dtype), grad_y0, grad_z0, None, None
