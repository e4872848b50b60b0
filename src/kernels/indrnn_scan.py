"""IndRNN in parallel over time, exactly: the clamp-affine scan (derivation: src/kernels/README.md).

A relu or identity IndRNN step h_t = act(u * h_{t-1} + z_t) is the map h -> clamp(a h + b, lo, hi)
with a = u, b = z_t and [lo, hi] = [0, inf] (relu) or [-inf, inf] (identity). Such maps are closed
under composition, so all states are an inclusive scan over 4-tuples (a, b, lo, hi) applied to h0.
The backward pass is again such a scan, run from the last step down: with m_t = 1[a_t > 0] (relu;
1 for identity) and e_t = dL/dh_t, the gradient delta_t = dL/da_t of the pre-activation is
    delta_t = clip(m_t * (e_t + u * delta_{t+1}))     (delta_T = 0; clip: [-c, c] or the identity)
the map d -> clamp(m_t u d + m_t e_t, -c, c). Then dL/dz_t = delta_t,
dL/du = sum_{t,b} delta_t h_{t-1}, dL/dh0 = u delta_0, as in :mod:`src.kernels.indrnn_cpu`.

Two implementations, side by side:

* :class:`IndRNNScanTorch`: the log-depth (Hillis-Steele) scan in plain PyTorch, any dtype and
  device, O(T log T) work. It is the readable statement of the algebra and what the tests check the
  fast kernels with; no speed intended.
* :class:`IndRNNScanCPU`: the chunked scan with threads along time (numba loops compiled nogil, run
  on a small thread pool; as many threads as ``numba.get_num_threads()``). Forward: thread 0 runs
  the first piece step by step from h0 while the other threads compose the maps of the later pieces
  (no stores, cheaper than a step); one short serial pass carries the state across pieces through
  their maps; then every thread runs its pieces step by step from the carried state. Backward:
  the same from the last step down, on delta. Each piece's own steps run the sequential kernel's
  arithmetic, so the results differ from :class:`src.kernels.indrnn_cpu.IndRNNRecurrenceCPU` only
  by the rounding of the carried states at piece boundaries (relative 1e-16 to 4e-15 in float64).

* :class:`IndRNNLinearScanCPU`: the same with the input projection inside its loops for few inputs
  (I <= 8), as :mod:`src.kernels.indrnn_linear_cpu` does step by step: z and dL/dz are never stored.

tanh is not clamp-affine: :func:`scan_applies` is False and the dispatcher uses the sequential
kernel. A piece whose composed slope u^L overflows (|u| > 1 over a long piece) is carried step by
step instead, so the result stays exact.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from src.kernels.indrnn_cpu import (ACTIVATION_CODES, NUMBA_DTYPES, clip_code, contiguous_array, gradient_rows,
                                     numba, numba_available)

if numba is not None:
    from src.kernels.indrnn_cpu import WARM_ELEMENTS, warm_block

SCAN_ACTIVATIONS = ("relu", "identity")

# Cost of composing one step's map relative to running the step (measured on a 2-core VM, float32,
# B=1, H=128: 0.52; composing reads z and stores nothing). The first piece, run from h0 while the other
# threads compose, gets the share that balances the two (see _piece_bounds).
COMPOSE_COST_RATIO = 0.5
# Below this many steps per thread the threads' start-up costs more than they save.
MIN_STEPS_PER_THREAD = 64


def scan_applies(activation: str) -> bool:
    """Whether the recurrence is clamp-affine, i.e. has a scan: relu and identity (not tanh)."""
    return activation in SCAN_ACTIVATIONS


# ----------------------------------------------------------------------------------------------
# The reference: a log-depth scan in plain PyTorch.

def _bounds(activation: str, like: torch.Tensor, clip: float | None = None):
    """(lo, hi) of one step's clamp, broadcastable to ``like``."""
    if clip is not None:
        return like.new_full((), -clip), like.new_full((), clip)
    low = 0.0 if activation == "relu" else -math.inf
    return like.new_full((), low), like.new_full((), math.inf)


def compose(first, second):
    """The map ``second o first`` of two clamp-affine maps (a, b, lo, hi): h -> clamp(a h + b, lo, hi).

    a = a2 a1, b = a2 b1 + b2; the inner bounds map to a2 lo1 + b2 and a2 hi1 + b2 (swapped when
    a2 < 0; both b2 when a2 = 0, never 0 * inf), then are clamped into [lo2, hi2] (equal bounds
    where the intervals do not meet: a constant map). Tensors of any broadcastable shapes.
    """
    a1, b1, lo1, hi1 = first
    a2, b2, lo2, hi2 = second
    flat = a2 == 0
    image_lo = torch.where(flat, b2, a2 * lo1 + b2)
    image_hi = torch.where(flat, b2, a2 * hi1 + b2)
    negative = a2 < 0
    new_lo = torch.where(negative, image_hi, image_lo)
    new_hi = torch.where(negative, image_lo, image_hi)
    return (a2 * a1, a2 * b1 + b2, torch.clamp(new_lo, lo2, hi2), torch.clamp(new_hi, lo2, hi2))


def apply_map(mapping, h: torch.Tensor) -> torch.Tensor:
    """clamp(a h + b, lo, hi) for a map (a, b, lo, hi); h finite. A constant map (lo == hi) gives lo."""
    a, b, lo, hi = mapping
    value = torch.where(a == 0, b, a * h + b)
    return torch.where(lo == hi, lo, torch.clamp(value, lo, hi))


