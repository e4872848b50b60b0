"""The Clockwork RNN recurrence (Koutník et al., ICML 2014): the dense reference loop and the fused
autograd Function, selected by :func:`src.kernels.clockwork_recurrence` (backends as for IndRNN:
``"auto"``/``"fused"`` -> :class:`ClockworkFunction`, ``"reference"`` -> :func:`clockwork_reference`).

Module i (H / g units, clock period T_i) updates at absolute step t only when t mod T_i == 0, and
reads the previous state of itself and of slower modules only (W_h block-upper-triangular):

    h_t[i] = act(W_x[i] x_t + W_h[i, :] h_{t-1} + b[i])   if t mod T_i == 0
    h_t[i] = h_{t-1}[i]                                    otherwise (kept exactly)

* :func:`clockwork_reference`: the dense masked loop. Every step computes all modules with the
  whole masked W_h and keeps the inactive ones with ``torch.where``; autograd records it all.
  Obviously correct; the tests compare the fused kernel against it.
* :class:`ClockworkFunction`: an autograd Function with a hand-written backward that only computes
  the active modules. One matmul writes W_x x_t + b for all steps into the state buffer; step t
  then runs a few in-place ops on views of that buffer (one matmul per run of active modules, the
  activation, one copy of the kept units). The backward walks time in reverse with the same runs
  and leaves every weight gradient to the end: ``g`` matmuls, one per module over all the steps at
  which that module ran (on the columns of modules >= i only for W_h). With periods that divide
  one another (the default powers of two) the active modules at every step are a prefix 0..k-1:
  one run of rows, one run of kept units; other increasing periods (e.g. 1, 3, 5) give several
  runs, still exact. It is plain PyTorch, so it runs on any device and dtype.

An autograd loop that slices W_h per step instead costs a full-size (H, H) weight-gradient
buffer per step in the backward pass, 13x (H=128) to 31x (H=512) the time of ``torch.nn.RNN``.
The clock is absolute: ``time_origin`` is the step number of the first input, so a sequence cut
into chunks continues exactly when each chunk starts at the step count the previous one reached.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch.nn import functional as F

from src.activations import activate, activate_
from src.checks import check_choice, check_non_negative_int, check_positive_int

try:  # numpy allocates large CPU buffers on huge pages; without it torch allocates them.
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with the project's dependencies
    np = None

_NUMPY_DTYPES = {} if np is None else {torch.float32: np.float32, torch.float64: np.float64,
                                       torch.float16: np.float16}

NONLINEARITIES = ("tanh", "relu", "identity")

Run = tuple[int, int]  # a half-open range [lo, hi) of hidden units


def check_module_split(hidden_size: int, num_modules: int) -> int:
    """Units per module; a one-line ValueError when hidden_size is not a multiple of num_modules."""
    check_positive_int("hidden_size", hidden_size)
    check_positive_int("num_modules", num_modules)
    if hidden_size % num_modules:
        lower = hidden_size - hidden_size % num_modules
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_modules {num_modules}: use a "
                         f"multiple of {num_modules} (e.g. {lower or num_modules} or {lower + num_modules}) "
                         f"or a num_modules that divides {hidden_size}")
    return hidden_size // num_modules


def clockwork_mask(hidden_size: int, num_modules: int, device=None) -> torch.Tensor:
    """(H, H) bool: True where W_h may be non-zero, i.e. module(column) >= module(row)."""
    module = torch.arange(hidden_size, device=device) // check_module_split(hidden_size, num_modules)
    return module.unsqueeze(0) >= module.unsqueeze(1)


def active_modules(periods: Sequence[int], t: int) -> list[int]:
    """Indices of the modules that update at absolute time t (t mod T_i == 0)."""
    return [i for i, period in enumerate(periods) if t % period == 0]



def _runs(flags: Sequence[bool], module_size: int) -> tuple[Run, ...]:
    """Maximal runs of consecutive flagged modules, as unit ranges [lo, hi)."""
    runs, start = [], None
    for i, flag in enumerate(list(flags) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start * module_size, i * module_size))
            start = None
    return tuple(runs)


@functools.lru_cache(maxsize=128)
def clockwork_schedule(periods: tuple[int, ...], module_size: int, steps: int, time_origin: int = 0):
    """Which units update at each of ``steps`` steps, as shared patterns.

    Returns ``(pattern_of_step, patterns)``: ``patterns[pattern_of_step[t]]`` is
    ``(active_runs, kept_runs)`` for step t (absolute time t + time_origin); both are tuples of
    unit ranges [lo, hi) that together cover all units.
    """
    index: dict[tuple[bool, ...], int] = {}
    patterns, pattern_of_step = [], []
    for t in range(steps):
        flags = tuple((t + time_origin) % period == 0 for period in periods)
        if flags not in index:
            index[flags] = len(patterns)
            patterns.append((_runs(flags, module_size), _runs([not f for f in flags], module_size)))
        pattern_of_step.append(index[flags])
    return tuple(pattern_of_step), tuple(patterns)


def check_recurrence_args(x, weight_ih, bias, weight_hh, h0, periods, nonlinearity, time_origin) -> int:
    check_choice("Clockwork nonlinearity", nonlinearity, NONLINEARITIES)
    check_non_negative_int("time_origin", time_origin)
    if x.dim() != 3 or x.shape[0] < 1:
        raise ValueError(f"Clockwork recurrence needs x of shape (T, B, I) with T >= 1, got {tuple(x.shape)}")
    steps, batch, features = x.shape
    hidden = weight_hh.shape[0]
    if (weight_ih.shape != (hidden, features) or weight_hh.shape != (hidden, hidden) or h0.shape != (batch, hidden)
            or (bias is not None and bias.shape != (hidden,))):
        raise ValueError(f"Clockwork recurrence: x {tuple(x.shape)} needs weight_ih ({hidden}, {features}), "
                         f"weight_hh ({hidden}, {hidden}), bias ({hidden},) or None and h0 ({batch}, {hidden}); got "
                         f"{tuple(weight_ih.shape)}, {tuple(weight_hh.shape)}, "
                         f"{None if bias is None else tuple(bias.shape)} and {tuple(h0.shape)}")
    return check_module_split(hidden, len(periods))


def clockwork_reference(x: torch.Tensor, weight_ih: torch.Tensor, bias: torch.Tensor | None, weight_hh: torch.Tensor,
                        h0: torch.Tensor, periods: Sequence[int], nonlinearity: str = "tanh", time_origin: int = 0,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """The dense masked loop: all modules computed every step, inactive ones kept with ``torch.where``.

    Args:
        x: inputs, shape (T, B, I).
        weight_ih, bias: the input map W_x (H, I) and b (H,) or None.
        weight_hh: W_h, shape (H, H); multiplied by ``mask`` (default :func:`clockwork_mask`).
        h0: initial state, shape (B, H).
        periods: one clock period per module (module size H / len(periods)).
        nonlinearity: "tanh", "relu" or "identity".
        time_origin: absolute time of the first step (0: every module runs at the first step).

    Returns:
        All hidden states, shape (T, B, H).
    """
    module_size = check_recurrence_args(x, weight_ih, bias, weight_hh, h0, periods, nonlinearity, time_origin)
    if mask is None:
        mask = clockwork_mask(weight_hh.shape[0], len(periods), x.device)
    weight = weight_hh * mask
    z = F.linear(x, weight_ih, bias)
    unit_period = torch.tensor(list(periods), device=x.device).repeat_interleave(module_size)
    state, outputs = h0, []
    for t in range(x.shape[0]):
        active = (t + time_origin) % unit_period == 0
        state = torch.where(active, activate(z[t] + state @ weight.t(), nonlinearity), state)
        outputs.append(state)
    return torch.stack(outputs)


def _new_buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor; on CPU allocated by numpy, which asks for transparent huge pages.

    Fresh 4 KiB pages cost a page fault each on first touch: measured 39 ms against 8 ms to fill a
    (784, 64, 512) float32 buffer (see also src/kernels/indrnn_cpu.py).
    """
    if np is not None and like.device.type == "cpu" and like.dtype in _NUMPY_DTYPES:
        return torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[like.dtype]))
    return like.new_empty(shape)


