"""IndRNN by the chunked clamp-affine scan on CPU threads, along time (derivation: src/kernels/README.md).

The sequence is cut into pieces; numba loops compiled nogil run on a small thread pool (as many threads
as ``numba.get_num_threads()``). Forward: thread 0 runs piece 0 step by step from h0 while the other
threads compose the maps of the later pieces (no stores, cheaper than a step); one short serial pass
carries the state across pieces through their maps; then every thread runs its pieces step by step
from the carried state. Backward: the same from the last step down, on delta_t = dL/da_t. Each
piece's own steps run the sequential kernel's loops (:func:`src.kernels.indrnn_cpu.forward_steps`,
:func:`~src.kernels.indrnn_cpu.backward_steps`), so the results differ from
:class:`src.kernels.indrnn_cpu.IndRNNRecurrenceCPU` only by the rounding of the carried states at
piece boundaries (relative 1e-16 to 4e-15 in float64). A piece whose composed slope u^L overflows
(|u| > 1 over a long piece) is carried step by step instead, so the result stays exact.

:func:`chunked_scan` is the schedule, shared with the projection-inside variant
(:mod:`src.kernels.indrnn_scan.chunk_linear_cpu`); a kernel gives it how to run a piece and how to
compose one.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Sequence

import torch

from src.kernels.function import RecurrenceFunction
from src.kernels.indrnn_cpu import (ACTIVATION_CODES, NUMBA_DTYPES, clip_code, contiguous_array, gradient_rows,
                                     numba, numba_available)
from src.kernels.indrnn_scan.naive import check_activation, scan_applies

if numba is not None:
    import numpy as np

    from src.kernels.indrnn_cpu import WARM_BELOW_BYTES, backward_steps, block_bottom, forward_steps, warm_block

# Cost of composing one step's map relative to running the step, forward and backward, as the two
# threads of phase 1 see it (2-core VM, float32, T=10^6, B=1, H=128, projection inside, relu: with 0.5
# both ways, the forward's phase-1 threads took 33 and 30 ms, the backward's 50 and 70-89 ms, the
# composing thread last; with 0.8 backward, 67-106 and 62-88 ms, the running thread last). The first
# piece, run from h0 while the other threads compose, gets the share that balances the two (see
# _piece_bounds).
COMPOSE_COST_RATIO = 0.5
BACKWARD_COMPOSE_COST_RATIO = 0.75
# Below this many steps per thread the threads' start-up costs more than they save.
MIN_STEPS_PER_THREAD = 64

if numba is not None:

    @numba.njit(inline="always")
    def open_map(mapping, u, activation, length):  # pragma: no cover - compiled
        """Start the forward map of a piece of ``length`` steps in ``mapping`` (4, B, H): slope u^length,
        offset 0, bounds the domain's ends ([0, +inf) for relu: every state after the first step is a relu
        output; all reals for identity). Returns whether any unit has u < 0 (relu; never for identity): only
        their upper bound moves, +inf stays +inf where u >= 0 (and u = 0 has slope 0, no bound needed)."""
        zero, inf = mapping.dtype.type(0), mapping.dtype.type(np.inf)
        relu = activation == 0
        for b in range(mapping.shape[1]):
            for j in range(mapping.shape[2]):
                mapping[0, b, j] = u[j] ** length
                mapping[1, b, j] = zero
                mapping[2, b, j] = zero if relu else -inf
                mapping[3, b, j] = inf
        return relu and bool(np.any(u < zero))

    # The compose loops follow the sequential kernels' layout for LLVM's vectoriser (see the comment at
    # indrnn_cpu.backward_steps): per (step, row) short branch-free loops indexing arrays in full.
    @numba.njit(inline="always")
    def _compose_forward_rows(source, weight_t, bias, u, activation, has_negative, projected, start, stop,
                              mapping):  # pragma: no cover - compiled
        """Compose steps start..stop-1 into ``mapping`` (4, B, H) after open_map. Each step's input row
        z_t is source[t, b] (z (T, B, H)) or, ``projected`` (a literal), W x_t + b from source = x (T, B, I),
        weight_t (I, H) and bias (H,), computed into a row buffer either way. Per unit: the offset (one
        FMA), the image of the low bound (relu: one FMA and a max) and, for u < 0 only, of +inf
        (u * inf = -inf, never 0 * inf: the other units' value is computed and dropped by a select)."""
        zero = mapping.dtype.type(0)
        hidden = u.shape[0]
        relu = activation == 0
        row = np.empty(hidden, dtype=mapping.dtype)
        for t in range(start, stop):
            for b in range(source.shape[1]):
                if projected:
                    for j in range(hidden):
                        row[j] = bias[j]
                    for i in range(source.shape[2]):
                        x_i = source[t, b, i]
                        for j in range(hidden):
                            row[j] += weight_t[i, j] * x_i
                else:
                    for j in range(hidden):
                        row[j] = source[t, b, j]
                for j in range(hidden):
                    mapping[1, b, j] = row[j] + u[j] * mapping[1, b, j]
                if relu:  # identity's bounds stay -inf, +inf
                    for j in range(hidden):
                        mapping[2, b, j] = max(row[j] + u[j] * mapping[2, b, j], zero)
                if has_negative:  # relu only (see open_map)
                    for j in range(hidden):
                        moved = max(row[j] + u[j] * mapping[3, b, j], zero)
                        mapping[3, b, j] = moved if u[j] < zero else mapping[3, b, j]

    @numba.njit(cache=True, nogil=True)
    def forward_compose(z, u, activation, start, stop, mapping):  # pragma: no cover - compiled
        """The map (4, B, H) of steps start..stop-1 (see open_map, _compose_forward_rows); reads z once, stores
        nothing per step."""
        has_negative = open_map(mapping, u, activation, stop - start)
        _compose_forward_rows(z, z[0], u, u, activation, has_negative, False, start, stop, mapping)  # z[0], u: unused

    @numba.njit(inline="always")
    def _apply(slope, offset, low, high, x, zero):  # pragma: no cover - compiled
        """clamp(slope x + offset, min(low, high), max(low, high)); a constant map (low == high) gives low."""
        if low == high:
            return low
        value = offset if slope == zero else slope * x + offset
        lo, hi = (low, high) if low < high else (high, low)
        return lo if value < lo else (hi if value > hi else value)

    @numba.njit(cache=True, nogil=True)
    def backward_compose(grad_out, batch_major, out, u, activation, clip, start, stop, mapping):  # pragma: no cover
        """The map delta_stop -> delta_start (4, B, H) of steps stop-1 down to start: the slope the product
        of m_t u, the offset the unclipped delta reached from 0, the bounds the images of -inf/+inf
        (clipped trajectories; without clipping -inf/+inf).

        The slope is u^(stop-start) where every m_t = 1, else 0: kept as that 0/1 flag per step and raised
        to the power once at the end, not multiplied step by step, since the running product of |u| < 1
        sinks through the subnormal floats, whose arithmetic is many times slower (measured 453 against
        286 ms for this function at T=10^6, B=1, H=128, u uniform in (0, 1) against u = 0.5). The relu
        step's values are computed before the select on m_t: a conditional load compiles to a branch,
        mispredicted on random activity patterns and never vectorised."""
        batch, hidden = out.shape[1], out.shape[2]
        zero, inf = out.dtype.type(0), out.dtype.type(np.inf)
        clip = out.dtype.type(clip)
        mapping[0] = out.dtype.type(1)
        mapping[1] = zero
        mapping[2] = -inf
        mapping[3] = inf
        identity = activation != 0
        sink = zero
        top = stop
        while top > start:  # blocks from the last step down, some warmed upwards first, as indrnn_cpu.backward_steps
            bottom = block_bottom(top, start, batch * hidden)
            if batch_major or batch * hidden * out.itemsize < WARM_BELOW_BYTES:
                sink += warm_block(grad_out, batch_major, out, out, bottom, top)
            for t in range(top - 1, bottom - 1, -1):
                for b in range(batch):  # loops as in indrnn_cpu.backward_steps: both values first, then selects
                    for j in range(hidden):
                        kept = mapping[0, b, j]
                        reached = (grad_out[b, t, j] if batch_major else grad_out[t, b, j]) + mapping[1, b, j] * u[j]
                        active = (out[t, b, j] > zero) | identity
                        mapping[0, b, j] = kept if active else zero
                        mapping[1, b, j] = reached if active else zero
                    if clip > zero:  # the bounds: the clipped step of backward_steps run from them (u * bound = 0 where u = 0, even for an infinite bound)
                        for k in range(2, 4):
                            for j in range(hidden):
                                product = u[j] * mapping[k, b, j]
                                value = (grad_out[b, t, j] if batch_major else grad_out[t, b, j]) + (
                                    zero if u[j] == zero else product)
                                value = value if (out[t, b, j] > zero) | identity else zero
                                value = clip if value > clip else value
                                mapping[k, b, j] = -clip if value < -clip else value
            top = bottom
        for b in range(batch):
            for j in range(hidden):  # a select: 0 * inf is NaN
                mapping[0, b, j] = u[j] ** (stop - start) if mapping[0, b, j] != zero else zero
        return sink

    @numba.njit(cache=True, nogil=True)
    def carry_maps(maps, states, first, stop):  # pragma: no cover - compiled
        """states[k + 1] = maps[k] applied to states[k] for k = first..stop-1 (maps (P, 4, B, H), states
        (P + 1, B, H)); returns the first k whose non-constant map is not finite (an overflowed slope: the
        caller runs that piece step by step), or stop."""
        zero = states.dtype.type(0)
        for k in range(first, stop):
            slope, offset, low, high = maps[k, 0], maps[k, 1], maps[k, 2], maps[k, 3]
            x, result = states[k], states[k + 1]
            finite = True
            for b in range(x.shape[0]):
                for j in range(x.shape[1]):
                    result[b, j] = _apply(slope[b, j], offset[b, j], low[b, j], high[b, j], x[b, j], zero)
                    if low[b, j] != high[b, j] and not (np.isfinite(slope[b, j]) and np.isfinite(offset[b, j])):
                        finite = False
            if not finite:
                return k
        return stop


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


def schedule(steps: int, backward: bool) -> tuple[int, list[tuple[int, int]]]:
    """(threads, pieces): the pieces as (start, stop) step ranges in the order the scan takes them, from
    the first step up (forward) or from the last step down (``backward``: the forward schedule, balanced with
    BACKWARD_COMPOSE_COST_RATIO, mirrored)."""
    threads = parallel_threads(steps)
    ratio = BACKWARD_COMPOSE_COST_RATIO if backward else COMPOSE_COST_RATIO
    bounds = _piece_bounds(steps, threads, ratio) if threads > 1 else [0, steps]
    pieces = list(zip(bounds[:-1], bounds[1:]))
    return threads, [(steps - stop, steps - start) for start, stop in pieces] if backward else pieces


def _each(run: Callable[[int], None], pieces) -> None:
    for k in pieces:
        run(k)


def chunked_scan(threads: int, pieces: Sequence, states, run_piece: Callable[[int], None],
                 state_after: Callable[[int], object], compose_piece: Callable[[int], None], maps) -> None:
    """Run the three phases over ``pieces`` (in scan order, see :func:`schedule`).

    states (P + 1, B, H): states[0] enters piece 0 (h0, or delta_T = 0 backward); the others are filled
    here. ``run_piece(k)`` runs piece k step by step from states[k]; ``state_after(k)`` is the (B, H) state
    it left; ``compose_piece(k)`` writes piece k's map into maps[k] (4, B, H).
    """
    count = len(pieces)
    # Phase 1: piece 0 step by step, while the other threads compose pieces 1..P-1.
    _run_tasks([partial(run_piece, 0)] + [partial(_each, compose_piece, range(first, stop))
                                          for first, stop in _shares(1, count, threads - 1)])
    if count == 1:
        return
    # Phase 2 (serial, B*H values per piece): the state entering every piece.
    states[1] = state_after(0)
    done, k = set(), 1
    while k < count - 1:
        k = carry_maps(maps, states, k, count - 1)
        if k < count - 1:  # an overflowed map: this piece step by step here
            run_piece(k)
            states[k + 1] = state_after(k)
            done.add(k)
            k += 1
    # Phase 3: every thread runs its share of pieces 1..P-1 step by step.
    _run_tasks([partial(_each, run_piece, [k for k in range(first, stop) if k not in done])
                for first, stop in _shares(1, count, threads)])


def cpu_scan_applies(z: torch.Tensor, activation: str) -> bool:
    """Whether :class:`IndRNNScanCPU` takes this input: numba, a CPU float32/float64 tensor, relu or identity."""
    return numba_available() and z.device.type == "cpu" and z.dtype in NUMBA_DTYPES and scan_applies(activation)


def scan_forward_cpu(z: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, activation: str) -> torch.Tensor:
    """All states (T, B, H) for z (T, B, H), u (H,), h0 (B, H), by the chunked scan."""
    code = ACTIVATION_CODES[activation]
    z_array, u_array, h0_array = (contiguous_array(t) for t in (z, u, h0))
    out = np.empty_like(z_array)
    threads, pieces = schedule(z_array.shape[0], backward=False)
    states = np.empty((len(pieces) + 1,) + h0_array.shape, dtype=z_array.dtype)
    states[0] = h0_array
    maps = np.empty((len(pieces), 4) + h0_array.shape, dtype=z_array.dtype)
    chunked_scan(threads, pieces, states,
                 lambda k: forward_steps(z_array, u_array, states[k], code, *pieces[k], out),
                 lambda k: out[pieces[k][1] - 1],
                 lambda k: forward_compose(z_array, u_array, code, *pieces[k], maps[k]), maps)
    return torch.from_numpy(out)


def scan_backward_cpu(grad_out, out, u, h0, activation: str, grad_clip: float | None):
    """(grad_z (T, B, H), grad_u (H,), grad_h0 (B, H)) by the chunked scan from the last step down."""
    code, clip = ACTIVATION_CODES[activation], clip_code(grad_clip)
    out_array, u_array, h0_array = out.numpy(), contiguous_array(u), contiguous_array(h0)
    grad_rows, batch_major = gradient_rows(grad_out)
    grad_z = np.empty_like(out_array)
    threads, pieces = schedule(out_array.shape[0], backward=True)
    count, shape, dtype = len(pieces), h0_array.shape, out_array.dtype
    states = np.zeros((count + 1,) + shape, dtype=dtype)  # states[k]: delta entering piece k from above
    partial_u, delta_first = np.zeros((count,) + shape, dtype=dtype), np.empty((count,) + shape, dtype=dtype)
    maps = np.empty((count, 4) + shape, dtype=dtype)
    common = (grad_rows, batch_major, out_array, u_array)
    chunked_scan(threads, pieces, states,
                 lambda k: backward_steps(*common, h0_array, code, clip, *pieces[k], states[k], grad_z, partial_u[k],
                                          delta_first[k]),
                 lambda k: delta_first[k],
                 lambda k: backward_compose(*common, code, clip, *pieces[k], maps[k]), maps)
    grad_u = partial_u.sum(axis=(0, 1))
    return torch.from_numpy(grad_z), torch.from_numpy(grad_u), torch.from_numpy(delta_first[-1] * u_array)


class IndRNNScanCPU(RecurrenceFunction):
    """h_t = act(z_t + u * h_{t-1}) (relu or identity) by the chunked scan on threads along time.

    ``IndRNNScanCPU.apply(z, u, h0, activation, grad_clip=None)``: z (T, B, H), u (H,), h0 (B, H) ->
    all states (T, B, H); ``grad_clip`` c clamps dL/da_t to [-c, c] at every step. Check
    :func:`cpu_scan_applies` first. With one thread (or short T) it runs step by step.
    """

    check = staticmethod(lambda z, u, h0, activation: check_activation(activation))
    run_forward = staticmethod(scan_forward_cpu)
    run_backward = staticmethod(scan_backward_cpu)
