"""Clockwork RNN layer (Koutník, Greff, Gomez & Schmidhuber, ICML 2014).

The hidden units are split into ``g`` equal modules with clock periods T_1 < ... < T_g (default
1, 2, 4, ..., 2^(g-1)). At step t only the modules whose period divides t run:

    h_t[i] = act(W_x[i] x_t + W_h[i, :] h_{t-1} + b[i])   if t mod T_i == 0
    h_t[i] = h_{t-1}[i]                                    otherwise (kept exactly)

and a module reads the previous state only of itself and of slower modules: W_h is
block-upper-triangular (row block i, the units of module i, is non-zero only in the column blocks
of modules j >= i). Information flows from slow to fast modules, never back.

The recurrence runs in :func:`src.kernels.clockwork_recurrence`: a fused autograd Function with a
hand-written backward over the active modules (``backend="auto"``/``"fused"``) or the dense masked
reference loop (``"reference"``), both in :mod:`src.kernels.clockwork`. The clock is absolute, so
the layer's state is h together with the step counter: a sequence continued from a returned
state keeps its phase.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from src.activations import activate
from src.checks import check_choice, check_int_list, check_non_negative_int, check_positive_int
from src.kernels import BACKENDS, clockwork_recurrence
from src.kernels.clockwork import NONLINEARITIES, check_module_split, clockwork_mask, clockwork_triton
from src.kernels.dense_triton import resolve_dense_backend
from src.layers.common import (batched_state, check_state_tensor, from_time_major, init_uniform_, to_time_major,
                               unbatched_state)
from src.state import check_step


class ClockworkState(NamedTuple):
    """The state of a :class:`ClockworkRNN`: h (1, B, H), the state after the last step, and
    step, the absolute clock time of the next step (time_origin + steps read so far): an int shared by
    every stream, or a (B,) int64 tensor once streams restarted at different times (:func:`src.state.reset_streams`;
    the layer then runs its per-stream masked loop instead of the shared-clock kernels)."""

    h: torch.Tensor
    step: int | torch.Tensor


def default_periods(num_modules: int) -> tuple[int, ...]:
    """The paper's exponential clock: 1, 2, 4, ..., 2^(num_modules - 1)."""
    return tuple(2 ** i for i in range(check_positive_int("num_modules", num_modules)))


def check_periods(periods: Sequence[int], num_modules: int) -> tuple[int, ...]:
    """``periods`` as a tuple of ints: one positive int per module, strictly increasing."""
    values = check_int_list("periods", periods, minimum=1, increasing=True)
    if len(values) != num_modules:
        raise ValueError(f"periods has {len(values)} entries but num_modules is {num_modules}: "
                         f"give one period per module, got {list(values)}")
    return values