class ClockworkFunction(torch.autograd.Function):
    """Fused Clockwork recurrence over active units only; see the module docstring.

    ``forward(x (T, B, I), weight_ih (H, I), bias (H,) or None, weight (H, H) already
    block-upper-triangular, h0 (B, H), periods, time_origin, nonlinearity) -> (T, B, H)``.

    Forward: one matmul writes z_t = W_x x_t + b for all steps into the state buffer; step t then
    adds W[A_t, :] h_{t-1} to the active units A_t in place, applies the activation there, and
    copies the kept units from h_{t-1}.

    Backward, with G_t = dL/dh_t (the output's gradient g_t plus what flows back from step t+1)
    and f' read from the saved outputs:
        delta_t = G_t[A_t] * f'(h_t[A_t])                 (= dL/dz_t on A_t, 0 elsewhere)
        G_{t-1} = g_{t-1} + [G_t on the kept units, 0 on A_t] + W[A_t, :]^T delta_t
        dL/dh0 = G_{-1} (with g_{-1} = 0)
    and then, for each module i over the n_i steps where it ran (one matmul each, on the
    columns of modules >= i only for W):
        dL/dW[i, i:] = sum_t delta_t[i]^T h_{t-1}[i:],  dL/dW_x[i] = sum_t delta_t[i]^T x_t,
        dL/db[i] = sum_t delta_t[i],                   dL/dx_t += delta_t[i] W_x[i]
    Only the entries of delta at active units are ever written or read, so its buffer is not
    zero-filled; it is first filled with f' (per module, over the steps where it ran).
    """

    @staticmethod
    def forward(ctx, x, weight_ih, bias, weight, h0, periods, time_origin, nonlinearity):
        steps, batch, features = x.shape
        hidden = weight.shape[0]
        module_size = hidden // len(periods)
        # The clock repeats every lcm(periods) steps: the phase keeps the schedule cache small for long streams.
        time_origin = time_origin % math.lcm(*periods)
        pattern_of_step, patterns = clockwork_schedule(tuple(periods), module_size, steps, time_origin)
        # states[t] = h_{t-1}: states[0] = h0, states[1:] is the output. It first holds z.
        states = _new_buffer((steps + 1, batch, hidden), h0)
        states[0].copy_(h0)
        projection = states[1:].view(steps * batch, hidden)
        flat_x = x.reshape(steps * batch, features)
        if bias is None:
            torch.mm(flat_x, weight_ih.t(), out=projection)
        else:
            torch.addmm(bias, flat_x, weight_ih.t(), out=projection)
        plans = [([(lo, hi, weight[lo:hi, lo:].t()) for lo, hi in active], kept) for active, kept in patterns]
        for t in range(steps):
            previous, current = states[t], states[t + 1]
            active, kept = plans[pattern_of_step[t]]
            for lo, hi, weight_t in active:
                # Rows lo:hi read only columns lo: (the others are zero blocks).
                block = current[:, lo:hi]
                block.addmm_(previous[:, lo:], weight_t)
                activate_(block, nonlinearity)
            for lo, hi in kept:
                current[:, lo:hi].copy_(previous[:, lo:hi])
        ctx.save_for_backward(x, weight_ih, weight, states)
        ctx.schedule = (pattern_of_step, patterns)
        ctx.periods, ctx.time_origin, ctx.nonlinearity = tuple(periods), time_origin, nonlinearity
        return states[1:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        steps, batch, hidden = grad_out.shape
        module_size = hidden // len(ctx.periods)
        x, weight_ih, weight, states = ctx.saved_tensors
        pattern_of_step, patterns = ctx.schedule
        # (module, its rows lo:hi, the steps it ran at) for every module that ran at least once.
        groups = []
        for i, period in enumerate(ctx.periods):
            first = (-ctx.time_origin) % period
            if first < steps:
                groups.append((i * module_size, (i + 1) * module_size, slice(first, steps, period)))

        # delta's buffer, first holding f'(h_t) at the active units.
        grad_z = _new_buffer((steps, batch, hidden), grad_out)
        for lo, hi, ran in groups:
            derivative = grad_z[ran, :, lo:hi]
            out = states[ran.start + 1: steps + 1: ran.step, :, lo:hi]
            if ctx.nonlinearity == "tanh":
                torch.mul(out, out, out=derivative)
                derivative.neg_().add_(1)
            elif ctx.nonlinearity == "relu":
                derivative.copy_(out > 0)
            else:
                derivative.fill_(1)

        carry = grad_out[steps - 1].clone(memory_format=torch.contiguous_format)  # G_t
        plans = [([(lo, hi, weight[lo:hi, lo:]) for lo, hi in active], kept) for active, kept in patterns]
        for t in range(steps - 1, -1, -1):
            active, kept = plans[pattern_of_step[t]]
            grad_z_t = grad_z[t]
            for lo, hi, _ in active:
                grad_z_t[:, lo:hi].mul_(carry[:, lo:hi])
            if t > 0:  # G_{t-1} = g_{t-1} + kept part of G_t + W[A_t]^T delta_t
                grad_previous = grad_out[t - 1]
                for lo, hi, _ in active:
                    carry[:, lo:hi].copy_(grad_previous[:, lo:hi])
                for lo, hi in kept:
                    carry[:, lo:hi].add_(grad_previous[:, lo:hi])
            else:
                for lo, hi, _ in active:
                    carry[:, lo:hi].zero_()
            for lo, hi, weight_rows in active:
                carry[:, lo:].addmm_(grad_z_t[:, lo:hi], weight_rows)

        need_x, need_weight_ih, need_bias, need_weight = ctx.needs_input_grad[:4]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_weight_ih = torch.zeros_like(weight_ih) if need_weight_ih else None
        grad_bias = weight.new_zeros(hidden) if need_bias else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        scratch = None
        for lo, hi, ran in groups:
            count = len(range(steps)[ran])
            delta = grad_z[ran, :, lo:hi].reshape(count * batch, module_size)  # a copy unless period 1
            if need_weight:
                previous = states[ran, :, lo:]  # h_{t-1} at the steps t where module lo:hi ran
                if ran.step > 1:  # gather into a reused buffer (fresh pages are slow, see _new_buffer)
                    if scratch is None:
                        scratch = _new_buffer((max(len(range(steps)[r]) * batch * (hidden - a) for a, _, r in groups
                                                   if r.step > 1),), states)
                    previous = scratch[:previous.numel()].view(previous.shape).copy_(previous)
                grad_weight[lo:hi, lo:] = delta.t() @ previous.reshape(count * batch, hidden - lo)
            if need_x or need_weight_ih:
                x_ran = x[ran].reshape(count * batch, x.shape[2])
                if need_weight_ih:
                    grad_weight_ih[lo:hi] = delta.t() @ x_ran
                if need_x:
                    grad_x[ran].add_((delta @ weight_ih[lo:hi]).view(count, batch, x.shape[2]))
            if need_bias:
                grad_bias[lo:hi] = delta.sum(0)
        return grad_x, grad_weight_ih, grad_bias, grad_weight, carry, None, None, None


def clockwork_step_gates(periods: Sequence[int], module_size: int, steps: int, time_origin: int,
                         like: torch.Tensor) -> torch.Tensor:
    """(T, H) in ``like``'s dtype and device: 0 where a unit's module ticks at step t (absolute time
    t + time_origin), 1 where it keeps its state: the ``lam`` of :mod:`src.kernels.dense_triton`.
    Made once per arguments (read-only): no host-to-device copy per call, so CUDA graphs can capture it."""
    return _step_gates(tuple(periods), module_size, steps, time_origin, like.device, like.dtype)


@functools.lru_cache(maxsize=32)
def _step_gates(periods: tuple[int, ...], module_size: int, steps: int, time_origin: int, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    unit_period = torch.tensor(list(periods), device=device).repeat_interleave(module_size)
    times = torch.arange(steps, device=device).unsqueeze(1) + time_origin
    return (times % unit_period != 0).to(dtype)


def clockwork_triton(x: torch.Tensor, weight_ih: torch.Tensor, bias: torch.Tensor | None, weight_hh: torch.Tensor,
                     h0: torch.Tensor, periods: Sequence[int], nonlinearity: str = "tanh", time_origin: int = 0,
                     mask: torch.Tensor | None = None, fallback_for: str | None = None) -> torch.Tensor:
    """All hidden states (T, B, H) by the persistent Triton kernel (:mod:`src.kernels.dense_triton`),
    arguments as :func:`clockwork_reference`: the kept units are the kernel's lam = 1, the masked W_h its
    one recurrent matrix; column blocks whose modules all rest are copied, not computed.
    ``fallback_for``: as :func:`~src.kernels.dense_triton.dense_recurrence_triton`'s."""
    from src.kernels.dense_triton import dense_recurrence_triton  # triton is optional

    module_size = check_recurrence_args(x, weight_ih, bias, weight_hh, h0, periods, nonlinearity, time_origin)
    # The default mask makes W_h block-upper-triangular, which the kernels use to skip its zero blocks;
    # a mask given here is taken as arbitrary (comparing it with the default would sync the host).
    module = module_size if mask is None else None
    if mask is None:
        mask = clockwork_mask(weight_hh.shape[0], len(periods), x.device)
    z = F.linear(x, weight_ih, bias)
    gates = clockwork_step_gates(periods, module_size, x.shape[0], time_origin % math.lcm(*periods), weight_hh)
    return dense_recurrence_triton(z, (weight_hh * mask).unsqueeze(0), h0.unsqueeze(0), gates, (1,), nonlinearity,
                                   module, fallback_for=fallback_for)