def inclusive_scan(maps):
    """Prefix compositions along dim 0: out[t] = maps[t] o ... o maps[0], in ceil(log2 T) rounds."""
    maps = tuple(maps)
    steps = maps[0].shape[0]
    offset = 1
    while offset < steps:
        earlier = tuple(m[:-offset] for m in maps)
        later = tuple(m[offset:] for m in maps)
        combined = compose(earlier, later)
        maps = tuple(torch.cat([m[:offset], c]) for m, c in zip(maps, combined))
        offset *= 2
    return maps


def scan_forward_torch(z: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, activation: str) -> torch.Tensor:
    """All states (T, B, H) of h_t = act(z_t + u h_{t-1}) by the log-depth scan; z (T, B, H), u (H,), h0 (B, H)."""
    if z.shape[0] == 0:
        return z.new_empty(z.shape)
    lo, hi = _bounds(activation, z)
    maps = (u.expand_as(z), z, lo.expand_as(z), hi.expand_as(z))
    return apply_map(inclusive_scan(maps), h0.unsqueeze(0))


def scan_deltas_torch(grad_out, out, u, activation: str, grad_clip: float | None) -> torch.Tensor:
    """delta_t = dL/da_t (T, B, H) by the reverse log-depth scan (see the module docstring)."""
    active = out > 0 if activation == "relu" else torch.ones_like(out, dtype=torch.bool)
    slope = torch.where(active, u.expand_as(out), torch.zeros_like(out))
    offset = torch.where(active, grad_out, torch.zeros_like(out))  # a select: 0 * inf stays 0, as relu's backward
    lo, hi = _bounds("identity", out, grad_clip)
    maps = (slope.flip(0), offset.flip(0), lo.expand_as(out), hi.expand_as(out))
    return apply_map(inclusive_scan(maps), out.new_zeros(out.shape[1:])).flip(0)


def parameter_gradients(deltas, out, u, h0):
    """(dL/du (H,), dL/dh0 (B, H)) from the deltas (T, B, H), the states (T, B, H) and h0 (B, H)."""
    previous = torch.cat([h0.unsqueeze(0), out[:-1]])
    return (deltas * previous).sum(dim=(0, 1)), u * deltas[0]


class IndRNNScanTorch(torch.autograd.Function):
    """h_t = act(z_t + u * h_{t-1}) (relu or identity) by the log-depth scan, forward and backward.

    ``IndRNNScanTorch.apply(z, u, h0, activation, grad_clip=None)``: z (T, B, H), u (H,), h0 (B, H) ->
    all states (T, B, H); ``grad_clip`` c clamps dL/da_t to [-c, c] at every step. Any dtype/device.
    """

    @staticmethod
    def forward(ctx, z, u, h0, activation: str, grad_clip: float | None = None):
        _check_activation(activation)
        out = scan_forward_torch(z.detach(), u.detach(), h0.detach(), activation)
        ctx.save_for_backward(out, u, h0)
        ctx.activation, ctx.grad_clip = activation, grad_clip
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        out, u, h0 = ctx.saved_tensors
        if out.shape[0] == 0:
            return torch.zeros_like(out), torch.zeros_like(u), torch.zeros_like(h0), None, None
        deltas = scan_deltas_torch(grad_out, out, u, ctx.activation, ctx.grad_clip)
        grad_u, grad_h0 = parameter_gradients(deltas, out, u, h0)
        return deltas, grad_u, grad_h0, None, None


def _check_activation(activation: str) -> None:
    if not scan_applies(activation):
        raise ValueError(f"the IndRNN scan needs a clamp-affine activation {SCAN_ACTIVATIONS}, got {activation!r}; "
                         "tanh runs on the sequential kernels (backend='auto')")


# ----------------------------------------------------------------------------------------------
# The CPU chunked scan (threads along time, each running nogil numba loops).

