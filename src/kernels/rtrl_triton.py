"""The RTRL sensitivity update of :mod:`src.kernels.rtrl` as one Triton kernel on CUDA.

Layout: program (b, jb, ib) owns sample b, units jb*BLOCK_H .. +BLOCK_H and inputs ib*BLOCK_I ..
+BLOCK_I of the weight sensitivities S (B, H, I); it keeps that tile in registers and loops over the
K steps inside the kernel (one launch per chunk, whatever K is). Programs with ib == 0 also carry
the per-unit sensitivities s (P, B, H) of their units. Each program writes its share of the
gradients as a per-sample float32 partial ((B, H, I) and (P, B, H)), summed over B with torch
afterwards: deterministic, unlike atomics. The state is carried in float32; tensors must be
float32 (the CPU loops cover float64).

Without triton or CUDA this module still imports and :func:`triton_chunk_applies` is False. Under
Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported) the kernel also runs on
CPU tensors, which is how it is tested without a GPU where triton is installed.
"""
from __future__ import annotations

import os

import torch

from src.kernels.indrnn_triton import loop_count  # the loop count as the interpreter needs it

try:  # triton is optional: CPU-only installs never load this backend.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_chunk_applies(tensor: torch.Tensor) -> bool:
    """True when the Triton kernel can update sensitivities stored like ``tensor`` (CUDA float32, or
    CPU float32 under the interpreter)."""
    if triton is None or tensor.dtype != torch.float32:
        return False
    return (tensor.device.type == "cuda" and torch.cuda.is_available()) or (
        _interpreting() and tensor.device.type == "cpu")


if triton is not None:

    @triton.jit
    def _chunk_kernel(carry_ptr, gain_ptr, x_ptr, direct_ptr, grad_ptr, s_diag_ptr, s_weight_ptr,
                      part_diag_ptr, part_weight_ptr, K, B, H, I,
                      N_DIAG: tl.constexpr, HAS_GRAD: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_I: tl.constexpr):  # pragma: no cover - compiled
        b = tl.program_id(0)
        units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cols = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
        unit_mask, col_mask = units < H, cols < I
        tile_mask = unit_mask[:, None] & col_mask[None, :]
        tile = (b * H + units)[:, None] * I + cols[None, :]
        s = tl.load(s_weight_ptr + tile, mask=tile_mask, other=0.0)
        acc = tl.zeros((BLOCK_H, BLOCK_I), dtype=tl.float32)
        for t in range(K):
            row = (t * B + b) * H + units
            c = tl.load(carry_ptr + row, mask=unit_mask, other=0.0)
            e = tl.load(gain_ptr + row, mask=unit_mask, other=0.0)
            x = tl.load(x_ptr + (t * B + b) * I + cols, mask=col_mask, other=0.0)
            s = c[:, None] * s + e[:, None] * x[None, :]
            if HAS_GRAD:
                g = tl.load(grad_ptr + row, mask=unit_mask, other=0.0)
                acc += g[:, None] * s
        tl.store(s_weight_ptr + tile, s, mask=tile_mask)
        tl.store(part_weight_ptr + tile, acc, mask=tile_mask)
        if tl.program_id(2) == 0:
            for p in tl.static_range(N_DIAG):
                state = (p * B + b) * H + units
                sd = tl.load(s_diag_ptr + state, mask=unit_mask, other=0.0)
                acc_d = tl.zeros((BLOCK_H,), dtype=tl.float32)
                for t in range(K):
                    row = (t * B + b) * H + units
                    c = tl.load(carry_ptr + row, mask=unit_mask, other=0.0)
                    d = tl.load(direct_ptr + (p * K + t) * B * H + b * H + units, mask=unit_mask, other=0.0)
                    sd = c * sd + d
                    if HAS_GRAD:
                        g = tl.load(grad_ptr + row, mask=unit_mask, other=0.0)
                        acc_d += g * sd
                tl.store(s_diag_ptr + state, sd, mask=unit_mask)
                tl.store(part_diag_ptr + state, acc_d, mask=unit_mask)


def sensitivity_chunk_triton(carry, gain, inputs, direct, grad_h, s_diag, s_weight, grad_diag, grad_weight) -> None:
    """:func:`src.kernels.rtrl.sensitivity_chunk` as one Triton launch (same arguments, updated in place)."""
    if triton is None:
        raise RuntimeError("the RTRL Triton kernel needs the triton package")
    for name, tensor in (("s_diag", s_diag), ("s_weight", s_weight)):
        if not tensor.is_contiguous():
            raise ValueError(f"RTRL Triton kernel: {name} must be contiguous")
    steps, batch, hidden = carry.shape
    n_inputs, n_diag = inputs.shape[2], direct.shape[0]
    carry, gain, inputs, direct = (t.contiguous() for t in (carry, gain, inputs, direct))
    grad = grad_h.contiguous() if grad_h is not None else carry  # never read without HAS_GRAD
    part_weight = torch.empty_like(s_weight)
    part_diag = torch.empty_like(s_diag)
    block_h = min(32, triton.next_power_of_2(hidden))
    block_i = min(32, triton.next_power_of_2(n_inputs))
    grid = (batch, triton.cdiv(hidden, block_h), triton.cdiv(n_inputs, block_i))
    _chunk_kernel[grid](carry, gain, inputs, direct, grad, s_diag, s_weight, part_diag, part_weight,
                        loop_count(steps), batch, hidden, n_inputs, N_DIAG=n_diag, HAS_GRAD=grad_h is not None,
                        BLOCK_H=block_h, BLOCK_I=block_i)
    if grad_h is not None:
        grad_weight.add_(part_weight.sum(dim=0))
        grad_diag.add_(part_diag.sum(dim=1))
