"""Persistent Triton kernel for the dense recurrences of the Python-loop layers: leaky units,
Clockwork, skip-through-time (and torch.nn.RNN's Elman update as the special case).

One recurrence covers them all:

    a_t = z_t + sum_{k} U_k h_{t - d_k}                 (z_t = W x_t + b, computed before)
    c_t = act(a_t)                                      (tanh, relu or identity)
    h_t = lam_t * h_{t-1} + (1 - lam_t) * c_t           (per unit; lam_t = 0: the plain update)

* leaky units: one delay (1), lam_t = alpha (H,) the same at every step (the layer's leak rates);
* Clockwork: one delay, U = W_h * mask, lam_t[i] = 0 where unit i's module ticks at step t, else 1
  (the unit keeps h_{t-1} exactly: 1 * h + 0 * c);
* skip-through-time: delays d_k with one U_k each, lam = 0.

Shapes: z (T, B, H); weights (K, H, H), U_k = weights[k] (a = h @ U_k^T, as torch.nn.RNN's W_hh);
past (D, B, H) = h_{-D}, ..., h_{-1} with D = max(delays); lam (T, H) (an expanded view is fine).
Output (T, B, H), all h_t. Gradients flow to z, weights, past and lam.

Kernel layout (forward): one program per block of BLOCK_B batch rows loops over all T steps inside
the kernel (one launch per pass). At step t it computes the [BLOCK_B, H] new state in column
blocks of BLOCK_N units, each as ``tl.dot`` over BLOCK_K-wide blocks of h_{t-d} (read back from
the state buffer it wrote, an L1/L2 hit) and of U_k (the same few hundred KiB every step, kept in
L2); a barrier ends the step so that the next one reads the whole new state. A column block whose
units all keep their state (lam = 1: Clockwork modules that do not tick) is copied, not computed;
with ``module`` (Clockwork's block-upper-triangular U) the zero blocks of U are skipped, and the
backward pass skips the blocks of da that are zero (units at rest at that step).

Backward: the pre-activations are recomputed for all steps at once (one matmul per delay), then
a second persistent kernel runs the adjoint recurrence from t = T-1 down to 0:

    e_t = g_t + lam_{t+1} * e_{t+1} + sum_k (U_k^T da_{t + d_k})        (dL/dh_t; zero past T-1)
    da_t = e_t * (1 - lam_t) * act'(a_t)                                (dL/dz_t)

and the parameter gradients are matmuls over all steps: dU_k = sum_t da_t^T h_{t-d_k},
dlam_t = sum_b e_t * (h_{t-1} - c_t), dpast from the da_t that reach back before step 0.

Precision: float32 (on CUDA, ``tl.dot`` in IEEE float32 unless torch allows TF32 matmuls) or
float64; z may be bfloat16/float16 (read as the weights' dtype). Buffer offsets are 32-bit:
(T + D) * B * H must stay below 2^31.

Without triton or CUDA this module imports and :func:`dense_kernel_applies` is False; under
Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported) the Function also runs
on CPU tensors, which is how CI checks it against :func:`dense_recurrence_reference`.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from src.activations import activate
from src.kernels import triton_auto
from src.kernels.indrnn_triton import _device_guard, loop_count

try:  # triton is optional: CPU-only installs never load this backend.
    import triton
    import triton.language as tl

    from src.kernels.indrnn_triton import _tanh
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

ACTIVATION_CODES = {"relu": 0, "tanh": 1, "identity": 2}
KERNEL_DTYPES = (torch.float32, torch.float64)
MAX_HIDDEN = 512  # larger layers keep working, but the per-step weight reads leave L2: use the loop


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dense_kernel_applies(weight: torch.Tensor) -> bool:
    """True when the Triton kernel can run on parameters like ``weight`` (CUDA with triton, or CPU
    under the interpreter) in a supported dtype."""
    if triton is None or weight.dtype not in KERNEL_DTYPES:
        return False
    return (weight.is_cuda and torch.cuda.is_available()) or (_interpreting() and weight.device.type == "cpu")


# "auto" takes the kernel on CUDA (one launch per pass instead of T steps of PyTorch ops). It is exact
# against float64 under Triton's interpreter and compiles for sm_90 without spills (tests); where it
# fails to compile or launch, "auto" falls back to the layer's loop with a one-line warning
# (src/kernels/triton_auto.py). False: "auto" keeps the loop on CUDA too.
AUTO_ON_CUDA = True


def resolve_dense_backend(backend: str, weight: torch.Tensor, layer: str) -> str:
    """"triton" or "reference" (the layer's PyTorch loop) for ``backend`` in ("auto", "triton", "reference").

    "auto" picks the kernel for CUDA float32/float64 parameters with H <= 512 where triton is
    installed, :data:`AUTO_ON_CUDA` is set and the kernel has not failed for ``layer`` in this process
    (the layer then passes ``fallback_for``, so that a failing kernel falls back instead of raising:
    :mod:`src.kernels.triton_auto`), else the
    loop (on CPU the loop is the faster one; the interpreter is for tests only).
    """
    if backend not in DENSE_BACKENDS:
        raise ValueError(f"{layer} backend must be one of {DENSE_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if not dense_kernel_applies(weight):
            raise ValueError(f"{layer} backend 'triton' needs the triton package and CUDA {KERNEL_DTYPES} "
                             f"parameters (got {weight.device} {weight.dtype}); use backend='auto'")
        return "triton"
    hidden = weight.shape[-1]
    if not (auto_on(weight) and hidden <= MAX_HIDDEN and not triton_auto.failed(layer)):
        return "reference"
    return "triton"


def auto_on(weight: torch.Tensor) -> bool:
    """Whether "auto" may take a Triton kernel for parameters like ``weight`` (CUDA, triton, a kernel dtype)."""
    return AUTO_ON_CUDA and weight.is_cuda and dense_kernel_applies(weight)


DENSE_BACKENDS = ("auto", "triton", "reference")


def dense_recurrence_reference(z: torch.Tensor, weights: torch.Tensor, past: torch.Tensor, lam: torch.Tensor,
                               delays: Sequence[int], activation: str) -> torch.Tensor:
    """The recurrence of the module docstring as an autograd loop (what the kernel is tested against).

    Args: z (T, B, H); weights (K, H, H); past (D, B, H); lam (T, H); delays K ints; activation.
    Returns: all hidden states (T, B, H).
    """
    history = list(past.unbind(0))
    for t in range(z.shape[0]):
        total = z[t]
        for k, delay in enumerate(delays):
            total = total + history[-delay] @ weights[k].t()
        history.append(lam[t] * history[-1] + (1 - lam[t]) * activate(total, activation))
    return torch.stack(history[past.shape[0]:])


if triton is not None:

    @triton.jit
    def _activate(a, ACTIVATION: tl.constexpr):
        """f(a) for an activation code: 0 relu, 1 tanh, 2 identity, 3 sigmoid (the Jordan kernel's output)."""
        if ACTIVATION == 0:
            return tl.maximum(a, 0.0)
        elif ACTIVATION == 1:
            return _tanh(a)
        elif ACTIVATION == 3:
            return 1.0 / (1.0 + tl.exp(-a))
        else:
            return a

    @triton.jit
    def _forward_kernel(z_ptr, w_ptr, lam_ptr, delay_ptr, states_ptr, T, n_delays, n_col_blocks, n_k_blocks,
                        B, H, D, lam_stride, module, ACTIVATION: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        batch = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        batch_ok = batch < B
        BH = B * H
        dtype = states_ptr.dtype.element_ty
        for t in range(T):
            for jb in range(n_col_blocks):
                cols = jb * BLOCK_N + tl.arange(0, BLOCK_N)
                col_ok = cols < H
                tile_ok = batch_ok[:, None] & col_ok[None, :]
                tile = batch[:, None] * H + cols[None, :]
                lam = tl.load(lam_ptr + t * lam_stride + cols, mask=col_ok, other=1.0).to(dtype)
                # .cg (L2, not L1) for what this program wrote the step before: read after the barrier.
                h_prev = tl.load(states_ptr + (D + t - 1) * BH + tile, mask=tile_ok, other=0.0, cache_modifier=".cg")
                h_new = h_prev
                if tl.min(lam, axis=0) < 1.0:  # some unit of this block updates (Clockwork: its module ticks)
                    acc = tl.load(z_ptr + t * BH + tile, mask=tile_ok, other=0.0).to(dtype)
                    # Block-upper-triangular U (Clockwork): these rows read no unit before their first module.
                    first_needed = (jb * BLOCK_N) // module * module
                    for k in range(n_delays):
                        source = states_ptr + (D + t - tl.load(delay_ptr + k)) * BH
                        weight = w_ptr + k * H * H
                        for kb in range(n_k_blocks):
                            if kb * BLOCK_K + BLOCK_K > first_needed:
                                inner = kb * BLOCK_K + tl.arange(0, BLOCK_K)
                                inner_ok = inner < H
                                h_block = tl.load(source + batch[:, None] * H + inner[None, :],
                                                  mask=batch_ok[:, None] & inner_ok[None, :], other=0.0,
                                                  cache_modifier=".cg")
                                w_block = tl.load(weight + cols[None, :] * H + inner[:, None],  # U^T[inner, cols]
                                                  mask=inner_ok[:, None] & col_ok[None, :], other=0.0)
                                acc = tl.dot(h_block, w_block, acc=acc, input_precision=PRECISION, out_dtype=dtype)
                    c = _activate(acc, ACTIVATION)
                    h_new = lam[None, :] * h_prev + (1.0 - lam[None, :]) * c
                tl.store(states_ptr + (D + t) * BH + tile, h_new, mask=tile_ok)
            tl.debug_barrier()  # step t's state is complete (and visible to every thread) before step t+1

    @triton.jit
    def _backward_kernel(g_ptr, gain_ptr, w_ptr, lam_ptr, delay_ptr, e_ptr, da_ptr, n_steps, T, n_delays, n_col_blocks,
                         n_k_blocks, B, H, lam_stride, module, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # e_ptr, da_ptr: (T + D, B, H) buffers whose rows T.. are zero (nothing flows back from past T-1).
        batch = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        batch_ok = batch < B
        BH = B * H
        dtype = e_ptr.dtype.element_ty
        for s in range(n_steps):  # n_steps = T as the interpreter's range needs it (see loop_count)
            t = T - 1 - s
            for jb in range(n_col_blocks):
                cols = jb * BLOCK_N + tl.arange(0, BLOCK_N)
                col_ok = cols < H
                tile_ok = batch_ok[:, None] & col_ok[None, :]
                tile = batch[:, None] * H + cols[None, :]
                lam_next = tl.load(lam_ptr + (t + 1) * lam_stride + cols, mask=col_ok & (t + 1 < T),
                                   other=0.0).to(dtype)
                acc = tl.load(g_ptr + t * BH + tile, mask=tile_ok, other=0.0).to(dtype)
                acc += lam_next[None, :] * tl.load(e_ptr + (t + 1) * BH + tile, mask=tile_ok, other=0.0,
                                                   cache_modifier=".cg")  # written the step before (L2)
                # Block-upper-triangular U (Clockwork): these columns feed no unit past their last module.
                last_needed = (tl.minimum(jb * BLOCK_N + BLOCK_N, H) - 1) // module * module + module
                for k in range(n_delays):
                    later = t + tl.load(delay_ptr + k)  # da of step t + d_k flows back through U_k
                    source = da_ptr + later * BH
                    weight = w_ptr + k * H * H
                    for kb in range(n_k_blocks):
                        if kb * BLOCK_K < last_needed:
                            inner = kb * BLOCK_K + tl.arange(0, BLOCK_K)
                            inner_ok = inner < H
                            # da is exactly 0 where lam = 1 (resting Clockwork modules) and past T - 1.
                            lam_k = tl.load(lam_ptr + later * lam_stride + inner, mask=inner_ok & (later < T),
                                            other=1.0)
                            if tl.min(lam_k, axis=0) < 1.0:
                                da_block = tl.load(source + batch[:, None] * H + inner[None, :],
                                                   mask=batch_ok[:, None] & inner_ok[None, :], other=0.0,
                                                   cache_modifier=".cg")
                                w_block = tl.load(weight + inner[:, None] * H + cols[None, :],  # U[inner, cols]
                                                  mask=inner_ok[:, None] & col_ok[None, :], other=0.0)
                                acc = tl.dot(da_block, w_block, acc=acc, input_precision=PRECISION,
                                             out_dtype=dtype)
                tl.store(e_ptr + t * BH + tile, acc, mask=tile_ok)
                gain = tl.load(gain_ptr + t * BH + tile, mask=tile_ok, other=0.0)
                tl.store(da_ptr + t * BH + tile, acc * gain, mask=tile_ok)
            tl.debug_barrier()


_DELAY_TABLES: dict = {}


def _delay_table(delays: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The delays as an int32 device tensor, made once per (delays, device): a host-to-device copy at
    every call would break CUDA-graph capture (lightning_modules/cuda_graph.py)."""
    key = (delays, str(device))
    if key not in _DELAY_TABLES:
        _DELAY_TABLES[key] = torch.tensor(delays, dtype=torch.int32, device=device)
    return _DELAY_TABLES[key]


def _blocks(hidden: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_K, num_warps): 16 batch rows (tl.dot's smallest M), unit blocks of up to
    64 output units by 32 inputs, 8 warps at full width: no register spills for float32 (IEEE or TF32)
    or float64 (ptxas for sm_90: at most 181 registers; 64 x 64 on 4 warps spills in float32)."""
    width = min(64, max(16, triton.next_power_of_2(hidden)))
    return 16, width, min(32, width), 8 if width == 64 else 4


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"  # as torch's own matmuls under the same setting (benchmarks' --precision tf32)
    return "ieee"


def _check(z, weights, past, lam, delays, activation) -> None:
    if triton is None:
        raise RuntimeError("the dense Triton kernel needs the 'triton' package; use backend='auto'")
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"dense Triton kernel: activation must be one of {tuple(ACTIVATION_CODES)}, "
                         f"got {activation!r}")
    steps, batch, hidden = z.shape
    memory = max(delays)
    if (weights.shape != (len(delays), hidden, hidden) or past.shape != (memory, batch, hidden)
            or lam.shape != (steps, hidden)):
        raise ValueError(f"dense Triton kernel: z {tuple(z.shape)} needs weights ({len(delays)}, {hidden}, {hidden}), "
                         f"past ({memory}, {batch}, {hidden}) and lam ({steps}, {hidden}); got {tuple(weights.shape)}, "
                         f"{tuple(past.shape)}, {tuple(lam.shape)}")
    if weights.dtype not in KERNEL_DTYPES:
        raise TypeError(f"dense Triton kernel: weights have dtype {weights.dtype}; supported {KERNEL_DTYPES}")
    if (steps + memory) * batch * hidden >= 2 ** 31:
        raise ValueError(f"dense Triton kernel: (T + D) * B * H = {(steps + memory) * batch * hidden} needs 64-bit "
                         "offsets; split the sequence into chunks (the layer's state carries over exactly)")
    if not z.is_cuda and not _interpreting():
        raise ValueError(f"the dense Triton kernel runs on CUDA tensors, got device {z.device}")


class DenseRecurrenceTriton(torch.autograd.Function):
    """``DenseRecurrenceTriton.apply(z, weights, past, lam, delays, activation) -> (T, B, H)``: the
    recurrence of the module docstring (shapes there); gradients for z, weights, past and lam."""

    @staticmethod
    def forward(ctx, z, weights, past, lam, delays: tuple[int, ...], activation: str, module: int | None = None,
                auto_layer: str | None = None):
        _check(z, weights, past, lam, delays, activation)
        ctx.auto_layer = auto_layer  # set: "auto" chose the kernel for this layer, a failing backward falls back
        module = z.shape[2] if module is None else int(module)
        dtype = weights.dtype
        steps, batch, hidden = z.shape
        memory = past.shape[0]
        z_in = z.detach().contiguous()
        weights_in = weights.detach().contiguous()
        lam_in = lam.detach().to(dtype)
        if lam_in.stride(1) != 1 or lam_in.stride(0) not in (0, hidden):
            lam_in = lam_in.contiguous()
        states = torch.empty(memory + steps, batch, hidden, dtype=dtype, device=z.device)
        states[:memory] = past.detach()
        delay_table = _delay_table(delays, z.device)
        block_b, block_n, block_k, warps = _blocks(hidden)
        if steps > 0:
            with _device_guard(z):
                _forward_kernel[(triton.cdiv(batch, block_b),)](
                    z_in, weights_in, lam_in, delay_table, states, loop_count(steps), loop_count(len(delays)),
                    loop_count(triton.cdiv(hidden, block_n)), loop_count(triton.cdiv(hidden, block_k)),
                    batch, hidden, memory, lam_in.stride(0), module, ACTIVATION=ACTIVATION_CODES[activation],
                    PRECISION=_precision(dtype, z.device), BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k,
                    num_warps=warps)
        ctx.save_for_backward(z_in, weights_in, lam_in, delay_table, states)
        ctx.delays, ctx.activation, ctx.z_dtype, ctx.lam_dtype = delays, activation, z.dtype, lam.dtype
        ctx.module = module
        return states[memory:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return triton_auto.run(ctx.auto_layer, lambda: _kernel_gradients(ctx, grad_out),
                               lambda: _reference_gradients(ctx, grad_out))


def _reference_gradients(ctx, grad_out):
    """DenseRecurrenceTriton.backward's gradients through :func:`dense_recurrence_reference` (a fallback)."""
    z, weights, lam, _, states = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (z, weights, states[:states.shape[0] - z.shape[0]], lam)]
        grads = torch.autograd.grad(dense_recurrence_reference(*inputs, ctx.delays, ctx.activation), inputs, grad_out)
    return (grads[0].to(ctx.z_dtype), grads[1], grads[2], grads[3].to(ctx.lam_dtype), None, None, None, None)


def _kernel_gradients(ctx, grad_out):
    """DenseRecurrenceTriton.backward by the second persistent kernel (see the module docstring)."""
    z, weights, lam, delay_table, states = ctx.saved_tensors
    delays, activation = ctx.delays, ctx.activation
    steps, batch, hidden = z.shape
    memory = states.shape[0] - steps
    dtype = weights.dtype
    # The pre-activations of every step at once (the forward kept only the states).
    pre = z.to(dtype).clone()
    for k, delay in enumerate(delays):
        pre += states[memory - delay: memory - delay + steps] @ weights[k].t()
    fresh = activate(pre, activation)  # c_t
    if activation == "tanh":
        slope = 1 - fresh * fresh
    elif activation == "relu":
        slope = (pre > 0).to(dtype)
    else:
        slope = torch.ones_like(pre)
    gain = (slope * (1 - lam[:, None, :])).contiguous()  # (T, B, H): da_t = e_t * gain_t
    adjoint = torch.zeros(steps + memory, batch, hidden, dtype=dtype, device=z.device)  # e_t
    grad_pre = torch.zeros(steps + memory, batch, hidden, dtype=dtype, device=z.device)  # da_t
    block_b, block_n, block_k, warps = _blocks(hidden)
    with _device_guard(z):
        _backward_kernel[(triton.cdiv(batch, block_b),)](
            grad_out.contiguous(), gain, weights, lam, delay_table, adjoint, grad_pre, loop_count(steps),
            steps, loop_count(len(delays)), loop_count(triton.cdiv(hidden, block_n)),
            loop_count(triton.cdiv(hidden, block_k)), batch, hidden, lam.stride(0), ctx.module,
            PRECISION=_precision(dtype, z.device), BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps)
    da = grad_pre[:steps]
    flat_da = da.reshape(steps * batch, hidden)
    grad_weights = torch.stack([
        flat_da.t() @ states[memory - delay: memory - delay + steps].reshape(steps * batch, hidden)
        for delay in delays])
    # dL/dh_{j - D} for the past rows j: da_t U_k for the steps t = j - D + d_k inside [0, T), and the
    # leak's lam_0 * e_0 into h_{-1}.
    grad_past = torch.zeros(memory, batch, hidden, dtype=dtype, device=z.device)
    for k, delay in enumerate(delays):
        first, last = max(0, memory - delay), min(memory, memory - delay + steps)
        if first < last:
            t0 = first - memory + delay
            grad_past[first:last] += da[t0: t0 + last - first] @ weights[k]
    grad_past[memory - 1] += lam[0] * adjoint[0]
    previous = states[memory - 1: memory - 1 + steps]
    grad_lam = (adjoint[:steps] * (previous - fresh)).sum(1)
    return (da.to(ctx.z_dtype), grad_weights, grad_past, grad_lam.to(ctx.lam_dtype), None, None, None, None)


def dense_recurrence_triton(z: torch.Tensor, weights: torch.Tensor, past: torch.Tensor, lam: torch.Tensor,
                            delays: Sequence[int], activation: str, module: int | None = None,
                            fallback_for: str | None = None) -> torch.Tensor:
    """All hidden states (T, B, H) of the module docstring's recurrence, by the Triton kernels.

    ``module``: None for dense U; for a block-upper-triangular U (Clockwork: U[i, j] = 0 unless unit
    j's module >= unit i's, modules of ``module`` units) the units per module, so that the kernels
    skip the zero blocks. ``fallback_for``: the layer's name when "auto" chose the kernel (a kernel that
    fails then gives the reference's result and the layer its loop: :mod:`src.kernels.triton_auto`);
    None raises."""
    if module is not None and (module < 1 or z.shape[2] % module):
        raise ValueError(f"dense Triton kernel: module {module} must divide the hidden size {z.shape[2]}")
    delays = tuple(int(d) for d in delays)
    return triton_auto.run(fallback_for, lambda: DenseRecurrenceTriton.apply(z, weights, past, lam, delays, activation,
                                                                               module, fallback_for),
                           lambda: dense_recurrence_reference(z, weights, past, lam, delays, activation))
