"""IndRNN by the clamp-affine scan on CUDA with Triton: parallel over time as well as over columns.

The algebra is :mod:`src.kernels.indrnn_scan.naive`'s (derivation: src/kernels/README.md): a relu or identity
step is the map h -> clamp(a h + b, lo, hi), maps compose into maps, and the states are an inclusive
scan of them applied to h0; the backward pass is the same scan from the last step down on
delta_t = dL/da_t with the maps d -> clamp(m_t u d + m_t e_t, -c, c).

Layout: the (B, H) state is B*H independent columns; time is cut into chunks of CHUNK_T steps, each
a whole number of [BLOCK_T, BLOCK_H] tiles. Three launches per pass:

1. compose: one program per (column block, chunk) reduces its chunk, tile by tile, to one map
   (``tl.reduce`` with the 4-tuple combine), stored as (4, chunks, B*H);
2. carry: one program per column block walks the chunks in order and applies their maps to the state
   (chunks steps per column, a few hundred at most);
3. apply: one program per (column block, chunk) scans each tile with ``tl.associative_scan`` (the
   prefix maps of its rows), applies them to the state entering the tile and carries the tile's last
   row to the next tile.

The backward pass loads each tile with its rows in reverse time order, so the same forward scan runs
from the last step down; rows outside [0, T) are identity maps (a=1, b=0, lo=-inf, hi=+inf), so
ragged ends need no other care. dL/du is written as a per-(chunk, column) partial and summed with
torch (deterministic). Arithmetic is in float32 for float32/bfloat16/float16 inputs and in float64
for float64 (what Triton's CPU interpreter, TRITON_INTERPRET=1, checks to 1e-12 in the tests).
"""
from __future__ import annotations

import torch

from src.kernels.function import RecurrenceFunction
from src.kernels.indrnn_scan.naive import scan_applies
from src.kernels.indrnn_triton import _device_guard, _interpreting, loop_count, triton

