"""The clamp-affine scan in plain PyTorch: log-depth (Hillis-Steele), any dtype and device.

The readable statement of the algebra (src/kernels/README.md) and what the tests check the fast
kernels with; O(T log T) work, no speed intended. A relu or identity step h_t = act(u h_{t-1} + z_t)
is the map h -> clamp(a h + b, lo, hi) with a = u, b = z_t, [lo, hi] = [0, inf] (relu) or
[-inf, inf] (identity); the states are the inclusive scan of these maps applied to h0. The backward
pass is the same scan from the last step down on delta_t = dL/da_t, with the maps
d -> clamp(m_t u d + m_t e_t, -c, c) (m_t = 1[h_t > 0] for relu, 1 for identity; c the clip bound or
inf). Then dL/dz_t = delta_t, dL/du = sum_{t,b} delta_t h_{t-1}, dL/dh0 = u delta_0.
"""
from __future__ import annotations

import math

import torch

from src.kernels.function import RecurrenceFunction

SCAN_ACTIVATIONS = ("relu", "identity")


def scan_applies(activation: str) -> bool:
    """Whether the recurrence is clamp-affine, i.e. has a scan: relu and identity (not tanh)."""
    return activation in SCAN_ACTIVATIONS


def check_activation(activation: str) -> None:
    """A one-line ValueError unless ``activation`` has a scan."""
    if not scan_applies(activation):
        raise ValueError(f"the IndRNN scan needs a clamp-affine activation {SCAN_ACTIVATIONS}, got {activation!r}; "
                         "tanh runs on the sequential kernels (backend='auto')")


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
    image_lo, image_hi = (torch.where(a2 == 0, b2, a2 * bound + b2) for bound in (lo1, hi1))
    swapped = a2 < 0
    low, high = torch.where(swapped, image_hi, image_lo), torch.where(swapped, image_lo, image_hi)
    return a2 * a1, a2 * b1 + b2, torch.clamp(low, lo2, hi2), torch.clamp(high, lo2, hi2)


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


def scan_backward_torch(grad_out, out, u, h0, activation: str, grad_clip: float | None):
    """(dL/dz (T, B, H), dL/du (H,), dL/dh0 (B, H)) from the incoming gradient and the states (T, B, H)."""
    if out.shape[0] == 0:
        return torch.zeros_like(out), torch.zeros_like(u), torch.zeros_like(h0)
    deltas = scan_deltas_torch(grad_out, out, u, activation, grad_clip)
    previous = torch.cat([h0.unsqueeze(0), out[:-1]])
    return deltas, (deltas * previous).sum(dim=(0, 1)), u * deltas[0]


class IndRNNScanTorch(RecurrenceFunction):
    """h_t = act(z_t + u * h_{t-1}) (relu or identity) by the log-depth scan, forward and backward.

    ``IndRNNScanTorch.apply(z, u, h0, activation, grad_clip=None)``: z (T, B, H), u (H,), h0 (B, H) ->
    all states (T, B, H); ``grad_clip`` c clamps dL/da_t to [-c, c] at every step. Any dtype/device.
    """

    check = staticmethod(lambda z, u, h0, activation: check_activation(activation))
    run_forward = staticmethod(scan_forward_torch)
    run_backward = staticmethod(scan_backward_torch)