if numba is not None:
    import numpy as np

    @numba.njit(inline="always")
    def _times(u, h, zero):  # pragma: no cover - compiled
        """u * h with 0 * inf = 0 (a step with u = 0 forgets its input, even an infinite bound)."""
        return zero if u == zero else u * h

    @numba.njit(cache=True, nogil=True)
    def _forward_steps(z, u, h_in, activation, start, stop, out):  # pragma: no cover - compiled
        """out[t] = act(z[t] + u * out[t-1]) for start <= t < stop, from out[start-1] = h_in (B, H).
        The arithmetic of indrnn_cpu's forward loop, so each step rounds as it does."""
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

    @numba.njit(cache=True, nogil=True)
    def _forward_compose(z, u, activation, start, stop, offset, low, high):  # pragma: no cover - compiled
        """The map of steps start..stop-1 on the states that can enter them, [0, +inf) for relu (every
        state after the first step is a relu output) and all reals for identity: its slope is
        u^(stop - start), ``offset`` (B, H) the unclamped state reached from 0, ``low``/``high``
        (B, H) the images of the domain's ends (relu: of 0 and +inf, by running the step from them;
        identity: -inf and +inf). Stores nothing per step, reads z once.

        For relu the image of +inf stays +inf where u >= 0 (and u = 0 needs no bound: its slope is
        0), so only the units with u < 0 run that second trajectory, in a loop of their own: the
        vectorised loop over all units does one FMA for the offset and one FMA and max for the
        image of 0."""
        batch, hidden = z.shape[1], z.shape[2]
        zero, inf = z.dtype.type(0), z.dtype.type(np.inf)
        relu = activation == 0
        for b in range(batch):
            for j in range(hidden):
                offset[b, j] = zero
                low[b, j] = zero if relu else -inf
                high[b, j] = inf
        negative = np.nonzero(u < zero)[0] if relu else np.empty(0, dtype=np.int64)
        for t in range(start, stop):
            for b in range(batch):
                z_t, o_b, l_b, h_b = z[t, b], offset[b], low[b], high[b]
                for j in range(hidden):
                    o_b[j] = z_t[j] + u[j] * o_b[j]
                if relu:
                    for j in range(hidden):
                        l_b[j] = max(z_t[j] + u[j] * l_b[j], zero)
                    for j in negative:  # u < 0: u * inf = -inf, never 0 * inf
                        h_b[j] = max(z_t[j] + u[j] * h_b[j], zero)

    @numba.njit(inline="always")
    def _apply(slope, offset, low, high, x, zero):  # pragma: no cover - compiled
        """clamp(slope x + offset, min(low, high), max(low, high)); a constant map (low == high) gives low."""
        if low == high:
            return low
        value = offset if slope == zero else slope * x + offset
        lo, hi = (low, high) if low < high else (high, low)
        return lo if value < lo else (hi if value > hi else value)

    @numba.njit(cache=True, nogil=True)
    def _backward_steps(grad_out, batch_major, out, u, h0, activation, clip, start, stop, delta_next, grad_z,
                        partial_u, delta_first):  # pragma: no cover - compiled
        """indrnn_cpu's backward loop for steps stop-1 down to start, from delta_{stop} = ``delta_next``:
        writes grad_z[t], adds delta_t h_{t-1} into ``partial_u`` (B, H), leaves delta_start in
        ``delta_first`` (B, H)."""
        batch, hidden = out.shape[1], out.shape[2]
        zero, one, clip = out.dtype.type(0), out.dtype.type(1), out.dtype.type(clip)
        carry = np.empty((batch, hidden), dtype=out.dtype)  # u * delta_{t+1}
        for b in range(batch):
            for j in range(hidden):
                carry[b, j] = delta_next[b, j] * u[j]
        block = max(1, WARM_ELEMENTS // max(1, batch * hidden))
        sink = zero
        high = stop
        while high > start:  # blocks from the last step down, each warmed upwards (indrnn_cpu.warm_block)
            low = max(start, high - block)
            sink += warm_block(grad_out, batch_major, out, grad_z, low, high)
            for t in range(high - 1, low - 1, -1):
                previous = out[t - 1] if t > 0 else h0
                for b in range(batch):
                    g_t = grad_out[b, t] if batch_major else grad_out[t, b]
                    h_t, d_t, c_b = out[t, b], grad_z[t, b], carry[b]
                    h_prev, p_b = previous[b], partial_u[b]
                    for j in range(hidden):
                        delta = _delta(g_t[j], c_b[j], h_t[j], activation, zero, one, clip)
                        d_t[j] = delta
                        p_b[j] += delta * h_prev[j]
                        c_b[j] = delta * u[j]
            high = low
        for b in range(batch):
            for j in range(hidden):
                delta_first[b, j] = grad_z[start, b, j] if stop > start else delta_next[b, j]
        return sink

    @numba.njit(inline="always")
    def _delta(grad, carry, state, activation, zero, one, clip):  # pragma: no cover - compiled
        """As indrnn_cpu.delta_of for relu (0) and identity (2)."""
        if activation == 0:
            delta = (grad + carry) if state > zero else zero
        else:
            delta = grad + carry
        if clip > zero:
            if delta > clip:
                delta = clip
            elif delta < -clip:
                delta = -clip
        return delta

    @numba.njit(cache=True, nogil=True)
    def _backward_compose(grad_out, batch_major, out, u, activation, clip, start, stop, slope, offset, low,
                          high):  # pragma: no cover - compiled
        """The map delta_{stop} -> delta_{start} of steps stop-1 down to start: ``slope`` (B, H) the
        product of m_t u, ``offset`` the unclipped delta reached from 0, ``low``/``high`` the images of
        -inf/+inf (clipped trajectories; without clipping -inf/+inf)."""
        batch, hidden = out.shape[1], out.shape[2]
        zero, one, inf = out.dtype.type(0), out.dtype.type(1), out.dtype.type(np.inf)
        clip = out.dtype.type(clip)
        for b in range(batch):
            for j in range(hidden):
                slope[b, j] = one
                offset[b, j] = zero
                low[b, j] = -inf
                high[b, j] = inf
        block = max(1, WARM_ELEMENTS // max(1, batch * hidden))
        sink = zero
        top = stop
        while top > start:
            bottom = max(start, top - block)
            sink += warm_block(grad_out, batch_major, out, out, bottom, top)
            for t in range(top - 1, bottom - 1, -1):
                _backward_compose_step(grad_out, batch_major, out, u, activation, clip, t, slope, offset, low, high,
                                       zero, one)
            top = bottom
        return sink

    @numba.njit(inline="always")
    def _backward_compose_step(grad_out, batch_major, out, u, activation, clip, t, slope, offset, low, high, zero,
                               one):  # pragma: no cover - compiled
        """One step of _backward_compose: the map of step t composed after the current one."""
        batch, hidden = out.shape[1], out.shape[2]
        for b in range(batch):
            g_t = grad_out[b, t] if batch_major else grad_out[t, b]
            h_t, s_b, o_b, l_b, hi_b = out[t, b], slope[b], offset[b], low[b], high[b]
            if activation == 0:
                for j in range(hidden):
                    active = h_t[j] > zero
                    s_b[j] = s_b[j] * u[j] if active else zero
                    o_b[j] = (g_t[j] + o_b[j] * u[j]) if active else zero
            else:
                for j in range(hidden):
                    s_b[j] = s_b[j] * u[j]
                    o_b[j] = g_t[j] + o_b[j] * u[j]
            if clip > zero:
                for j in range(hidden):
                    u_j = u[j]
                    l_b[j] = _delta(g_t[j], _times(u_j, l_b[j], zero), h_t[j], activation, zero, one, clip)
                    hi_b[j] = _delta(g_t[j], _times(u_j, hi_b[j], zero), h_t[j], activation, zero, one, clip)

    @numba.njit(cache=True, nogil=True)
    def _carry_through(slope, offset, low, high, x, result):  # pragma: no cover - compiled
        """result = the map (slope, offset, low, high) applied to x, all (B, H); False where a
        non-constant map is not finite (an overflowed slope: the caller carries step by step)."""
        zero = x.dtype.type(0)
        finite = True
        batch, hidden = x.shape
        for b in range(batch):
            for j in range(hidden):
                value = _apply(slope[b, j], offset[b, j], low[b, j], high[b, j], x[b, j], zero)
                if low[b, j] != high[b, j] and not (np.isfinite(slope[b, j]) and np.isfinite(offset[b, j])):
                    finite = False
                result[b, j] = value
        return finite

    @numba.njit(cache=True, nogil=True)
    def _forward_compose_pieces(z, u, activation, bounds, first, stop, maps):  # pragma: no cover - compiled
        """The maps of pieces first..stop-1 into maps[p, 1:] (offset, low, high); bounds (P + 1,)."""
        for p in range(first, stop):
            _forward_compose(z, u, activation, bounds[p], bounds[p + 1], maps[p, 1], maps[p, 2], maps[p, 3])

    @numba.njit(cache=True, nogil=True)
    def _forward_carry(z, u, activation, bounds, out, states, maps, redo):  # pragma: no cover - compiled
        """states[p] = the state entering piece p, for p >= 1, from piece 0's last output through the
        maps of pieces 1..P-2; a piece whose map is not finite is run step by step here (redo[p])."""
        pieces = bounds.shape[0] - 1
        batch, hidden = z.shape[1], z.shape[2]
        states[1] = out[bounds[1] - 1]
        for p in range(1, pieces - 1):
            length = bounds[p + 1] - bounds[p]
            for b in range(batch):
                for j in range(hidden):
                    maps[p, 0, b, j] = u[j] ** length
            if not _carry_through(maps[p, 0], maps[p, 1], maps[p, 2], maps[p, 3], states[p], states[p + 1]):
                _forward_steps(z, u, states[p], activation, bounds[p], bounds[p + 1], out)
                states[p + 1] = out[bounds[p + 1] - 1]
                redo[p] = True

    @numba.njit(cache=True, nogil=True)
    def _forward_pieces(z, u, activation, bounds, first, stop, states, redo, out):  # pragma: no cover - compiled
        """Pieces first..stop-1 step by step from their entering states (those not done by the carry)."""
        for p in range(first, stop):
            if not redo[p]:
                _forward_steps(z, u, states[p], activation, bounds[p], bounds[p + 1], out)

    @numba.njit(cache=True, nogil=True)
    def _backward_compose_pieces(grad_out, batch_major, out, u, activation, clip, bounds, first, stop,
                                 maps):  # pragma: no cover - compiled
        for p in range(first, stop):
            _backward_compose(grad_out, batch_major, out, u, activation, clip, bounds[p], bounds[p + 1], maps[p, 0],
                              maps[p, 1], maps[p, 2], maps[p, 3])

    @numba.njit(cache=True, nogil=True)
    def _backward_carry(grad_out, batch_major, out, u, h0, activation, clip, bounds, grad_z, partial_u, deltas,
                        maps, delta_first, redo):  # pragma: no cover - compiled
        """deltas[p] = delta entering piece p from above (at bounds[p + 1]), for p < P - 1, from the last
        piece's delta_first down through the maps of pieces P-2..1 (step by step where not finite)."""
        last = bounds.shape[0] - 2
        deltas[last - 1] = delta_first[last]
        for p in range(last - 1, 0, -1):
            if not _carry_through(maps[p, 0], maps[p, 1], maps[p, 2], maps[p, 3], deltas[p], deltas[p - 1]):
                _backward_steps(grad_out, batch_major, out, u, h0, activation, clip, bounds[p], bounds[p + 1],
                                deltas[p], grad_z, partial_u[p], delta_first[p])
                deltas[p - 1] = delta_first[p]
                redo[p] = True

    @numba.njit(cache=True, nogil=True)
    def _backward_pieces(grad_out, batch_major, out, u, h0, activation, clip, bounds, first, stop, grad_z, partial_u,
                         deltas, delta_first, redo):  # pragma: no cover - compiled
        for p in range(first, stop):
            if not redo[p]:
                _backward_steps(grad_out, batch_major, out, u, h0, activation, clip, bounds[p], bounds[p + 1],
                                deltas[p], grad_z, partial_u[p], delta_first[p])


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (process id, workers) -> pool; a forked child makes its own


def _run_tasks(tasks) -> None:
    """Run the thunks ``tasks`` in parallel: the first on this thread, the others on a pool (numba
    functions compiled with nogil=True release the GIL). A pool of sleeping threads rather than numba's
    prange: OpenMP's spinning barrier cost 60-100 ms per region on a loaded 2-core machine."""
    workers = len(tasks) - 1
    key = (os.getpid(), workers)
    pool = _POOLS.get(key)
    if pool is None and workers > 0:
        pool = _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="indrnn-scan")
    futures = [pool.submit(task) for task in tasks[1:]]
    tasks[0]()
    for future in futures:
        future.result()


def _shares(first: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """first..stop-1 cut into ``parts`` contiguous ranges (some possibly empty), in order."""
    count = stop - first
    return [(first + count * k // parts, first + count * (k + 1) // parts) for k in range(parts)]


def _piece_bounds(steps: int, threads: int, ratio: float = COMPOSE_COST_RATIO) -> list[int]:
    """Piece boundaries [0, b1, ..., steps] for the chunked scan on ``threads`` threads.

    Phase 1 runs piece 0 (length L0) step by step on one thread while the other threads - 1 compose
    the remaining R = steps - L0 steps; phase 3 runs those R steps on all threads. Balance:
    L0 = ratio * R / (threads - 1), i.e. R = steps * (threads - 1) / (threads - 1 + ratio); R is cut
    into threads * (threads - 1) pieces so that both phases share them out evenly.
    """
    rest = round(steps * (threads - 1) / (threads - 1 + ratio))
    count = threads * (threads - 1)
    first = max(1, steps - rest)  # never empty: phase 2 reads the state after piece 0's last step
    rest = steps - first
    return [0] + [first + (rest * k) // count for k in range(count + 1)]


def parallel_threads(steps: int) -> int:
    """Threads the chunked scan uses for ``steps`` steps: numba's (``numba.get_num_threads()``:
    NUMBA_NUM_THREADS, by default every core; independent of torch's OMP_NUM_THREADS), or 1 (step by
    step) for short sequences."""
    if numba is None:
        return 1
    threads = numba.get_num_threads()
    return threads if threads > 1 and steps >= MIN_STEPS_PER_THREAD * threads else 1


def cpu_scan_applies(z: torch.Tensor, activation: str) -> bool:
    """Whether :class:`IndRNNScanCPU` takes this input: numba, a CPU float32/float64 tensor, relu or identity."""
    return numba_available() and z.device.type == "cpu" and z.dtype in NUMBA_DTYPES and scan_applies(activation)


class IndRNNScanCPU(torch.autograd.Function):
    """h_t = act(z_t + u * h_{t-1}) (relu or identity) by the chunked scan on threads along time.

    ``IndRNNScanCPU.apply(z, u, h0, activation, grad_clip=None)``: z (T, B, H), u (H,), h0 (B, H) ->
    all states (T, B, H); ``grad_clip`` c clamps dL/da_t to [-c, c] at every step. Check
    :func:`cpu_scan_applies` first. With one thread (or short T) it runs step by step.
    """

    @staticmethod
    def forward(ctx, z, u, h0, activation: str, grad_clip: float | None = None):
        _check_activation(activation)
        code = ACTIVATION_CODES[activation]
        z_array, u_array, h0_array = (contiguous_array(t) for t in (z, u, h0))
        steps = z_array.shape[0]
        out = np.empty_like(z_array)
        threads = parallel_threads(steps)
        if threads == 1:
            _forward_steps(z_array, u_array, h0_array, code, 0, steps, out)
        else:
            bounds = np.asarray(_piece_bounds(steps, threads), dtype=np.int64)
            pieces = len(bounds) - 1
            states = np.empty((pieces + 1,) + h0_array.shape, dtype=z_array.dtype)
            maps = np.empty((pieces, 4) + h0_array.shape, dtype=z_array.dtype)
            redo = np.zeros(pieces, dtype=np.bool_)
            # Phase 1: piece 0 step by step from h0, while the other threads compose pieces 1..P-1.
            _run_tasks([partial(_forward_steps, z_array, u_array, h0_array, code, 0, int(bounds[1]), out)]
                       + [partial(_forward_compose_pieces, z_array, u_array, code, bounds, first, stop, maps)
                          for first, stop in _shares(1, pieces, threads - 1)])
            # Phase 2 (serial, B*H values per piece): the state entering every piece.
            _forward_carry(z_array, u_array, code, bounds, out, states, maps, redo)
            # Phase 3: every thread runs its share of pieces 1..P-1 step by step.
            _run_tasks([partial(_forward_pieces, z_array, u_array, code, bounds, first, stop, states, redo, out)
                        for first, stop in _shares(1, pieces, threads)])
        out = torch.from_numpy(out)
        ctx.save_for_backward(out, u, h0)
        ctx.activation_code, ctx.clip = code, clip_code(grad_clip)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        out, u, h0 = ctx.saved_tensors
        out_array, u_array, h0_array = out.numpy(), contiguous_array(u), contiguous_array(h0)
        grad_rows, batch_major = gradient_rows(grad_out)
        steps = out_array.shape[0]
        grad_z = np.empty_like(out_array)
        threads = parallel_threads(steps)
        bounds = (np.asarray(_piece_bounds(steps, threads)[::-1], dtype=np.int64) if threads > 1
                  else np.asarray([0, steps], dtype=np.int64))
        if threads > 1:  # mirrored: the first piece (run directly) holds the last steps
            bounds = steps - bounds
        pieces = len(bounds) - 1
        shape = h0_array.shape
        partial_u = np.zeros((pieces,) + shape, dtype=out_array.dtype)
        deltas = np.zeros((pieces,) + shape, dtype=out_array.dtype)
        delta_first = np.zeros((pieces,) + shape, dtype=out_array.dtype)
        if threads == 1:
            _backward_steps(grad_rows, batch_major, out_array, u_array, h0_array, ctx.activation_code, ctx.clip,
                            0, steps, deltas[0], grad_z, partial_u[0], delta_first[0])
        else:
            maps = np.empty((pieces, 4) + shape, dtype=out_array.dtype)
            redo = np.zeros(pieces, dtype=np.bool_)
            last = pieces - 1
            common = (grad_rows, batch_major, out_array, u_array)
            steps_args = (*common, h0_array, ctx.activation_code, ctx.clip)
            # The forward schedule mirrored in time: the last piece runs from delta_T = 0 while the
            # others are composed; then the carry down; then all threads run pieces 0..P-2.
            _run_tasks([partial(_backward_steps, *steps_args, int(bounds[last]), int(bounds[last + 1]), deltas[last],
                                grad_z, partial_u[last], delta_first[last])]
                       + [partial(_backward_compose_pieces, *common, ctx.activation_code, ctx.clip, bounds, first,
                                  stop, maps) for first, stop in _shares(0, last, threads - 1)])
            _backward_carry(*steps_args, bounds, grad_z, partial_u, deltas, maps, delta_first, redo)
            _run_tasks([partial(_backward_pieces, *steps_args, bounds, first, stop, grad_z, partial_u, deltas,
                                delta_first, redo) for first, stop in _shares(0, last, threads)])
        grad_u = partial_u.sum(axis=(0, 1))
        grad_h0 = delta_first[0] * u_array
        return (torch.from_numpy(grad_z), torch.from_numpy(grad_u), torch.from_numpy(grad_h0), None, None)


# ----------------------------------------------------------------------------------------------
# Projection and scan in one (I <= 8, relu or identity): z = W x + b is never stored, as in the
# fused sequential kernel (src.kernels.indrnn_linear_cpu), so the scan moves no more memory than it.

if numba is not None:

    @numba.njit(inline="always")
    def _input_row(x, weight_t, bias, t, b, row):  # pragma: no cover - compiled
        """row = bias + sum_i weight_t[i] x[t, b, i] (H,)."""
        hidden = row.shape[0]
        for j in range(hidden):
            row[j] = bias[j]
        for i in range(x.shape[2]):
            x_i, w_i = x[t, b, i], weight_t[i]
            for j in range(hidden):
                row[j] += w_i[j] * x_i

    @numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _linear_steps(x, weight_t, bias, u, h_in, activation, start, stop, out):  # pragma: no cover - compiled
        """indrnn_linear_cpu's forward loop for steps start..stop-1 from out[start-1] = h_in (B, H)."""
        batch, inputs = x.shape[1], x.shape[2]
        hidden = u.shape[0]
        zero = out.dtype.type(0)
        for t in range(start, stop):
            previous = out[t - 1] if t > start else h_in
            for b in range(batch):
                h_t, h_prev, x_tb = out[t, b], previous[b], x[t, b]
                for j in range(hidden):
                    h_t[j] = bias[j] + u[j] * h_prev[j]
                for i in range(inputs):
                    x_i, w_i = x_tb[i], weight_t[i]
                    for j in range(hidden):
                        h_t[j] += w_i[j] * x_i
                if activation == 0:
                    for j in range(hidden):
                        h_t[j] = max(h_t[j], zero)

    @numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _linear_compose_pieces(x, weight_t, bias, u, activation, bounds, first, stop, maps):  # pragma: no cover
        """_forward_compose_pieces with z_t = W x_t + b computed row by row (see _forward_compose)."""
        batch, hidden = x.shape[1], u.shape[0]
        zero, inf = maps.dtype.type(0), maps.dtype.type(np.inf)
        relu = activation == 0
        negative = np.nonzero(u < zero)[0] if relu else np.empty(0, dtype=np.int64)
        row = np.empty(hidden, dtype=maps.dtype)
        for p in range(first, stop):
            offset, low, high = maps[p, 1], maps[p, 2], maps[p, 3]
            for b in range(batch):
                for j in range(hidden):
                    offset[b, j] = zero
                    low[b, j] = zero if relu else -inf
                    high[b, j] = inf
            for t in range(bounds[p], bounds[p + 1]):
                for b in range(batch):
                    _input_row(x, weight_t, bias, t, b, row)
                    o_b, l_b, h_b = offset[b], low[b], high[b]
                    for j in range(hidden):
                        o_b[j] = row[j] + u[j] * o_b[j]
                    if relu:
                        for j in range(hidden):
                            l_b[j] = max(row[j] + u[j] * l_b[j], zero)
                        for j in negative:
                            h_b[j] = max(row[j] + u[j] * h_b[j], zero)

    @numba.njit(cache=True, nogil=True)
    def _linear_carry(x, weight_t, bias, u, activation, bounds, out, states, maps, redo):  # pragma: no cover
        """_forward_carry for the fused projection."""
        pieces = bounds.shape[0] - 1
        batch, hidden = x.shape[1], u.shape[0]
        states[1] = out[bounds[1] - 1]
        for p in range(1, pieces - 1):
            length = bounds[p + 1] - bounds[p]
            for b in range(batch):
                for j in range(hidden):
                    maps[p, 0, b, j] = u[j] ** length
            if not _carry_through(maps[p, 0], maps[p, 1], maps[p, 2], maps[p, 3], states[p], states[p + 1]):
                _linear_steps(x, weight_t, bias, u, states[p], activation, bounds[p], bounds[p + 1], out)
                states[p + 1] = out[bounds[p + 1] - 1]
                redo[p] = True

    @numba.njit(cache=True, nogil=True)
    def _linear_pieces(x, weight_t, bias, u, activation, bounds, first, stop, states, redo, out):  # pragma: no cover
        for p in range(first, stop):
            if not redo[p]:
                _linear_steps(x, weight_t, bias, u, states[p], activation, bounds[p], bounds[p + 1], out)

    @numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _linear_backward_steps(grad_out, batch_major, out, x, weight_t, u, h0, activation, clip, start, stop,
                               delta_next, grad_x, partial_w, partial_b, partial_u, delta_first):  # pragma: no cover
        """indrnn_linear_cpu's backward loop for steps stop-1 down to start, from delta_{stop} =
        ``delta_next`` (B, H): writes grad_x[t]; adds into partial_w (B, I, H), partial_b and
        partial_u (B, H); leaves delta_start in ``delta_first``."""
        batch, hidden = out.shape[1], out.shape[2]
        inputs = x.shape[2]
        zero, one, clip = out.dtype.type(0), out.dtype.type(1), out.dtype.type(clip)
        carry = np.empty((batch, hidden), dtype=out.dtype)  # u * delta_{t+1}
        for b in range(batch):
            for j in range(hidden):
                carry[b, j] = delta_next[b, j] * u[j]
                delta_first[b, j] = delta_next[b, j]
        delta = np.empty(hidden, dtype=out.dtype)
        block = max(1, WARM_ELEMENTS // max(1, batch * hidden))
        sink = zero
        high = stop
        while high > start:
            low = max(start, high - block)
            sink += warm_block(grad_out, batch_major, out, out, low, high)
            for t in range(high - 1, low - 1, -1):
                previous = out[t - 1] if t > 0 else h0
                for b in range(batch):
                    g_t = grad_out[b, t] if batch_major else grad_out[t, b]
                    h_t, c_b = out[t, b], carry[b]
                    h_prev, p_u, p_b = previous[b], partial_u[b], partial_b[b]
                    for j in range(hidden):
                        d_j = _delta(g_t[j], c_b[j], h_t[j], activation, zero, one, clip)
                        delta[j] = d_j
                        p_u[j] += d_j * h_prev[j]
                        p_b[j] += d_j
                        c_b[j] = d_j * u[j]
                    if t == start:
                        for j in range(hidden):
                            delta_first[b, j] = delta[j]
                    x_tb, g_x = x[t, b], grad_x[t, b]
                    for i in range(inputs):
                        w_i, p_w, x_i = weight_t[i], partial_w[b, i], x_tb[i]
                        total = zero
                        for j in range(hidden):
                            total += delta[j] * w_i[j]
                            p_w[j] += delta[j] * x_i
                        g_x[i] = total
            high = low
        return sink

    @numba.njit(cache=True, nogil=True)
    def _linear_backward_carry(grad_out, batch_major, out, x, weight_t, u, h0, activation, clip, bounds, grad_x,
                               partial_w, partial_b, partial_u, deltas, maps, delta_first, redo):  # pragma: no cover
        """_backward_carry for the fused projection."""
        last = bounds.shape[0] - 2
        deltas[last - 1] = delta_first[last]
        for p in range(last - 1, 0, -1):
            if not _carry_through(maps[p, 0], maps[p, 1], maps[p, 2], maps[p, 3], deltas[p], deltas[p - 1]):
                _linear_backward_steps(grad_out, batch_major, out, x, weight_t, u, h0, activation, clip, bounds[p],
                                       bounds[p + 1], deltas[p], grad_x, partial_w[p], partial_b[p], partial_u[p],
                                       delta_first[p])
                deltas[p - 1] = delta_first[p]
                redo[p] = True

    @numba.njit(cache=True, nogil=True)
    def _linear_backward_pieces(grad_out, batch_major, out, x, weight_t, u, h0, activation, clip, bounds, first, stop,
                                grad_x, partial_w, partial_b, partial_u, deltas, delta_first, redo):  # pragma: no cover
        for p in range(first, stop):
            if not redo[p]:
                _linear_backward_steps(grad_out, batch_major, out, x, weight_t, u, h0, activation, clip, bounds[p],
                                       bounds[p + 1], deltas[p], grad_x, partial_w[p], partial_b[p], partial_u[p],
                                       delta_first[p])


class IndRNNLinearScanCPU(torch.autograd.Function):
    """h_t = act(W x_t + b + u * h_{t-1}) (relu or identity, I <= 8) by the chunked scan with the
    projection inside its loops (never storing z or dL/dz), as
    :class:`src.kernels.indrnn_linear_cpu.IndRNNLinearRecurrenceCPU` does step by step.

    Inputs: x (T, B, I), weight (H, I), bias (H,) or None, u (H,), h0 (B, H), activation, grad_clip.
    Output: all states (T, B, H). Check ``fused_projection_applies`` first.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, u, h0, activation: str, grad_clip: float | None = None):
        _check_activation(activation)
        code = ACTIVATION_CODES[activation]
        x_array, weight_t, u_array, h0_array = (contiguous_array(t) for t in (x, weight.t(), u, h0))
        bias_array = contiguous_array(bias) if bias is not None else np.zeros_like(u_array)
        steps, batch = x_array.shape[:2]
        out = np.empty((steps, batch, u_array.shape[0]), dtype=u_array.dtype)
        threads = parallel_threads(steps)
        head = (x_array, weight_t, bias_array, u_array)
        if threads == 1:
            _linear_steps(*head, h0_array, code, 0, steps, out)
        else:
            bounds = np.asarray(_piece_bounds(steps, threads), dtype=np.int64)
            pieces = len(bounds) - 1
            states = np.empty((pieces + 1,) + h0_array.shape, dtype=out.dtype)
            maps = np.empty((pieces, 4) + h0_array.shape, dtype=out.dtype)
            redo = np.zeros(pieces, dtype=np.bool_)
            _run_tasks([partial(_linear_steps, *head, h0_array, code, 0, int(bounds[1]), out)]
                       + [partial(_linear_compose_pieces, *head, code, bounds, first, stop, maps)
                          for first, stop in _shares(1, pieces, threads - 1)])
            _linear_carry(*head, code, bounds, out, states, maps, redo)
            _run_tasks([partial(_linear_pieces, *head, code, bounds, first, stop, states, redo, out)
                        for first, stop in _shares(1, pieces, threads)])
        out = torch.from_numpy(out)
        ctx.save_for_backward(x, weight, u, h0, out)
        ctx.activation_code, ctx.has_bias, ctx.clip = code, bias is not None, clip_code(grad_clip)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, u, h0, out = ctx.saved_tensors
        x_array, weight_t, u_array, h0_array = (contiguous_array(t) for t in (x, weight.t(), u, h0))
        out_array = out.numpy()
        grad_rows, batch_major = gradient_rows(grad_out)
        steps = out_array.shape[0]
        threads = parallel_threads(steps)
        bounds = np.asarray([0, steps], dtype=np.int64)
        if threads > 1:  # mirrored, as IndRNNScanCPU.backward
            bounds = steps - np.asarray(_piece_bounds(steps, threads)[::-1], dtype=np.int64)
        pieces = len(bounds) - 1
        shape = h0_array.shape
        dtype = out_array.dtype
        grad_x = np.empty_like(x_array)
        partial_w = np.zeros((pieces, shape[0]) + weight_t.shape, dtype=dtype)
        partial_b, partial_u = (np.zeros((pieces,) + shape, dtype=dtype) for _ in range(2))
        deltas, delta_first = (np.zeros((pieces,) + shape, dtype=dtype) for _ in range(2))
        common = (grad_rows, batch_major, out_array, x_array, weight_t, u_array, h0_array, ctx.activation_code,
                  ctx.clip)
        if threads == 1:
            _linear_backward_steps(*common, 0, steps, deltas[0], grad_x, partial_w[0], partial_b[0], partial_u[0],
                                   delta_first[0])
        else:
            maps = np.empty((pieces, 4) + shape, dtype=dtype)
            redo = np.zeros(pieces, dtype=np.bool_)
            last = pieces - 1
            _run_tasks([partial(_linear_backward_steps, *common, int(bounds[last]), int(bounds[last + 1]),
                                deltas[last], grad_x, partial_w[last], partial_b[last], partial_u[last],
                                delta_first[last])]
                       + [partial(_backward_compose_pieces, grad_rows, batch_major, out_array, u_array,
                                  ctx.activation_code, ctx.clip, bounds, first, stop, maps)
                          for first, stop in _shares(0, last, threads - 1)])
            _linear_backward_carry(*common, bounds, grad_x, partial_w, partial_b, partial_u, deltas, maps,
                                   delta_first, redo)
            _run_tasks([partial(_linear_backward_pieces, *common, bounds, first, stop, grad_x, partial_w, partial_b,
                                partial_u, deltas, delta_first, redo) for first, stop in _shares(0, last, threads)])
        grad_weight = torch.from_numpy(partial_w.sum(axis=(0, 1))).t()
        grad_bias = torch.from_numpy(partial_b.sum(axis=(0, 1))) if ctx.has_bias else None
        return (torch.from_numpy(grad_x), grad_weight, grad_bias, torch.from_numpy(partial_u.sum(axis=(0, 1))),
                torch.from_numpy(delta_first[0] * u_array), None, None)