class ClockworkRNN(nn.Module):
    r"""Clockwork RNN layer, following torch.nn.RNN's contract (one layer, one direction).

    Args:
        input_size: features per input step, I.
        hidden_size: units, H; a multiple of ``num_modules``.
        num_modules: g, the number of equal modules (H / g units each).
        periods: one clock period per module, strictly increasing positive ints (fastest module
            first); default 1, 2, 4, ..., 2^(g-1).
        nonlinearity: "tanh" (paper), "relu" or "identity".
        bias: learn a bias b (added to W_x x_t).
        batch_first: inputs/outputs are (B, T, *) instead of (T, B, *).
        time_origin: absolute time t of the first step; module i runs at steps with t mod T_i == 0.
            0 (default): the first step updates every module; 1 (the paper's counting from 1):
            the first step updates only the modules with period 1.
        backend: "auto"/"fused" (hand-written backward over the active modules only), "reference"
            (the dense masked autograd loop) or "triton" (the persistent GPU kernel of
            :mod:`src.kernels.dense_triton`: one launch per pass, resting modules copied); see
            :data:`src.kernels.BACKENDS`. "auto" takes "triton" on CUDA where
            :func:`src.kernels.dense_triton.resolve_dense_backend` allows it, else "fused".
        device, dtype: where and in which dtype to create the parameters.

    Parameters: ``weight_ih`` (H, I), ``weight_hh`` (H, H) block-upper-triangular, ``bias`` (H,),
    initialised like torch.nn.RNN (U(-1/sqrt(H), 1/sqrt(H))) with the lower blocks of W_h zeroed.
    The buffer ``mask`` (H, H, bool) marks the blocks allowed to be non-zero; the forward pass
    uses ``weight_hh * mask``, so the other entries get zero gradient and stay zero under any
    gradient-based optimizer (:meth:`constrain_parameters_` re-zeros them anyway; the training
    loop calls it after each step through ``apply_constraints``).

    State: a :class:`ClockworkState` (h (1, B, H), step: an int, or (B,) int64 per stream); a plain
    tensor h (1, B, H) is accepted too (torch.nn.RNN's hx; the clock then starts at ``time_origin``).
    None: zeros at ``time_origin``.

    Shapes:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched (h then (1, H)).
        output: (T, B, H) (or (B, T, H)), the state after every step; the returned state's h is the last.
    """

    def __init__(self, input_size: int, hidden_size: int, num_modules: int = 8,
                 periods: Sequence[int] | None = None, nonlinearity: str = "tanh", bias: bool = True,
                 batch_first: bool = False, time_origin: int = 0, backend: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_modules = check_positive_int("num_modules", num_modules)
        self.module_size = check_module_split(hidden_size, num_modules)
        self.periods = default_periods(num_modules) if periods is None else check_periods(periods, num_modules)
        check_choice("Clockwork nonlinearity", nonlinearity, NONLINEARITIES)
        check_non_negative_int("time_origin", time_origin)
        check_choice("Clockwork backend", backend, BACKENDS)
        self.nonlinearity, self.batch_first, self.time_origin, self.backend = (
            nonlinearity, batch_first, time_origin, backend)
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size, **factory))
        self.bias = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
        self.register_buffer("mask", clockwork_mask(hidden_size, num_modules, device), persistent=False)
        # Each unit's clock period (H,), for streams on clocks of their own (a buffer: no host copy per call).
        self.register_buffer("unit_period", torch.tensor(self.periods, device=device).repeat_interleave(
            self.module_size), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_uniform_(self.parameters(), self.hidden_size)
        self.constrain_parameters_()

    @torch.no_grad()
    def constrain_parameters_(self) -> None:
        """Zero the blocks of W_h below the block diagonal (fast modules never feed slow ones)."""
        self.weight_hh.mul_(self.mask)

    def initial_state(self, batch_size: int, like: torch.Tensor | None = None) -> ClockworkState:
        """Zeros (1, batch_size, H) at clock time ``time_origin`` (dtype and device of ``like``, default W_h)."""
        like = self.weight_hh if like is None else like
        return ClockworkState(like.new_zeros(1, batch_size, self.hidden_size), self.time_origin)

    def forward(self, input: torch.Tensor, state: ClockworkState | torch.Tensor | None = None):
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "ClockworkRNN")
        batch = x.shape[1]
        state = batched_state(state, unbatched)
        if state is None:
            h0, step = x.new_zeros(1, batch, self.hidden_size), self.time_origin
        elif isinstance(state, torch.Tensor):  # torch.nn.RNN's hx: h only, the clock starts at time_origin
            h0, step = state, self.time_origin
        elif isinstance(state, tuple) and len(state) == 2:
            h0, step = state
        else:
            raise ValueError(f"ClockworkRNN state must be a tensor (1, {batch}, {self.hidden_size}) or a "
                             f"ClockworkState(h, step), got {type(state).__name__}")
        check_state_tensor(h0, (1, batch, self.hidden_size), "ClockworkRNN", "hx")
        if isinstance(check_step(step, batch, "ClockworkRNN state.step"), torch.Tensor):
            output = self._per_stream_steps(x, h0[0], step)  # streams restarted at different times
        elif self.backend == "triton" or (
                self.backend == "auto" and resolve_dense_backend("auto", self.weight_hh, "ClockworkRNN") == "triton"):
            resolve_dense_backend("triton", self.weight_hh, "ClockworkRNN")  # a one-line error where it cannot run
            # The layer's mask is the default one (clockwork_triton then skips W_h's zero blocks).
            output = clockwork_triton(x, self.weight_ih, self.bias, self.weight_hh, h0[0], self.periods,
                                      self.nonlinearity, step,
                                      fallback_for="ClockworkRNN" if self.backend == "auto" else None)
        else:
            output = clockwork_recurrence(x, self.weight_ih, self.bias, self.weight_hh, h0[0], self.periods,
                                          self.nonlinearity, step, self.backend, self.mask)
        final = ClockworkState(output[-1:], step + x.shape[0])
        return from_time_major(output, self.batch_first, unbatched), unbatched_state(final, unbatched)

    def _per_stream_steps(self, x: torch.Tensor, h0: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """All states (T, B, H) when each stream has its own clock ``step`` (B,) int64: the dense masked loop,
        every module computed at every step and kept where its stream's clock does not tick (the shared-clock
        kernels compute only the active modules, the same for every stream)."""
        times = step.view(1, -1, 1) + torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)
        ticks = times % self.unit_period == 0  # (T, B, H)
        z = F.linear(x, self.weight_ih, self.bias)
        weight_t = (self.weight_hh * self.mask).t()
        h, outputs = h0, []
        for t in range(x.shape[0]):
            h = torch.where(ticks[t], activate(torch.addmm(z[t], h, weight_t), self.nonlinearity), h)
            outputs.append(h)
        return torch.stack(outputs)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_modules={self.num_modules}, periods={self.periods}, "
                f"nonlinearity={self.nonlinearity!r}, batch_first={self.batch_first}, "
                f"time_origin={self.time_origin}, backend={self.backend!r}")
