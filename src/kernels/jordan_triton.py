"""Persistent Triton kernel for the Jordan network (src/layers/jordan.py): the output is fed back.

    a_t = z_t + V y_{t-1}        h_t = f(a_t)            (z_t = W x_t + b, computed before)
    o_t = U h_t + c              y_t = g(o_t)

Shapes: z (T, B, H); V = weight_fb (H, O); U = weight_out (O, H); c (O,); y0 (B, O). Output: all y_t
(T, B, O). Gradients for z, V, U, c and y0.

As :mod:`src.kernels.dense_triton`: one program per 16 batch rows loops over all steps in one launch;
each step is two dependent block matmuls (``tl.dot`` over the state written just before, with a
barrier after each), h_t and y_t kept in buffers. The backward pass reads f' and g' from the saved
h and y and runs, from t = T-1 down to 0, in a second persistent kernel:

    dy_t = gy_t + V^T da_{t+1}       do_t = dy_t * g'(y_t)        (da_T = 0)
    dh_t = U^T do_t                  da_t = dh_t * f'(h_t)

then dV = sum_t da_t^T y_{t-1}, dU = sum_t do_t^T h_t, dc = sum do_t, dy0 = V^T da_0 as matmuls.
float32 or float64; f and g: tanh, relu, sigmoid or identity. Under ``TRITON_INTERPRET=1`` (set
before triton is imported) it runs on CPU tensors, which is how CI checks it.
"""
from __future__ import annotations

import torch

from src.kernels import triton_auto
from src.kernels.dense_triton import KERNEL_DTYPES, _interpreting, _precision
from src.kernels.indrnn_triton import _device_guard, loop_count

try:  # triton is optional: CPU-only installs never load this backend.
    import triton
    import triton.language as tl

    from src.kernels.dense_triton import _activate
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

ACTIVATION_CODES = {"relu": 0, "tanh": 1, "identity": 2, "sigmoid": 3}


