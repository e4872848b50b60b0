"""coRNN: coupled oscillatory RNN (Rusch & Mishra, ICLR 2021).

A network of coupled, damped, driven oscillators, the second-order ODE
y'' = tanh(W y + W_z y' + V u + b) - gamma y - epsilon y', discretised with time step dt as in the
official code (explicit in every term, z = y' the velocity):

    z_t = z_{t-1} + dt * (tanh(W y_{t-1} + W_z z_{t-1} + V u_t + b) - gamma * y_{t-1} - epsilon * z_{t-1})
    y_t = y_{t-1} + dt * z_t                                                      (output y_t)

W, W_z (H, H) couple the oscillators, V (H, I) reads the input; gamma and epsilon are fixed.
:func:`cornn_reference` is the same recurrence as a plain loop over given weights (the layer runs it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from src.checks import check_positive_int
from src.layers.common import OscillatorState, to_time_major


def cornn_reference(inputs: torch.Tensor, weight_y: torch.Tensor, weight_z: torch.Tensor, y0: torch.Tensor,
                    z0: torch.Tensor, dt: float, gamma: float, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The coRNN recurrence as an autograd loop.

    Args:
        inputs: V u_t + b for every step, (T, B, H).
        weight_y: W (H, H); weight_z: W_z (H, H).
        y0, z0: the state before the first step, (B, H) each.
        dt, gamma, epsilon: as in the module docstring.

    Returns:
        (y (T, B, H), z_{T-1} (B, H)).
    """
    y, z = y0, z0
    outputs = []
    weight_y_t, weight_z_t = weight_y.T, weight_z.T
    for drive in inputs.unbind(0):
        force = torch.tanh(torch.addmm(torch.addmm(drive, y, weight_y_t), z, weight_z_t))
        z = z + dt * (force - gamma * y - epsilon * z)
        y = y + dt * z
        outputs.append(y)
    return (torch.stack(outputs) if outputs else inputs.new_zeros(inputs.shape)), z


def _check_positive(name: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"coRNN {name} must be a number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


class CoRNN(OscillatorState, nn.Module):
    r"""One coRNN layer (module docstring).

    Args:
        input_size: features per input step, I.
        hidden_size: oscillators, H.
        dt: time step (official psMNIST recipe: 0.076).
        gamma: the restoring force gamma * y (psMNIST: 0.4).
        epsilon: the damping epsilon * z (psMNIST: 8.0).
        batch_first: inputs/outputs are (B, T, *) instead of (T, B, *).
        bias: bias b.

    Initialisation as the official code's single ``nn.Linear(I + 2H, H)`` over [u, z, y]: every weight
    and the bias ~ U(-1/sqrt(I + 2H), 1/sqrt(I + 2H)).

    State and shapes: see :class:`src.layers.common.OscillatorState`; output y (T, B, H) at every step.
    """

    layer_name = "coRNN"  # in error messages

    def __init__(self, input_size: int, hidden_size: int, dt: float = 0.076, gamma: float = 0.4,
                 epsilon: float = 8.0, batch_first: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.dt = _check_positive("dt", dt)
        self.gamma = _check_positive("gamma", gamma, allow_zero=True)
        self.epsilon = _check_positive("epsilon", epsilon, allow_zero=True)
        self.batch_first = batch_first
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))   # V
        self.weight_hy = nn.Parameter(torch.empty(hidden_size, hidden_size))  # W, on y
        self.weight_hz = nn.Parameter(torch.empty(hidden_size, hidden_size))  # W_z, on z = y'
        self.bias = nn.Parameter(torch.empty(hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.input_size + 2 * self.hidden_size)
        for parameter in (self.weight_ih, self.weight_hy, self.weight_hz, self.bias):
            if parameter is not None:
                nn.init.uniform_(parameter, -bound, bound)

    def forward(self, input: torch.Tensor, state=None):
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "coRNN", dtype=self.weight_hy.dtype)
        y0, z0 = self.start_pair(x, state, unbatched)
        drive = torch.nn.functional.linear(x, self.weight_ih, self.bias)  # V u_t + b for all t at once
        ys, z_last = cornn_reference(drive, self.weight_hy, self.weight_hz, y0, z0, self.dt, self.gamma,
                                     self.epsilon)
        return self.finish_pair(ys, z_last, y0, unbatched)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, dt={self.dt}, gamma={self.gamma}, epsilon={self.epsilon}, "
                f"batch_first={self.batch_first}")
