"""Fused IndRNN recurrence on CUDA with Triton: an autograd Function with a hand-written backward.

h_t = act(z_t + u * h_{t-1}) for t = 0..T-1 (h_{-1} = h0), with the shapes and conventions of
:func:`src.kernels.reference.indrnn_recurrence_reference`: z (T, B, H), u (H,), h0 (B, H) -> (T, B, H).

Kernel layout: the (B, H) state is flattened into B*H independent columns (column c is batch
c // H, unit c % H). One Triton program owns BLOCK adjacent columns, keeps their state in
registers and loops over time inside the kernel, so each pass is a single launch whatever T is.
Time is processed in tiles: the program loads a [BLOCK_T, BLOCK] tile of z (coalesced rows) one
tile ahead of the one it is computing, runs the tile's BLOCK_T dependent steps in registers and
stores the [BLOCK_T, BLOCK] output tile at once, so no step waits on a global-memory load (a
one-step-per-load loop is bound by memory latency, not bandwidth). The backward pass is the same
loop over tiles from the last (possibly partial) one back to the first (equations as in
:mod:`src.kernels.indrnn_cpu`):
    delta_t = clip((g_t + u * delta_{t+1}) * f'(a_t))      (delta_T = 0)
    dL/dz_t = delta_t,  dL/du = sum_{t,b} delta_t * h_{t-1},  dL/dh0 = u * delta_0
with f' read from the saved outputs: relu [h_t > 0], tanh 1 - h_t^2, identity 1, and clip the
identity or, with ``grad_clip=c``, a clamp to [-c, c] at every step (Theano's per-step recurrent
clipping, see :mod:`src.kernels.reference`); CLIP is a compile-time flag, so no clipping costs nothing.
dL/du is written as a per-column float32 partial of shape (B, H) and summed over B with torch,
which is deterministic (atomics would make the sum order, hence the bits, vary between runs).

Precision: inputs may be float32, bfloat16 or float16 (z, u and h0 need not share a dtype). They are
loaded and the state is carried in float32; outputs are stored in z's dtype. For bfloat16/float16
the saved outputs are rounded, so the backward pass evaluates f' and h_{t-1} from rounded values,
an error of the order of the dtype's resolution. Gradients come back in the dtypes of z, u, h0.

Without triton, or without CUDA, this module still imports; ``triton_available()`` says whether
the kernels can run. Under Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before triton is
imported) the Function also accepts CPU tensors, which is how the kernels are tested without a GPU.
"""
from __future__ import annotations

import contextlib
import os

import torch

from src.kernels.function import RecurrenceFunction
from src.kernels.reference import ACTIVATIONS

