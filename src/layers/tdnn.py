"""Time-delay neural network layer (Waibel et al. 1989): a causal convolution over time.

    y_t = f(sum_{k=0..p-1} W_k x_{t-k d} + b)

Each output step sees its input at the ``window`` = p steps t, t - d, ..., t - (p - 1) d (d =
``dilation``), zeros before the first step: a Conv1d over time padded (p - 1) d steps on the left.
It is computed as one matmul over the stacked taps (T, B, p I): on CPU, torch's Conv1d backward
pass is about 25x slower than that at these sizes.
There is no recurrence; the layer still takes and returns a state so that it stacks like the
recurrent layers (hx must be None, h_n is the last output step).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from src.layers.common import check_positive_int, sequence_and_final_state, to_time_major
from src.activations import activate
from src.layers.jordan import NONLINEARITIES


class TDNN(nn.Module):
    r"""Causal time-delay layer with torch.nn.RNN's interface (one layer, no recurrence).

    Args:
        input_size: features per input step, I.
        hidden_size: output features per step, H.
        window: p, the number of input steps each output sees (the kernel size).
        dilation: d, the spacing of those steps: t, t - d, ..., t - (p - 1) d.
        nonlinearity: f: "tanh", "relu", "sigmoid" or "identity".
        bias: learn the bias b.
        batch_first: inputs/outputs are (B, T, *) instead of (T, B, *).
        device, dtype: where and in which dtype to create the parameters.

    Parameters: ``weight`` (H, I, p) and ``bias`` (H,), laid out as torch.nn.Conv1d(I, H, p,
    dilation=d)'s and initialised U(-1/sqrt(I p), 1/sqrt(I p)); ``weight[:, :, p - 1 - k]`` multiplies
    x_{t - k d}.

    Shapes:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched.
        hx: must be None (the layer keeps no state between calls).
        output: (T, B, H) (or (B, T, H)); h_n: (1, B, H) ((1, H) unbatched), the last output step.
    """

    def __init__(self, input_size: int, hidden_size: int, window: int = 4, dilation: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.window = check_positive_int("window", window)
        self.dilation = check_positive_int("dilation", dilation)
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"unknown TDNN nonlinearity {nonlinearity!r}; choose one of {NONLINEARITIES}")
        self.nonlinearity, self.batch_first = nonlinearity, batch_first
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(hidden_size, input_size, window, **factory))
        self.bias = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.input_size * self.window)
        for param in (self.weight, self.bias):
            if param is not None:
                nn.init.uniform_(param, -bound, bound)

    @property
    def receptive_field(self) -> int:
        """Steps from the oldest input an output sees to the output's own step, inclusive: (p - 1) d + 1."""
        return (self.window - 1) * self.dilation + 1

    def forward(self, input: torch.Tensor, hx: None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if hx is not None:
            raise ValueError("TDNN keeps no recurrent state: hx must be None (it sees only its last "
                             f"{self.receptive_field} input steps)")
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "TDNN")
        steps, p, d = x.shape[0], self.window, self.dilation
        padded = F.pad(x, (0, 0, 0, 0, (p - 1) * d, 0))  # (pad + T, B, I), zeros before the first step
        taps = torch.cat([padded[j * d: j * d + steps] for j in range(p)], dim=-1)  # block j: x_{t-(p-1-j)d}
        weight = self.weight.permute(0, 2, 1).reshape(self.hidden_size, p * self.input_size)
        output = activate(F.linear(taps, weight, self.bias), self.nonlinearity)  # (T, B, H)
        return sequence_and_final_state(output, self.batch_first, unbatched)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, window={self.window}, dilation={self.dilation}, "
                f"nonlinearity={self.nonlinearity!r}, batch_first={self.batch_first}")
