"""LEM: long expressive memory (Rusch, Mishra, Erichson & Mahoney, ICLR 2022).

A multiscale discretisation of a system of two coupled first-order ODEs, with two learned,
input-dependent time-step gates:

    dt_bar_t = dt * sigmoid(W_1 u_t + V_1 y_{t-1} + b_1)
    dt_t     = dt * sigmoid(W_2 u_t + V_2 y_{t-1} + b_2)
    z_t = (1 - dt_t) * z_{t-1} + dt_t * tanh(W_z u_t + V_z y_{t-1} + b_z)
    y_t = (1 - dt_bar_t) * y_{t-1} + dt_bar_t * tanh(W_y u_t + V_y z_t + b_y)          (output y_t)

(products elementwise; W_* (H, I), V_* (H, H); dt a fixed float, the largest step). As the official
code, in its order: one input map (I -> 4H: [W_1; W_2; W_y; W_z]), one map of y (H -> 3H:
[V_1; V_2; V_z]) and one of z (H -> H: V_y), each with a bias (b_z, b_y are the sums of two biases).
:func:`lem_reference` is the same recurrence as a plain loop over given weights (the layer runs it).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from src.checks import check_positive_int
from src.layers.common import OscillatorState, to_time_major


def lem_reference(drives: torch.Tensor, weight_y: torch.Tensor, bias_y: torch.Tensor | None, weight_z: torch.Tensor,
                  bias_z: torch.Tensor | None, y0: torch.Tensor, z0: torch.Tensor,
                  dt: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The LEM recurrence as an autograd loop.

    Args:
        drives: the input map for every step, (T, B, 4H): [W_1 u, W_2 u, W_y u, W_z u] plus biases.
        weight_y: [V_1; V_2; V_z] (3H, H), applied to y_{t-1}; bias_y (3H,) or None.
        weight_z: V_y (H, H), applied to z_t; bias_z (H,) or None.
        y0, z0: the state before the first step, (B, H) each.
        dt: the largest time step.

    Returns:
        (y (T, B, H), z_{T-1} (B, H)).
    """
    hidden = y0.shape[-1]
    y, z = y0, z0
    outputs = []
    for drive in drives.unbind(0):
        from_y = F.linear(y, weight_y, bias_y)  # [V_1 y, V_2 y, V_z y] + biases
        # Both gates in one sigmoid over 2H; (1 - s) * a + s * b written as a + s * (b - a): fewer ops per
        # step, which is what a loop of small tensors costs.
        steps = dt * torch.sigmoid(drive[..., :2 * hidden] + from_y[..., :2 * hidden])
        step_bar, step = steps[..., :hidden], steps[..., hidden:]
        z = z + step * (torch.tanh(drive[..., 3 * hidden:] + from_y[..., 2 * hidden:]) - z)
        y = y + step_bar * (torch.tanh(drive[..., 2 * hidden:3 * hidden] + F.linear(z, weight_z, bias_z)) - y)
        outputs.append(y)
    return (torch.stack(outputs) if outputs else drives.new_zeros(*drives.shape[:2], y0.shape[-1])), z


class LEM(OscillatorState, nn.Module):
    r"""One LEM layer (module docstring).

    Args:
        input_size: features per input step, I.
        hidden_size: units, H.
        dt: the largest time step (official EigenWorms recipe: 0.00017; psMNIST: 1).
        batch_first: inputs/outputs are (B, T, *) instead of (T, B, *).
        bias: biases of the three maps.

    Initialisation as the official code: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H)).

    State (y, z) and shapes: as :class:`src.layers.common.OscillatorState` (output y (T, B, H) at every step).
    """

    layer_name = "LEM"  # in error messages

    def __init__(self, input_size: int, hidden_size: int, dt: float = 1.0, batch_first: bool = False,
                 bias: bool = True) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not (math.isfinite(dt) and dt > 0):
            raise ValueError(f"LEM dt must be a number > 0, got {dt!r}")
        self.dt = float(dt)
        self.batch_first = batch_first
        self.input_map = nn.Linear(input_size, 4 * hidden_size, bias=bias)       # [W_1; W_2; W_y; W_z]
        self.hidden_map = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)     # [V_1; V_2; V_z] on y
        self.transform_z = nn.Linear(hidden_size, hidden_size, bias=bias)        # V_y on z
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def forward(self, input: torch.Tensor, state=None):
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "LEM",
                                     dtype=self.transform_z.weight.dtype)
        y0, z0 = self.start_pair(x, state, unbatched)
        ys, z_last = lem_reference(self.input_map(x), self.hidden_map.weight, self.hidden_map.bias,
                                   self.transform_z.weight, self.transform_z.bias, y0, z0, self.dt)
        return self.finish_pair(ys, z_last, y0, unbatched)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, dt={self.dt}, batch_first={self.batch_first}"