try:  # triton is optional: CPU-only installs never load this backend.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}  # relu 0, tanh 1, identity 2
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    """True when triton imports and a CUDA device is present, i.e. the kernels can run on GPU."""
    return triton is not None and torch.cuda.is_available()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _tanh(a):
        # Built from exp so that it works on every backend and in the interpreter; exp(-2|a|) <= 1
        # never overflows. Absolute error ~1e-7 near 0, well inside float32 tolerances.
        e = tl.exp(-2.0 * tl.abs(a))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(a < 0, -t, t)

    @triton.jit
    def _delta(upstream, h, clip, ACTIVATION: tl.constexpr, CLIP: tl.constexpr):
        # upstream * f'(a) with f' from the output h; relu uses where() so that 0 * inf is not NaN.
        if ACTIVATION == 0:
            d = tl.where(h > 0, upstream, 0.0)
        elif ACTIVATION == 1:
            d = upstream * (1.0 - h * h)
        else:
            d = upstream
        if CLIP:  # comparisons rather than min/max, so that a NaN stays NaN (as torch.clamp)
            d = tl.where(d > clip, clip, tl.where(d < -clip, -clip, d))
        return d

    @triton.jit
    def _row(tile, rows, i):
        # Row i of a [BLOCK_T, BLOCK] register tile. Each thread holds whole columns of the tile (1-warp
        # programs, see _launch_config), so this masked sum stays inside the thread: no memory access.
        return tl.sum(tl.where(rows[:, None] == i, tile, 0.0), axis=0)

    @triton.jit
    def _forward_kernel(z_ptr, u_ptr, h0_ptr, out_ptr, T, n_tiles, BH, H,
                        ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < BH
        rows = tl.arange(0, BLOCK_T)
        u = tl.load(u_ptr + cols % H, mask=col_ok, other=0.0).to(tl.float32)
        h = tl.load(h0_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        # Scalar base pointers advance by BLOCK_T*BH per tile (64-bit pointer arithmetic: T*B*H may exceed
        # 2^31); the int32 tile of offsets is loop-invariant. (Loop-carried tiles of 64-bit pointers would
        # take 2 registers per element: 210 registers at BLOCK = 128, checked with ptxas.)
        offsets = rows[:, None] * BH + cols[None, :]
        z_base = z_ptr
        out_base = out_ptr
        tile = tl.load(z_base + offsets, mask=(rows < T)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        t0 = 0
        for _ in range(n_tiles):  # cdiv(T, BLOCK_T), computed by the launcher
            # The next tile's load is issued before this tile's BLOCK_T dependent steps, which hide its
            # latency: no step waits on global memory (beyond the first tile).
            next_ok = ((t0 + BLOCK_T + rows) < T)[:, None] & col_ok[None, :]
            following = tl.load(z_base + BLOCK_T * BH + offsets, mask=next_ok, other=0.0).to(tl.float32)
            out_tile = tl.zeros([BLOCK_T, BLOCK], dtype=tl.float32)
            for i in tl.static_range(BLOCK_T):
                a = _row(tile, rows, i) + u * h
                if ACTIVATION == 0:
                    h = tl.maximum(a, 0.0)
                elif ACTIVATION == 1:
                    h = _tanh(a)
                else:
                    h = a
                out_tile = tl.where(rows[:, None] == i, h[None, :], out_tile)
            # Steps past T (the last tile's padding) ran on z = 0 and are not stored.
            tl.store(out_base + offsets, out_tile.to(out_ptr.dtype.element_ty),
                     mask=((t0 + rows) < T)[:, None] & col_ok[None, :])
            tile = following
            z_base += BLOCK_T * BH
            out_base += BLOCK_T * BH
            t0 += BLOCK_T

    @triton.jit
    def _backward_kernel(grad_ptr, out_ptr, u_ptr, h0_ptr, grad_z_ptr, grad_u_ptr, grad_h0_ptr,
                         T, n_tiles, BH, H, last_tile_offset, last_tile_start, clip, ACTIVATION: tl.constexpr,
                         CLIP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        col_ok = cols < BH
        rows = tl.arange(0, BLOCK_T)
        u = tl.load(u_ptr + cols % H, mask=col_ok, other=0.0).to(tl.float32)
        # Tiles from the last (which may be partial) back to the first; last_tile_offset =
        # last_tile_start * B * H, computed in Python (may be int64). Scalar base pointers, as forward.
        offsets = rows[:, None] * BH + cols[None, :]
        g_base = grad_ptr + last_tile_offset
        h_base = out_ptr + last_tile_offset
        dz_base = grad_z_ptr + last_tile_offset
        ok = ((last_tile_start + rows) < T)[:, None] & col_ok[None, :]
        g_tile = tl.load(g_base + offsets, mask=ok, other=0.0).to(tl.float32)
        h_tile = tl.load(h_base + offsets, mask=ok, other=0.0).to(tl.float32)
        carry = tl.zeros([BLOCK], dtype=tl.float32)  # u * delta_{t+1}
        grad_u = tl.zeros([BLOCK], dtype=tl.float32)
        pending = tl.zeros([BLOCK], dtype=tl.float32)  # delta_{t+1}, waiting for h_t to add to grad_u
        t0 = last_tile_start
        for _ in range(n_tiles):  # cdiv(T, BLOCK_T), computed by the launcher
            # Prefetch the previous tile (earlier steps) before running this one's steps.
            previous_ok = ((t0 - BLOCK_T + rows) >= 0)[:, None] & col_ok[None, :]
            g_previous = tl.load(g_base - BLOCK_T * BH + offsets, mask=previous_ok, other=0.0).to(tl.float32)
            h_previous = tl.load(h_base - BLOCK_T * BH + offsets, mask=previous_ok, other=0.0).to(tl.float32)
            dz_tile = tl.zeros([BLOCK_T, BLOCK], dtype=tl.float32)
            for j in tl.static_range(BLOCK_T):
                i = BLOCK_T - 1 - j
                # Padding rows past T hold g = 0, h = 0 and the carry is still 0 there: delta = 0.
                h = _row(h_tile, rows, i)
                grad_u += pending * h  # delta_{t+1} * h_t
                delta = _delta(_row(g_tile, rows, i) + carry, h, clip, ACTIVATION, CLIP)
                dz_tile = tl.where(rows[:, None] == i, delta[None, :], dz_tile)
                carry = u * delta
                pending = delta
            tl.store(dz_base + offsets, dz_tile.to(grad_z_ptr.dtype.element_ty),
                     mask=((t0 + rows) < T)[:, None] & col_ok[None, :])
            g_tile, h_tile = g_previous, h_previous
            g_base -= BLOCK_T * BH
            h_base -= BLOCK_T * BH
            dz_base -= BLOCK_T * BH
            t0 -= BLOCK_T
        h0 = tl.load(h0_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(grad_u_ptr + cols, grad_u + pending * h0, mask=col_ok)  # delta_0 * h_{-1}
        tl.store(grad_h0_ptr + cols, carry.to(grad_h0_ptr.dtype.element_ty), mask=col_ok)


# Steps per tile: each program loads a [BLOCK_T, BLOCK] tile of z (of g and h backward) at once, one
# tile ahead, and runs the BLOCK_T dependent steps in registers. gpu_check sweeps it (1 = one step
# per load, the former kernel); module-level so that a benchmark can set it (a power of 2: tl.arange).
BLOCK_T = 8
# Columns per program, one per thread (a multiple of 32: BLOCK // 32 warps); gpu_check sweeps it.
BLOCK = 32


def _launch_config(columns: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for ``columns`` = B*H independent recurrences.

    One column per thread, warps side by side along the columns, so that each thread holds whole
    columns of every [BLOCK_T, BLOCK] tile and extracting a step's row is in-thread arithmetic (the
    row reduction never crosses threads). With BLOCK = 32 (one warp) and BLOCK_T = 8 a thread holds
    64 registers forward and 96 backward, no spills (ptxas, sm_90); 4 columns per thread would need
    over 200. Small programs also spread B*H = 8192 columns over 256 programs, every SM busy.
    """
    del columns  # the same configuration at every size; the place to tune per size after gpu_check
    return BLOCK, max(1, BLOCK // 32)


def loop_count(steps: int):
    """The kernels' loop count T. Under the interpreter a numpy integer: the interpreter passes it to
    the kernel as is, whereas it wraps a Python int in a 1-element array that ``range`` cannot take
    (triton 3.6's ``int(array)`` raises TypeError on numpy >= 2.4). Compiled kernels get the int."""
    if _interpreting():
        import numpy as np  # a dependency of triton's interpreter itself

        return np.int64(steps)
    return steps


def _device_guard(tensor: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' device (CPU: interpreter).
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _launch_forward(z: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, code: int) -> torch.Tensor:
    """Outputs (T, B, H) in z's dtype, for contiguous z (T, B, H), u (H,), h0 (B, H)."""
    steps, batch, hidden = z.shape
    out = torch.empty_like(z)
    columns = batch * hidden
    if steps == 0 or columns == 0:
        return out
    block, warps = _launch_config(columns)
    with _device_guard(z):
        _forward_kernel[(triton.cdiv(columns, block),)](
            z, u, h0, out, steps, loop_count(triton.cdiv(steps, BLOCK_T)), columns, hidden, ACTIVATION=code,
            BLOCK=block, BLOCK_T=BLOCK_T, num_warps=warps)
    return out


def _launch_backward(grad_out, out, u, h0, code: int, grad_clip: float | None = None):
    """(grad_z (T, B, H), grad_u (H,), grad_h0 (B, H)) in the dtypes of out (= z), u and h0;
    ``grad_clip`` c clamps dL/da_t to [-c, c] at every step (None: no clipping)."""
    steps, batch, hidden = out.shape
    grad_z = torch.empty_like(out)
    grad_u_partial = torch.zeros(batch, hidden, dtype=torch.float32, device=out.device)
    grad_h0 = torch.zeros_like(h0)  # stays 0 when T == 0
    columns = batch * hidden
    if steps > 0 and columns > 0:
        block, warps = _launch_config(columns)
        last_tile = (steps - 1) // BLOCK_T * BLOCK_T  # first step of the last (maybe partial) tile
        with _device_guard(out):
            _backward_kernel[(triton.cdiv(columns, block),)](
                grad_out, out, u, h0, grad_z, grad_u_partial, grad_h0, steps,
                loop_count(triton.cdiv(steps, BLOCK_T)), columns, hidden, last_tile * columns, last_tile, 0.0 if grad_clip is None else float(grad_clip), ACTIVATION=code,
                CLIP=grad_clip is not None, BLOCK=block, BLOCK_T=BLOCK_T, num_warps=warps)
    return grad_z, grad_u_partial.sum(0).to(u.dtype), grad_h0


def _check_inputs(z, u, h0, activation: str) -> None:
    if triton is None:
        raise RuntimeError("the Triton IndRNN kernel needs the 'triton' package; use backend='auto'")
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"unknown IndRNN activation {activation!r}; choose one of {ACTIVATIONS}")
    if z.dim() != 3 or u.shape != z.shape[2:] or h0.shape != z.shape[1:]:
        raise ValueError(f"expected z (T, B, H), u (H,), h0 (B, H); got {tuple(z.shape)}, "
                         f"{tuple(u.shape)}, {tuple(h0.shape)}")
    for name, tensor in (("z", z), ("u", u), ("h0", h0)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"Triton IndRNN kernel: {name} has dtype {tensor.dtype}; "
                            f"supported: {SUPPORTED_DTYPES}")
        if tensor.device != z.device:
            raise ValueError(f"Triton IndRNN kernel: {name} is on {tensor.device}, z on {z.device}")
    if not z.is_cuda and not _interpreting():
        raise ValueError(f"the Triton IndRNN kernel runs on CUDA tensors, got device {z.device}")


class IndRNNRecurrenceTriton(RecurrenceFunction):
    """Fused h_t = act(z_t + u * h_{t-1}) on CUDA; see the module docstring for the backward pass.

    ``IndRNNRecurrenceTriton.apply(z, u, h0, activation, grad_clip=None)`` with z (T, B, H), u (H,),
    h0 (B, H) and activation in ``ACTIVATIONS`` returns all hidden states, shape (T, B, H), in z's
    dtype; ``grad_clip`` c clamps dL/da_t to [-c, c] at every step of the backward pass.
    """

    check = staticmethod(_check_inputs)
    run_forward = staticmethod(lambda z, u, h0, activation: _launch_forward(
        z.contiguous(), u.contiguous(), h0.contiguous(), ACTIVATION_CODES[activation]))
    run_backward = staticmethod(lambda grad_out, out, u, h0, activation, grad_clip: _launch_backward(
        grad_out.contiguous(), out, u.contiguous(), h0.contiguous(), ACTIVATION_CODES[activation], grad_clip))
