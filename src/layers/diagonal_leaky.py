"""The diagonal leaky unit: a leaky integrator whose recurrent matrix is diagonal (one weight per unit),
the per-unit form that RTRL trains exactly (:mod:`src.learning.rtrl`), as IndRNN is.

    a_t = W x_t + b + u * h_{t-1},      h_t = alpha * h_{t-1} + (1 - alpha) * f(a_t)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from src.activations import activate
from src.checks import check_choice, check_positive_int
from src.layers.common import init_uniform_, initial_state, sequence_and_final_state, to_time_major
from src.layers.leaky import ALPHA_MODES, LOGIT_BOUND, LeakRates

DIAGONAL_NONLINEARITIES = ("relu", "tanh", "identity")


class DiagonalLeakyRNN(LeakRates, nn.Module):
    r"""Leaky-integrator layer with a diagonal recurrence: the per-unit form RTRL trains exactly.

    :math:`h_t = \alpha \odot h_{t-1} + (1 - \alpha) \odot f(W x_t + b + u \odot h_{t-1})`, alpha per
    unit in (0, 1) (learned: sigmoid(alpha_logit), clamped like :class:`src.layers.LeakyRNN`'s).

    Args:
        input_size: I. hidden_size: H.
        nonlinearity: f, "tanh", "relu" or "identity".
        alpha_mode: "fixed" (buffer ``alpha_value``) or "learned" (parameter ``alpha_logit``).
        alpha_range: (low, high): each unit's alpha is drawn uniformly in it (learned: inside (0, 1)).
        recurrent: learn the diagonal recurrent weights u (``weight_hh`` (H,), initialised U(0, 1)
            clamped to ``u_bound``); False: no u, the pure leaky unit h_t = alpha h_{t-1} + (1 - alpha) f(W x_t + b).
        u_bound: |u| <= u_bound after every optimizer step (:meth:`constrain_parameters_`), or None.
        bias: learn b. batch_first: (B, T, *) layout.

    Parameters: ``weight_ih`` (H, I), ``bias`` (H,), ``weight_hh`` (H,), ``alpha_logit`` (H,) or the
    buffer ``alpha_value`` (H,).

    Shapes: input (T, B, I) ((B, T, I) with batch_first, (T, I) unbatched); state h (1, B, H) or
    None (zeros) -> output (T, B, H), state (1, B, H).
    """

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "tanh", alpha_mode: str = "fixed",
                 alpha_range: Sequence[float] = (0.0, 0.9), recurrent: bool = True, u_bound: float | None = 1.0,
                 bias: bool = True, batch_first: bool = False) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.nonlinearity = check_choice("DiagonalLeakyRNN nonlinearity", nonlinearity, DIAGONAL_NONLINEARITIES)
        self.alpha_mode = check_choice("DiagonalLeakyRNN alpha_mode", alpha_mode, ALPHA_MODES)
        low, high = (float(a) for a in alpha_range)
        strict = alpha_mode == "learned"
        if not (0 < low <= high < 1 if strict else 0 <= low <= high <= 1):
            allowed = "0 < low <= high < 1" if strict else "0 <= low <= high <= 1"
            raise ValueError(f"DiagonalLeakyRNN alpha_range must satisfy {allowed}, got {list(alpha_range)}")
        if u_bound is not None and not u_bound > 0:
            raise ValueError(f"DiagonalLeakyRNN u_bound must be > 0 or None, got {u_bound}")
        self.alpha_range, self.u_bound, self.batch_first = (low, high), u_bound, batch_first
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))
        self.bias = nn.Parameter(torch.empty(hidden_size)) if bias else None
        self.weight_hh = nn.Parameter(torch.empty(hidden_size)) if recurrent else None
        if strict:
            self.alpha_logit = nn.Parameter(torch.empty(hidden_size))
        else:
            self.register_buffer("alpha_value", torch.empty(hidden_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_uniform_((self.weight_ih, self.bias), self.hidden_size)
        if self.weight_hh is not None:
            self.weight_hh.uniform_(0.0, 1.0)
        alpha = torch.empty(self.hidden_size).uniform_(*self.alpha_range)
        if self.alpha_mode == "learned":
            self.alpha_logit.copy_(torch.logit(alpha))
        else:
            self.alpha_value.copy_(alpha)
        self.constrain_parameters_()

    @torch.no_grad()
    def constrain_parameters_(self) -> None:
        """Clamp |u| to u_bound and a learned alpha_logit to [-12, 12] (call after each optimizer step)."""
        if self.weight_hh is not None and self.u_bound is not None:
            self.weight_hh.clamp_(-self.u_bound, self.u_bound)
        if self.alpha_mode == "learned":
            self.alpha_logit.clamp_(-LOGIT_BOUND, LOGIT_BOUND)

    def forward(self, input: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "DiagonalLeakyRNN")
        h = initial_state(state, x.shape[1], self.hidden_size, unbatched, "DiagonalLeakyRNN", like=x)
        z = F.linear(x, self.weight_ih, self.bias)
        alpha, outputs = self.alpha, []
        for z_t in z.unbind(0):
            pre = z_t if self.weight_hh is None else z_t + self.weight_hh * h
            h = alpha * h + (1 - alpha) * activate(pre, self.nonlinearity)
            outputs.append(h)
        return sequence_and_final_state(torch.stack(outputs), self.batch_first, unbatched)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, {self.nonlinearity}, alpha_mode={self.alpha_mode!r}, "
                f"alpha_range={self.alpha_range}, recurrent={self.weight_hh is not None}, u_bound={self.u_bound}")


__all__ = ["DIAGONAL_NONLINEARITIES", "DiagonalLeakyRNN"]