ACTIVATION_CODES = {"relu": 0, "identity": 2}  # the codes of src.kernels.reference.ACTIVATIONS
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Programs to aim for (column blocks x chunks): enough to fill a large GPU several times over.
TARGET_PROGRAMS = 2048
BLOCK_T, BLOCK_H, NUM_WARPS = 32, 32, 4  # tile of the compiled kernels (see _layout)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _combine(a1, b1, lo1, hi1, a2, b2, lo2, hi2):
        # second o first for h -> clamp(a h + b, lo, hi); a2 = 0: a constant map (never 0 * inf).
        flat = a2 == 0
        image_lo = tl.where(flat, b2, a2 * lo1 + b2)
        image_hi = tl.where(flat, b2, a2 * hi1 + b2)
        negative = a2 < 0
        new_lo = tl.where(negative, image_hi, image_lo)
        new_hi = tl.where(negative, image_lo, image_hi)
        new_lo = tl.minimum(tl.maximum(new_lo, lo2), hi2)
        new_hi = tl.minimum(tl.maximum(new_hi, lo2), hi2)
        return a2 * a1, a2 * b1 + b2, new_lo, new_hi

    @triton.jit
    def _apply(a, b, lo, hi, h):
        value = tl.where(a == 0, b, a * h + b)
        return tl.where(lo == hi, lo, tl.minimum(tl.maximum(value, lo), hi))

    @triton.jit
    def _widen(x, DOUBLE: tl.constexpr):
        # The arithmetic type: float64 for float64 inputs, else float32.
        if DOUBLE:
            return x.to(tl.float64)
        else:
            return x.to(tl.float32)

    @triton.jit
    def _forward_maps(z_ptr, u, t0, cols, col_mask, T, BH, ACTIVATION: tl.constexpr, DOUBLE: tl.constexpr,
                      BLOCK_T: tl.constexpr):
        """The step maps of rows t0..t0+BLOCK_T-1 (identity maps outside [0, T))."""
        rows = t0 + tl.arange(0, BLOCK_T)
        valid = (rows < T)[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * BH + cols[None, :]
        z = _widen(tl.load(z_ptr + offsets, mask=valid, other=0.0), DOUBLE)
        one = tl.full(z.shape, 1.0, z.dtype)
        inf = tl.full(z.shape, float("inf"), z.dtype)
        a = tl.where(valid, tl.broadcast_to(u[None, :], z.shape), one)
        if ACTIVATION == 0:
            lo = tl.where(valid, tl.zeros_like(z), -inf)
        else:
            lo = -inf
        return a, z, lo, inf, rows, valid, offsets

    @triton.jit
    def _backward_maps(grad_ptr, out_ptr, u, t_top, cols, col_mask, T, BH, clip, ACTIVATION: tl.constexpr,
                       CLIP: tl.constexpr, DOUBLE: tl.constexpr, BLOCK_T: tl.constexpr):
        """The maps delta_{t+1} -> delta_t of rows t = t_top, t_top-1, ... (reverse time; identity outside [0, T))."""
        rows = t_top - tl.arange(0, BLOCK_T)
        valid = ((rows >= 0) & (rows < T))[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * BH + cols[None, :]
        g = _widen(tl.load(grad_ptr + offsets, mask=valid, other=0.0), DOUBLE)
        one = tl.full(g.shape, 1.0, g.dtype)
        inf = tl.full(g.shape, float("inf"), g.dtype)
        if ACTIVATION == 0:
            h = tl.load(out_ptr + offsets, mask=valid, other=0.0).to(g.dtype)
            active = h > 0
            a = tl.where(active, tl.broadcast_to(u[None, :], g.shape), tl.zeros_like(g))
            b = tl.where(active, g, tl.zeros_like(g))  # a select: an inactive unit passes no gradient, even inf
        else:
            a = tl.broadcast_to(u[None, :], g.shape)
            b = g
        a = tl.where(valid, a, one)
        if CLIP:
            lo = tl.where(valid, tl.full(g.shape, -clip, g.dtype), -inf)
            hi = tl.where(valid, tl.full(g.shape, clip, g.dtype), inf)
        else:
            lo = -inf
            hi = inf
        return a, b, lo, hi, rows, valid, offsets

    @triton.jit
    def _carry_kernel(maps_ptr, first_ptr, states_ptr, BH, chunks, last_chunk, CHUNK_STRIDE, REVERSE: tl.constexpr,
                      DOUBLE: tl.constexpr,
                      BLOCK: tl.constexpr):
        """states[k] = the state entering chunk k (forward: from chunk 0 up; REVERSE: from the last down)."""
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        col_mask = cols < BH
        state = _widen(tl.load(first_ptr + cols, mask=col_mask, other=0.0), DOUBLE)
        step = CHUNK_STRIDE
        for i in range(chunks):
            if REVERSE:
                k = last_chunk - i
            else:
                k = i
            base = k.to(tl.int64) * BH + cols
            tl.store(states_ptr + base, state, mask=col_mask)
            a = tl.load(maps_ptr + base, mask=col_mask, other=1.0)
            b = tl.load(maps_ptr + step + base, mask=col_mask, other=0.0)
            lo = tl.load(maps_ptr + 2 * step + base, mask=col_mask, other=0.0)
            hi = tl.load(maps_ptr + 3 * step + base, mask=col_mask, other=0.0)
            state = _apply(a, b, lo, hi, state)

    @triton.jit
    def _tile_maps(src_ptr, out_ptr, u, chunk, tile, cols, col_mask, T, BH, CHUNK_T, clip, ACTIVATION: tl.constexpr,
                   CLIP: tl.constexpr, DOUBLE: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr):
        """The maps of one tile of a chunk, in scan order: forward rows up from the chunk's first step (z
        at src_ptr), BACKWARD rows down from its last step (the incoming gradient at src_ptr)."""
        if BACKWARD:
            return _backward_maps(src_ptr, out_ptr, u, (chunk + 1) * CHUNK_T - 1 - tile * BLOCK_T, cols, col_mask, T,
                                  BH, clip, ACTIVATION, CLIP, DOUBLE, BLOCK_T)
        else:
            return _forward_maps(src_ptr, u, chunk * CHUNK_T + tile * BLOCK_T, cols, col_mask, T, BH, ACTIVATION,
                                 DOUBLE, BLOCK_T)

    @triton.jit
    def _compose_kernel(src_ptr, out_ptr, u_ptr, maps_ptr, T, BH, H, CHUNK_T, TILES, CHUNK_STRIDE, clip,
                        ACTIVATION: tl.constexpr, CLIP: tl.constexpr, DOUBLE: tl.constexpr, BACKWARD: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        """maps (4, chunks, B*H): the map of each (chunk, column), tile by tile (``tl.reduce``), in scan order."""
        cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
        chunk = tl.program_id(1)
        col_mask = cols < BH
        u = _widen(tl.load(u_ptr + cols % H, mask=col_mask, other=0.0), DOUBLE)
        acc_a = tl.full([BLOCK_H], 1.0, u.dtype)
        acc_b = tl.zeros([BLOCK_H], u.dtype)
        acc_lo = tl.full([BLOCK_H], float("-inf"), u.dtype)
        acc_hi = tl.full([BLOCK_H], float("inf"), u.dtype)
        for tile in range(TILES):
            a, b, lo, hi, rows, valid, offsets = _tile_maps(src_ptr, out_ptr, u, chunk, tile, cols, col_mask, T, BH,
                                                            CHUNK_T, clip, ACTIVATION, CLIP, DOUBLE, BACKWARD, BLOCK_T)
            ta, tb, tlo, thi = tl.reduce((a, b, lo, hi), 0, _combine)
            acc_a, acc_b, acc_lo, acc_hi = _combine(acc_a, acc_b, acc_lo, acc_hi, ta, tb, tlo, thi)
        base = chunk.to(tl.int64) * BH + cols
        tl.store(maps_ptr + base, acc_a, mask=col_mask)
        tl.store(maps_ptr + CHUNK_STRIDE + base, acc_b, mask=col_mask)
        tl.store(maps_ptr + 2 * CHUNK_STRIDE + base, acc_lo, mask=col_mask)
        tl.store(maps_ptr + 3 * CHUNK_STRIDE + base, acc_hi, mask=col_mask)

    @triton.jit
    def _apply_kernel(src_ptr, out_ptr, u_ptr, h0_ptr, states_ptr, result_ptr, grad_u_ptr, grad_h0_ptr,
                      T, BH, H, CHUNK_T, TILES, clip, ACTIVATION: tl.constexpr, CLIP: tl.constexpr,
                      DOUBLE: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        """Scan each tile (``tl.associative_scan``), apply the prefix maps to the value entering it and store
        them in result_ptr: the states forward, delta_t = dL/dz_t BACKWARD, which also writes the
        per-(chunk, column) partials of dL/du = sum delta_t h_{t-1} and dL/dh0 = u delta_0 (out_ptr: the
        states, h0_ptr: h0; unused forward)."""
        cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
        chunk = tl.program_id(1)
        col_mask = cols < BH
        u = _widen(tl.load(u_ptr + cols % H, mask=col_mask, other=0.0), DOUBLE)
        value = tl.load(states_ptr + chunk.to(tl.int64) * BH + cols, mask=col_mask, other=0.0)
        grad_u = tl.zeros([BLOCK_H], u.dtype)
        last = tl.arange(0, BLOCK_T)[:, None] == BLOCK_T - 1
        for tile in range(TILES):
            a, b, lo, hi, rows, valid, offsets = _tile_maps(src_ptr, out_ptr, u, chunk, tile, cols, col_mask, T, BH,
                                                            CHUNK_T, clip, ACTIVATION, CLIP, DOUBLE, BACKWARD, BLOCK_T)
            pa, pb, plo, phi = tl.associative_scan((a, b, lo, hi), 0, _combine)
            values = _apply(pa, pb, plo, phi, value[None, :])
            tl.store(result_ptr + offsets, values.to(result_ptr.dtype.element_ty), mask=valid)
            if BACKWARD:
                # h_{t-1}: the output row above in memory, h0 for t = 0.
                previous_valid = valid & (rows >= 1)[:, None]
                h_prev = tl.load(out_ptr + offsets - BH, mask=previous_valid, other=0.0).to(u.dtype)
                first_row = valid & (rows == 0)[:, None]
                h_start = tl.load(h0_ptr + cols, mask=col_mask, other=0.0).to(u.dtype)
                h_prev = tl.where(first_row, tl.broadcast_to(h_start[None, :], h_prev.shape), h_prev)
                grad_u += tl.sum(tl.where(valid, values * h_prev, 0.0), axis=0)
                grad_h0_ptrs = grad_h0_ptr + tl.broadcast_to(cols[None, :], values.shape)
                tl.store(grad_h0_ptrs, (u[None, :] * values).to(grad_h0_ptr.dtype.element_ty), mask=first_row)
            # Rows outside [0, T) are identity maps, so the last row holds the value after the tile's last step.
            value = tl.sum(tl.where(last, values, 0.0), axis=0)
        if BACKWARD:
            tl.store(grad_u_ptr + chunk.to(tl.int64) * BH + cols, grad_u, mask=col_mask)


def _layout(steps: int, columns: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, CHUNK_T, chunks): tiles of 32 x 32 (tiny under the interpreter), chunks of
    whole tiles, as many chunks as keep about TARGET_PROGRAMS programs busy.

    32 x 32 on 4 warps: compiled for sm_90, the apply kernels use at most 118 registers in float32 and
    194 in float64 without spilling; 64 x 32 tiles needed 210 (float32) and spilled in float64."""
    block_t, block_h = (4, 8) if _interpreting() else (BLOCK_T, BLOCK_H)
    column_blocks = triton.cdiv(columns, block_h)
    wanted_chunks = max(1, TARGET_PROGRAMS // column_blocks)
    chunk_t = max(block_t, triton.cdiv(triton.cdiv(steps, wanted_chunks), block_t) * block_t)
    if _interpreting():
        chunk_t = 2 * block_t  # several chunks and tiles even at the interpreter's tiny sizes
    return block_t, block_h, chunk_t, triton.cdiv(steps, chunk_t)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scan_passes(src, out, u, h0, initial, result, grad_h0, activation: str, grad_clip: float | None,
                 backward: bool) -> torch.Tensor:
    """The three launches of one pass (compose, carry, apply) over out's (T, B, H) layout: forward, the
    states of z = ``src`` from h0 = ``initial`` into ``result`` (= out); ``backward``, the deltas of the
    incoming gradient ``src`` from delta_T = ``initial`` (zeros) into ``result`` (grad_z), with dL/dh0
    into ``grad_h0``. Returns the per-(chunk, column) partials of dL/du (backward; forward: unused)."""
    steps, batch, hidden = out.shape
    columns = batch * hidden
    block_t, block_h, chunk_t, chunks = _layout(steps, columns)
    tiles = loop_count(chunk_t // block_t)
    double = out.dtype == torch.float64
    work = _compute_dtype(out.dtype)
    maps = torch.empty(4, chunks, columns, dtype=work, device=out.device)
    states = torch.empty(chunks, columns, dtype=work, device=out.device)
    grad_u_partial = torch.empty(chunks, columns, dtype=work, device=out.device) if backward else states
    clip = 0.0 if grad_clip is None else float(grad_clip)
    flags = dict(ACTIVATION=ACTIVATION_CODES[activation], CLIP=grad_clip is not None, DOUBLE=double, BACKWARD=backward,
                 BLOCK_T=block_t, BLOCK_H=block_h, num_warps=NUM_WARPS)
    grid = (triton.cdiv(columns, block_h), chunks)
    with _device_guard(out):
        _compose_kernel[grid](src, out, u, maps, steps, columns, hidden, chunk_t, tiles, chunks * columns, clip,
                              **flags)
        _carry_kernel[(triton.cdiv(columns, 128),)](maps, initial, states, columns, loop_count(chunks), chunks - 1,
                                                    chunks * columns, REVERSE=backward, DOUBLE=double, BLOCK=128)
        _apply_kernel[grid](src, out, u, h0, states, result, grad_u_partial, grad_h0, steps, columns, hidden, chunk_t,
                            tiles, clip, **flags)
    return grad_u_partial


def scan_forward_triton(z: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, activation: str) -> torch.Tensor:
    """All states (T, B, H) in z's dtype, for z (T, B, H), u (H,), h0 (B, H)."""
    z, u, h0 = z.contiguous(), u.contiguous(), h0.contiguous()
    out = torch.empty_like(z)
    if out.numel() > 0:
        _scan_passes(z, out, u, h0, h0.to(_compute_dtype(z.dtype)).contiguous(), out, out, activation, None, False)
    return out


def scan_backward_triton(grad_out, out, u, h0, activation: str, grad_clip: float | None):
    """(grad_z (T, B, H), grad_u (H,), grad_h0 (B, H)) in the dtypes of out (= z), u and h0."""
    grad_out, u, h0 = grad_out.contiguous(), u.contiguous(), h0.contiguous()
    grad_z, grad_h0 = torch.empty_like(out), torch.zeros_like(h0)
    if out.numel() == 0:
        return grad_z, torch.zeros_like(u), grad_h0
    steps, batch, hidden = out.shape
    initial = torch.zeros(batch * hidden, dtype=_compute_dtype(out.dtype), device=out.device)
    partial_u = _scan_passes(grad_out, out, u, h0, initial, grad_z, grad_h0, activation, grad_clip, True)
    return grad_z, partial_u.view(-1, batch, hidden).sum(dim=(0, 1)).to(u.dtype), grad_h0


def triton_scan_applies(z: torch.Tensor, activation: str) -> bool:
    """Whether :class:`IndRNNScanTriton` takes this input: triton, CUDA (or the interpreter), a supported
    dtype, relu or identity."""
    return (triton is not None and (z.is_cuda or _interpreting()) and z.dtype in SUPPORTED_DTYPES
            and scan_applies(activation))


def _check_inputs(z: torch.Tensor, u: torch.Tensor, h0: torch.Tensor, activation: str) -> None:
    if not triton_scan_applies(z, activation):
        raise ValueError(f"the Triton IndRNN scan takes CUDA tensors of {SUPPORTED_DTYPES} and relu or identity; "
                         f"got {z.device} {z.dtype} {activation!r}; use backend='auto'")


class IndRNNScanTriton(RecurrenceFunction):
    """h_t = act(z_t + u * h_{t-1}) (relu or identity) by the chunked scan in Triton, forward and backward.

    ``IndRNNScanTriton.apply(z, u, h0, activation, grad_clip=None)``: z (T, B, H), u (H,), h0 (B, H) ->
    all states (T, B, H) in z's dtype; ``grad_clip`` c clamps dL/da_t to [-c, c] at every step.
    """

    check = staticmethod(_check_inputs)
    run_forward = staticmethod(scan_forward_triton)
    run_backward = staticmethod(scan_backward_triton)