if triton is not None:

    @triton.jit
    def _block_matmul(acc, left_ptr, right_ptr, batch, batch_ok, cols, col_ok, inner_size, n_k_blocks,
                      right_row_stride, right_col_stride, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
        # acc[b, n] += sum_k left[b, k] * right[k, n], right[k, n] at right_ptr + k * row + n * col stride.
        dtype = acc.dtype
        for kb in range(n_k_blocks):
            inner = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            inner_ok = inner < inner_size
            left = tl.load(left_ptr + batch[:, None] * inner_size + inner[None, :],
                           mask=batch_ok[:, None] & inner_ok[None, :], other=0.0, cache_modifier=".cg")
            right = tl.load(right_ptr + inner[:, None] * right_row_stride + cols[None, :] * right_col_stride,
                            mask=inner_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(left, right, acc=acc, input_precision=PRECISION, out_dtype=dtype)
        return acc

    @triton.jit
    def _forward_kernel(z_ptr, v_ptr, u_ptr, c_ptr, hs_ptr, ys_ptr, T, B, H, O, n_h_blocks, n_o_blocks, n_hk_blocks,
                        n_ok_blocks, ACT_H: tl.constexpr, ACT_Y: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # hs (T, B, H); ys (T + 1, B, O) with ys[0] = y0.
        batch = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        batch_ok = batch < B
        dtype = hs_ptr.dtype.element_ty
        for t in range(T):
            for jb in range(n_h_blocks):  # h_t = f(z_t + y_{t-1} V^T); V^T[k, j] = V[j, k]
                cols = jb * BLOCK_N + tl.arange(0, BLOCK_N)
                col_ok = cols < H
                tile = batch[:, None] * H + cols[None, :]
                ok = batch_ok[:, None] & col_ok[None, :]
                acc = tl.load(z_ptr + t * B * H + tile, mask=ok, other=0.0).to(dtype)
                acc = _block_matmul(acc, ys_ptr + t * B * O, v_ptr, batch, batch_ok, cols, col_ok, O, n_ok_blocks,
                                    1, O, PRECISION, BLOCK_K)
                tl.store(hs_ptr + t * B * H + tile, _activate(acc, ACT_H), mask=ok)
            tl.debug_barrier()
            for ob in range(n_o_blocks):  # y_t = g(h_t U^T + c); U^T[k, o] = U[o, k]
                cols = ob * BLOCK_N + tl.arange(0, BLOCK_N)
                col_ok = cols < O
                tile = batch[:, None] * O + cols[None, :]
                ok = batch_ok[:, None] & col_ok[None, :]
                acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=dtype) + tl.load(c_ptr + cols, mask=col_ok, other=0.0)[None, :]
                acc = _block_matmul(acc, hs_ptr + t * B * H, u_ptr, batch, batch_ok, cols, col_ok, H, n_hk_blocks,
                                    1, H, PRECISION, BLOCK_K)
                tl.store(ys_ptr + (t + 1) * B * O + tile, _activate(acc, ACT_Y), mask=ok)
            tl.debug_barrier()

    @triton.jit
    def _backward_kernel(gy_ptr, gslope_ptr, fslope_ptr, v_ptr, u_ptr, do_ptr, da_ptr, n_steps, T, B, H, O,
                         n_h_blocks, n_o_blocks, n_hk_blocks, n_ok_blocks, PRECISION: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # do (T, B, O); da (T + 1, B, H) with da[T] = 0; gslope = g'(y_t) (T, B, O), fslope = f'(h_t) (T, B, H).
        batch = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        batch_ok = batch < B
        dtype = da_ptr.dtype.element_ty
        for s in range(n_steps):  # n_steps = T as the interpreter's range needs it
            t = T - 1 - s
            for ob in range(n_o_blocks):  # do_t = (gy_t + da_{t+1} V) * g'(y_t); V[k, o]
                cols = ob * BLOCK_N + tl.arange(0, BLOCK_N)
                col_ok = cols < O
                tile = batch[:, None] * O + cols[None, :]
                ok = batch_ok[:, None] & col_ok[None, :]
                acc = tl.load(gy_ptr + t * B * O + tile, mask=ok, other=0.0).to(dtype)
                acc = _block_matmul(acc, da_ptr + (t + 1) * B * H, v_ptr, batch, batch_ok, cols, col_ok, H,
                                    n_hk_blocks, O, 1, PRECISION, BLOCK_K)
                slope = tl.load(gslope_ptr + t * B * O + tile, mask=ok, other=0.0)
                tl.store(do_ptr + t * B * O + tile, acc * slope, mask=ok)
            tl.debug_barrier()
            for jb in range(n_h_blocks):  # da_t = (do_t U) * f'(h_t); U[k, j]
                cols = jb * BLOCK_N + tl.arange(0, BLOCK_N)
                col_ok = cols < H
                tile = batch[:, None] * H + cols[None, :]
                ok = batch_ok[:, None] & col_ok[None, :]
                acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=dtype)
                acc = _block_matmul(acc, do_ptr + t * B * O, u_ptr, batch, batch_ok, cols, col_ok, O, n_ok_blocks,
                                    H, 1, PRECISION, BLOCK_K)
                slope = tl.load(fslope_ptr + t * B * H + tile, mask=ok, other=0.0)
                tl.store(da_ptr + t * B * H + tile, acc * slope, mask=ok)
            tl.debug_barrier()


def _slope(values: torch.Tensor, activation: str) -> torch.Tensor:
    """f'(a) from f(a), elementwise: what the backward pass reads."""
    if activation == "tanh":
        return 1 - values * values
    if activation == "sigmoid":
        return values * (1 - values)
    if activation == "relu":
        return (values > 0).to(values.dtype)
    return torch.ones_like(values)


def _blocks(width: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_K, num_warps): 16 batch rows by blocks of up to 32 units, 4 warps: no
    register spills in float32 (IEEE or TF32) or float64 (ptxas for sm_90; 64-unit blocks spill here)."""
    block = min(32, max(16, triton.next_power_of_2(width)))
    return 16, block, block, 4


def _check(z, weight_fb, weight_out, bias_out, y0, act_h, act_y) -> None:
    if triton is None:
        raise RuntimeError("the Jordan Triton kernel needs the 'triton' package; use backend='auto'")
    for name in (act_h, act_y):
        if name not in ACTIVATION_CODES:
            raise ValueError(f"Jordan Triton kernel: activation must be one of {tuple(ACTIVATION_CODES)}, got {name!r}")
    steps, batch, hidden = z.shape
    outputs = weight_out.shape[0]
    if (weight_fb.shape != (hidden, outputs) or weight_out.shape != (outputs, hidden) or y0.shape != (batch, outputs)
            or bias_out.shape != (outputs,)):
        raise ValueError(f"Jordan Triton kernel: z {tuple(z.shape)} needs weight_fb ({hidden}, {outputs}), weight_out "
                         f"({outputs}, {hidden}), bias_out ({outputs},), y0 ({batch}, {outputs}); got "
                         f"{tuple(weight_fb.shape)}, {tuple(weight_out.shape)}, {tuple(bias_out.shape)}, "
                         f"{tuple(y0.shape)}")
    if weight_fb.dtype not in KERNEL_DTYPES:
        raise TypeError(f"Jordan Triton kernel: weights have dtype {weight_fb.dtype}; supported {KERNEL_DTYPES}")
    if (steps + 1) * batch * max(hidden, outputs) >= 2 ** 31:
        raise ValueError("Jordan Triton kernel: (T + 1) * B * max(H, O) needs 64-bit offsets; split the sequence "
                         "into chunks (the layer's state carries over exactly)")
    if not z.is_cuda and not _interpreting():
        raise ValueError(f"the Jordan Triton kernel runs on CUDA tensors, got device {z.device}")


class JordanTriton:
    """``JordanTriton.apply(z, weight_fb, weight_out, bias_out, y0, act_h, act_y) -> y (T, B, O)``; see the
    module docstring. A call that "auto" chose (``fallback_for``: the layer's name; :mod:`src.kernels.triton_auto`)
    falls back to the PyTorch loop where the kernel fails; a strict one (None) raises."""

    @staticmethod
    def apply(z, weight_fb, weight_out, bias_out, y0, act_h: str, act_y: str,
              fallback_for: str | None = None) -> torch.Tensor:
        return triton_auto.run(
            fallback_for,
            lambda: JordanTritonFunction.apply(z, weight_fb, weight_out, bias_out, y0, act_h, act_y, fallback_for),
            lambda: jordan_reference(z, weight_fb, weight_out, bias_out, y0, act_h, act_y))


def jordan_reference(z, weight_fb, weight_out, bias_out, y0, act_h: str, act_y: str) -> torch.Tensor:
    """The Jordan recurrence by the layer's PyTorch loop (z read in the weights' dtype, as the kernel does)."""
    from src.layers.jordan import output_feedback_loop  # the layers import this module

    return output_feedback_loop(z.to(weight_fb.dtype), [y0], weight_fb, weight_out, bias_out, act_h, act_y)


class JordanTritonFunction(torch.autograd.Function):
    """The kernels as an autograd Function (:class:`JordanTriton` is the entry point)."""

    @staticmethod
    def forward(ctx, z, weight_fb, weight_out, bias_out, y0, act_h: str, act_y: str, auto_layer: str | None = None):
        _check(z, weight_fb, weight_out, bias_out, y0, act_h, act_y)
        ctx.auto_layer = auto_layer  # set: "auto" chose the kernel for this layer, a failing backward falls back
        dtype = weight_fb.dtype
        steps, batch, hidden = z.shape
        outputs = weight_out.shape[0]
        z_in = z.detach().contiguous()
        v, u, c = (t.detach().to(dtype).contiguous() for t in (weight_fb, weight_out, bias_out))
        hs = torch.empty(steps, batch, hidden, dtype=dtype, device=z.device)
        ys = torch.empty(steps + 1, batch, outputs, dtype=dtype, device=z.device)
        ys[0] = y0.detach()
        block_b, block_n, block_k, warps = _blocks(max(hidden, outputs))
        if steps > 0:
            with _device_guard(z):
                _forward_kernel[(triton.cdiv(batch, block_b),)](
                    z_in, v, u, c, hs, ys, loop_count(steps), batch, hidden, outputs,
                    loop_count(triton.cdiv(hidden, block_n)), loop_count(triton.cdiv(outputs, block_n)),
                    loop_count(triton.cdiv(hidden, block_k)), loop_count(triton.cdiv(outputs, block_k)),
                    ACT_H=ACTIVATION_CODES[act_h], ACT_Y=ACTIVATION_CODES[act_y], PRECISION=_precision(dtype, z.device),
                    BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
        ctx.save_for_backward(v, u, hs, ys, c, z_in)
        ctx.activations, ctx.z_dtype = (act_h, act_y), z.dtype
        return ys[1:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        return triton_auto.run(ctx.auto_layer, lambda: _kernel_gradients(ctx, grad_y),
                               lambda: _reference_gradients(ctx, grad_y))


def _reference_gradients(ctx, grad_y):
    """JordanTritonFunction.backward's gradients through :func:`jordan_reference` (a fallback)."""
    v, u, _, ys, c, z = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (z, v, u, c, ys[0])]
        grads = torch.autograd.grad(jordan_reference(*inputs, *ctx.activations), inputs, grad_y)
    return (grads[0].to(ctx.z_dtype), *grads[1:], None, None, None)


def _kernel_gradients(ctx, grad_y):
    """JordanTritonFunction.backward by the second persistent kernel (see the module docstring)."""
    v, u, hs, ys, _, _ = ctx.saved_tensors
    act_h, act_y = ctx.activations
    steps, batch, hidden = hs.shape
    outputs = ys.shape[2]
    dtype = v.dtype
    g_slope = _slope(ys[1:], act_y).contiguous()
    f_slope = _slope(hs, act_h).contiguous()
    grad_o = torch.empty(steps, batch, outputs, dtype=dtype, device=hs.device)
    grad_a = torch.zeros(steps + 1, batch, hidden, dtype=dtype, device=hs.device)  # da_T = 0
    block_b, block_n, block_k, warps = _blocks(max(hidden, outputs))
    with _device_guard(hs):
        _backward_kernel[(triton.cdiv(batch, block_b),)](
            grad_y.to(dtype).contiguous(), g_slope, f_slope, v, u, grad_o, grad_a, loop_count(steps), steps,
            batch, hidden, outputs, loop_count(triton.cdiv(hidden, block_n)),
            loop_count(triton.cdiv(outputs, block_n)), loop_count(triton.cdiv(hidden, block_k)),
            loop_count(triton.cdiv(outputs, block_k)), PRECISION=_precision(dtype, hs.device),
            BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    da = grad_a[:steps]
    flat_da, flat_do = da.reshape(-1, hidden), grad_o.reshape(-1, outputs)
    grad_fb = flat_da.t() @ ys[:steps].reshape(-1, outputs)  # sum_t da_t^T y_{t-1}
    grad_out = flat_do.t() @ hs.reshape(-1, hidden)  # sum_t do_t^T h_t
    return (da.to(ctx.z_dtype), grad_fb, grad_out, flat_do.sum(0), grad_a[0] @ v, None, None, None)
