"""Fused IndRNN recurrence on the CPU: an autograd Function with a hand-written backward.

Why: with autograd recording every step, an IndRNN loop costs ~100 small kernel launches and graph
nodes per step; the recurrence itself is only elementwise work. Here the forward pass and the
backward pass each run as one loop over time with no autograd graph inside:

* with numba installed (a default dependency), both passes are JIT-compiled loops over
  (batch, time, unit), compiled once per dtype and cached on disk (``cache=True``); tanh's
  forward pass is the exception (PyTorch steps, see ``IndRNNRecurrenceCPU.forward``);
* without it (or for dtypes numba does not handle) the same loops run as vectorised PyTorch
  operations per time step.

Buffers of the numba path (outputs, gradients, contiguous copies) are allocated by numpy and
wrapped with ``torch.from_numpy``: numpy asks the kernel for transparent huge pages on large
arrays, and first-touch page faults on fresh 4 KiB pages otherwise cost as much as the recurrence
itself (measured: 2.4 ms vs 16 ms for the forward pass at T=784, B=64, H=128 on a 2-core VM).

Backward pass, for h_t = f(a_t), a_t = z_t + u * h_{t-1}, with g_t the incoming gradient of h_t:
    delta_t = clip((g_t + u * delta_{t+1}) * f'(a_t))      (delta_T = 0)
    dL/dz_t = delta_t,  dL/du = sum_{t,b} delta_t * h_{t-1},  dL/dh0 = u * delta_0
f'(a_t) is read from the saved outputs: relu: [h_t > 0]; tanh: 1 - h_t^2; identity: 1.
clip is the identity, or with ``grad_clip=c`` a clamp to [-c, c] at every step (Theano's per-step
recurrent gradient clipping, see :mod:`src.kernels.reference`); a NaN stays NaN.
"""
from __future__ import annotations

import logging

import torch

from src.kernels.reference import ACTIVATIONS

log = logging.getLogger(__name__)

ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
NUMBA_DTYPES = (torch.float32, torch.float64)

try:  # numba is optional: without it the vectorised PyTorch loops below are used.
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None


def numba_available() -> bool:
    """True when the numba-compiled loops can be used."""
    return numba is not None


