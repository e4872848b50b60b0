"""UnICORNN: undamped independent controlled oscillatory RNN (Rusch & Mishra, ICML 2021).

One layer is an input projection followed by H independent oscillators (a diagonal recurrence, as
IndRNN's), each with its own learned time step:

    x_t = V u_t + b                                        (projection, every step)
    s   = dt * sigmoid(c)                                  (per-unit time step, c learned)
    z_t = z_{t-1} - s * (tanh(w * y_{t-1} + x_t) + alpha * y_{t-1})
    y_t = y_{t-1} + s * z_t                                (output y_t)

with w (H,) the recurrent weights and alpha >= 0 a fixed restoring force. The symplectic Euler step
keeps the oscillators' energy bounded, so gradients neither explode nor vanish over very long
sequences (the paper's EigenWorms: T = 17,984). The recurrence runs in a fused kernel
(:mod:`src.kernels.unicornn_cpu`, :mod:`src.kernels.unicornn_triton`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from src.checks import check_choice, check_positive_int
from src.kernels.unicornn_cpu import BACKENDS, unicornn_recurrence
from src.layers.common import OscillatorState, to_time_major

INPUT_INITS = ("kaiming_a8", "uniform")


class UnICORNN(OscillatorState, nn.Module):
    r"""One UnICORNN layer: projection, then H independent oscillators (module docstring).

    Args:
        input_size: features per input step, I.
        hidden_size: oscillators, H.
        dt: the largest time step; unit j steps by dt * sigmoid(c_j) (official EigenWorms recipe:
            2.81e-5 for the first layer, 0.0343 for the second).
        alpha: restoring force alpha * y (official EigenWorms recipe: 0).
        batch_first: inputs/outputs are (B, T, *) instead of (T, B, *).
        bias: bias b of the projection.
        input_init: "kaiming_a8" (the official code: kaiming_uniform with a=8, zero bias) or "uniform"
            (torch.nn.Linear's default).
        backend: "auto" (the fused kernel for the device), "fused", "cpu", "triton" or "reference".

    Initialisation as the official code: w ~ U(0, 1), c ~ U(-0.1, 0.1).

    State (y, z): position and velocity of every oscillator; state and shapes as
    :class:`src.layers.common.OscillatorState` (output y (T, B, H) at every step).
    """

    layer_name = "UnICORNN"  # in error messages

    def __init__(self, input_size: int, hidden_size: int, dt: float = 0.01, alpha: float = 0.0,
                 batch_first: bool = False, bias: bool = True, input_init: str = "kaiming_a8",
                 backend: str = "auto") -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not (math.isfinite(dt) and dt > 0):
            raise ValueError(f"UnICORNN dt must be a number > 0, got {dt!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"UnICORNN alpha must be a number >= 0, got {alpha!r}")
        self.dt, self.alpha = float(dt), float(alpha)
        self.batch_first = batch_first
        self.input_init = check_choice("UnICORNN input_init", input_init, INPUT_INITS)
        self.backend = check_choice("UnICORNN backend", backend, BACKENDS)
        self.projection = nn.Linear(input_size, hidden_size, bias=bias)
        self.weight_hh = nn.Parameter(torch.empty(hidden_size))  # w: one recurrent weight per unit
        self.step_logit = nn.Parameter(torch.empty(hidden_size))  # c: time step dt * sigmoid(c)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.input_init == "kaiming_a8":
            nn.init.kaiming_uniform_(self.projection.weight, a=8, mode="fan_in")
            if self.projection.bias is not None:
                nn.init.zeros_(self.projection.bias)
        else:
            self.projection.reset_parameters()
        nn.init.uniform_(self.weight_hh, 0.0, 1.0)
        nn.init.uniform_(self.step_logit, -0.1, 0.1)

    @property
    def time_steps(self) -> torch.Tensor:
        """(H,): each unit's time step dt * sigmoid(c)."""
        return self.dt * torch.sigmoid(self.step_logit)

    def forward(self, input: torch.Tensor, state=None):
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "UnICORNN", dtype=self.weight_hh.dtype)
        y0, z0 = self.start_pair(x, state, unbatched)
        ys, z_last = unicornn_recurrence(self.projection(x), self.weight_hh, self.step_logit, y0, z0,
                                         self.dt, self.alpha, self.backend)
        return self.finish_pair(ys, z_last, y0, unbatched)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, dt={self.dt}, alpha={self.alpha}, batch_first={self.batch_first}"