if numba is not None:

    # Loops run time-outer over the whole (B, H) block, so every pass streams through memory in
    # order and the carried state (B*H values) stays in cache; the activation branch sits outside
    # the loop over units and constants take the array's dtype (a float64 literal would force
    # float32 -> float64), so that LLVM vectorises the innermost loop.
    @numba.njit(cache=True, nogil=True)
    def forward_steps(z, u, h_in, activation, start, stop, out):  # pragma: no cover - compiled
        """out[t] = act(z[t] + u * out[t-1]) for start <= t < stop, from out[start-1] = h_in (B, H); relu (0)
        or identity (2): tanh's forward pass runs as PyTorch steps (see IndRNNRecurrenceCPU). The scan
        (src/kernels/indrnn_scan/chunk_cpu.py) runs its pieces with it, so both round alike."""
        batch, hidden = z.shape[1], z.shape[2]
        zero = z.dtype.type(0)
        for t in range(start, stop):
            previous = out[t - 1] if t > start else h_in
            for b in range(batch):
                z_t, h_t, h_prev = z[t, b], out[t, b], previous[b]
                for j in range(hidden):
                    h_t[j] = z_t[j] + u[j] * h_prev[j]
                if activation == 0:
                    for j in range(hidden):
                        h_t[j] = max(h_t[j], zero)

    # Elements (steps x B x H) per block of the backward loops: three float32 arrays of this many
    # values stay in the L2 cache.
    WARM_ELEMENTS = 16384
    # The backward loops warm a block when a step holds under this many bytes (B x H values), or when the
    # incoming gradient is batch-major. A time-major step of 32 KiB is walked upwards within the step,
    # which the prefetchers follow (backward_steps at T784_B64_I1_H128: 4.2 ms unwarmed); at 2 KiB a
    # step warming saves a quarter, at 512 B half. A batch-major gradient puts each row of a step in
    # its own descending stream: unwarmed 11.0 ms, warmed 7.7 ms (projection kernel: 7.1 ms, against
    # 4.6 ms time-major; a transposed copy of the gradient alone costs 3.5 ms).
    WARM_BELOW_BYTES = 4096

    @numba.njit(inline="always")
    def warm_block(grad_out, grad_batch_major, out, grad_z, start, stop):  # pragma: no cover - compiled
        """Read one value per 64-byte line of steps start-1 .. stop-1 of out, the incoming gradient and
        grad_z, in increasing address order, and return their (meaningless) sum.

        Why: the backward loops walk time downwards, and the hardware prefetchers do not follow
        descending streams here: at T=10^4, B=1, H=128 the backward loop took 6-10 ms against 0.3 ms
        for the same loop run upwards. Touching each block upwards first brings it into the cache
        (1.7 ms). The caller returns the sum so that the reads are not optimised away."""
        sink = out.dtype.type(0)
        batch, hidden = out.shape[1], out.shape[2]
        for t in range(max(start - 1, 0), stop):
            for b in range(batch):
                g_t = grad_out[b, t] if grad_batch_major else grad_out[t, b]
                h_t, d_t = out[t, b], grad_z[t, b]
                for j in range(0, hidden, 8):
                    sink += h_t[j] + g_t[j] + d_t[j]
        return sink

    @numba.njit(inline="always")
    def block_bottom(top, start, columns):  # pragma: no cover - compiled
        """The first step of the backward block that ends before step ``top``: blocks of about
        WARM_ELEMENTS values (steps x B*H), walked from the last step down (see warm_block)."""
        return max(start, top - max(1, WARM_ELEMENTS // max(1, columns)))

    @numba.njit(inline="always")
    def carry_into(delta_next, u, delta_first):  # pragma: no cover - compiled
        """u * delta_next (B, H): what the step below a piece receives from above; ``delta_first`` starts as
        delta_next (what an empty piece leaves)."""
        carry = np.empty_like(delta_next)
        for b in range(carry.shape[0]):
            for j in range(carry.shape[1]):
                carry[b, j] = delta_next[b, j] * u[j]
                delta_first[b, j] = delta_next[b, j]
        return carry

    # Per (step, row) a few short loops over units, each branch-free with one or two stores and indexing
    # the arrays in full (out[t, b, j]) rather than through row views: LLVM vectorises those. Measured on
    # the projection kernel's backward pass at T784_B64_I1_H128 (same structure): one loop doing
    # everything, with a branch and four stores, stayed scalar: 10.6 ms; split loops: 6.2 ms with row
    # views, 4.7-5.0 ms as written. The activation is a select on loop-invariant flags: branching on it
    # around the loops cost 40 %; a copy of the loop nest per activation was 2-4 % faster for relu and
    # 10-40 % for identity, but doubled the compile time. Moving the loops into a helper called per row
    # cost 30-60 %. Operands are computed before a select: Python's conditional expression is lazy, so
    # an operand computed inside it stays a branch.
    @numba.njit(cache=True, nogil=True)
    def backward_steps(grad_out, batch_major, out, u, h0, activation, clip, start, stop, delta_next, grad_z,
                       partial_u, delta_first):  # pragma: no cover - compiled
        """The backward loop over steps stop-1 down to start, from delta_stop = ``delta_next`` (B, H):
        writes grad_z[t] = delta_t, adds delta_t h_{t-1} into ``partial_u`` (B, H) and leaves delta_start
        in ``delta_first`` (B, H). The whole sequence is start = 0, stop = T, delta_next = 0; the scan runs
        its pieces with it."""
        batch, hidden = out.shape[1], out.shape[2]
        zero, one, clip = out.dtype.type(0), out.dtype.type(1), out.dtype.type(clip)
        tanh, not_relu = activation == 1, activation != 0
        carry = carry_into(delta_next, u, delta_first)  # u * delta_{t+1}
        sink = zero
        top = stop
        while top > start:  # blocks of steps from the last down, some warmed upwards first (see WARM_BELOW_BYTES)
            bottom = block_bottom(top, start, batch * hidden)
            if batch_major or batch * hidden * out.itemsize < WARM_BELOW_BYTES:
                sink += warm_block(grad_out, batch_major, out, grad_z, bottom, top)
            for t in range(top - 1, bottom - 1, -1):
                for b in range(batch):
                    # delta_t = clip((g_t + u delta_{t+1}) act'(a_t)), written to grad_z[t]. relu's derivative is a
                    # select, not a multiply by [h > 0], so that an infinite or NaN gradient of an inactive unit
                    # gives 0, as torch's relu backward does; act' is read from h_t = act(a_t).
                    for j in range(hidden):
                        state = out[t, b, j]
                        value = (grad_out[b, t, j] if batch_major else grad_out[t, b, j]) + carry[b, j]
                        scaled = value * (one - state * state)
                        value = scaled if tanh else value
                        grad_z[t, b, j] = value if (state > zero) | not_relu else zero
                    if clip > zero:  # two selects: a NaN stays NaN
                        for j in range(hidden):
                            value = grad_z[t, b, j]
                            value = clip if value > clip else value
                            grad_z[t, b, j] = -clip if value < -clip else value
                    if t > 0:
                        for j in range(hidden):
                            partial_u[b, j] += grad_z[t, b, j] * out[t - 1, b, j]
                    else:
                        for j in range(hidden):
                            partial_u[b, j] += grad_z[t, b, j] * h0[b, j]
                    for j in range(hidden):
                        carry[b, j] = grad_z[t, b, j] * u[j]
            top = bottom
        if stop > start:
            delta_first[:] = grad_z[start]
        return sink


def _torch_forward(z, u, h0, activation, out):
    state = h0
    for t in range(z.shape[0]):
        torch.addcmul(z[t], u, state, out=out[t])
        if activation == 0:
            out[t].clamp_(min=0)
        elif activation == 1:
            out[t].tanh_()
        state = out[t]


def _torch_backward(grad_out, out, u, h0, activation, clip, grad_z, grad_u, grad_h0):
    carry = torch.zeros_like(h0)
    for t in range(out.shape[0] - 1, -1, -1):
        torch.add(grad_out[t], carry, out=grad_z[t])
        if activation == 0:
            grad_z[t].mul_(out[t] > 0)
        elif activation == 1:
            grad_z[t].mul_(1 - out[t] * out[t])
        if clip > 0:
            grad_z[t].clamp_(-clip, clip)
        carry = grad_z[t] * u
    previous_states = torch.cat([h0.unsqueeze(0), out[:-1]])
    grad_u.copy_((grad_z * previous_states).sum(dim=(0, 1)))
    grad_h0.copy_(carry)


def contiguous_array(tensor: torch.Tensor):
    """A C-contiguous numpy view of ``tensor``, copied only if it is not contiguous already."""
    return np.ascontiguousarray(tensor.detach().numpy())


def gradient_rows(grad: torch.Tensor):
    """``grad`` (T, B, H) as a C-contiguous numpy array and whether it is stored batch-major.

    A batch-first network hands back gradients laid out as (B, T, H); the kernels read them in that
    order rather than copying T*B*H values into (T, B, H) first. Returns (array (T, B, H) or
    (B, T, H), batch_major).
    """
    if not grad.is_contiguous() and grad.transpose(0, 1).is_contiguous():
        return grad.detach().transpose(0, 1).numpy(), True
    return contiguous_array(grad), False


def _use_numba(tensor: torch.Tensor, allow_numba: bool) -> bool:
    return allow_numba and numba is not None and tensor.dtype in NUMBA_DTYPES


def clip_code(grad_clip: float | None) -> float:
    """The kernels' clip argument: the bound c, or 0.0 for no clipping."""
    return 0.0 if grad_clip is None else float(grad_clip)


class IndRNNRecurrenceCPU(torch.autograd.Function):
    """Fused h_t = act(z_t + u * h_{t-1}); see the module docstring for the backward pass.

    ``IndRNNRecurrenceCPU.apply(z, u, h0, activation, allow_numba=True, grad_clip=None)``: z (T, B, H),
    u (H,), h0 (B, H) -> all states (T, B, H); ``grad_clip`` c clamps dL/da_t to [-c, c] at every step.
    """

    @staticmethod
    def forward(ctx, z, u, h0, activation: str, allow_numba: bool = True, grad_clip: float | None = None):
        code = ACTIVATION_CODES[activation]
        numba_path = _use_numba(z, allow_numba)
        if numba_path:
            z_array, u_array, h0_array = (contiguous_array(t) for t in (z, u, h0))
            out = torch.from_numpy(np.empty_like(z_array))
            if activation == "tanh":
                # Without Intel's SVML, numba calls the scalar libm tanh per element (126 ms at T=784,
                # B=64, H=128, slower than the reference loop); torch's tanh is vectorised, so this
                # forward pass runs as PyTorch steps (22 ms); the backward pass needs no tanh.
                _torch_forward(*(torch.from_numpy(a) for a in (z_array, u_array, h0_array)), code, out)
            else:
                forward_steps(z_array, u_array, h0_array, code, 0, z_array.shape[0], out.numpy())
        else:
            z, u, h0 = z.contiguous(), u.contiguous(), h0.contiguous()
            out = torch.empty_like(z)
            with torch.no_grad():
                _torch_forward(z, u, h0, code, out)
        ctx.save_for_backward(out, u, h0)
        ctx.activation_code, ctx.clip = code, clip_code(grad_clip)
        ctx.numba_path = numba_path
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out, u, h0 = ctx.saved_tensors
        if ctx.numba_path:
            out_array, u_array, h0_array = out.numpy(), contiguous_array(u), contiguous_array(h0)
            grad_z, partial_u, delta_first = np.empty_like(out_array), np.zeros_like(h0_array), np.empty_like(h0_array)
            backward_steps(*gradient_rows(grad_out), out_array, u_array, h0_array, ctx.activation_code, ctx.clip,
                           0, out_array.shape[0], np.zeros_like(h0_array), grad_z, partial_u, delta_first)
            grad_z, grad_u, grad_h0 = (torch.from_numpy(a) for a in (grad_z, partial_u.sum(axis=0),
                                                                     delta_first * u_array))
        else:
            grad_out = grad_out.contiguous()
            grad_z, grad_u, grad_h0 = torch.empty_like(out), torch.empty_like(u), torch.empty_like(h0)
            with torch.no_grad():
                _torch_backward(grad_out, out, u, h0, ctx.activation_code, ctx.clip, grad_z, grad_u, grad_h0)
        return grad_z, grad_u, grad_h0, None, None, None
