"""Time-delay neural network layer (Waibel et al. 1989): a causal convolution over time.

    y_t = f(sum_{k=0..p-1} W_k x_{t-k d} + b)

Each output step sees its input at the ``window`` = p steps t, t - d, ..., t - (p - 1) d (d =
``dilation``), zeros before the first step: a Conv1d over time padded (p - 1) d steps on the left.
On CPU it is computed as one matmul over the stacked taps (T, B, p I): torch's Conv1d backward
pass is about 25x slower than that at these sizes; on CUDA as one causal ``F.conv1d`` (cuDNN)
over the padded sequence, which reads each input once instead of p times. Neither loops over time.
There is no recurrence; the layer's state is its window of past inputs (the last (p - 1) d of
them), so a sequence cut into chunks continues exactly when the returned state is passed back.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from src.activations import FUNCTIONS, activate
from src.checks import check_choice, check_positive_int
from src.layers.common import (batched_state, check_state_tensor, from_time_major, to_time_major,
                               unbatched_state)

NONLINEARITIES = tuple(FUNCTIONS)


def causal_taps(padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """Pre-activations (T, B, H) from ``padded`` (R - 1 + T, B, I) (the R - 1 past inputs first) and a
    Conv1d ``weight`` (H, I, p): one matmul over the p stacked taps (T, B, p I). The CPU path."""
    hidden, features, window = weight.shape
    steps = padded.shape[0] - (window - 1) * dilation
    taps = torch.cat([padded[j * dilation: j * dilation + steps] for j in range(window)], dim=-1)  # x_{t-(p-1-j)d}
    return F.linear(taps, weight.permute(0, 2, 1).reshape(hidden, window * features), bias)


def causal_conv(padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int) -> torch.Tensor:
    """As :func:`causal_taps`, by one ``F.conv1d`` over (B, I, R - 1 + T) (cuDNN on CUDA; no padding: the
    past inputs are the left context). The CUDA path."""
    return F.conv1d(padded.permute(1, 2, 0), weight, bias, dilation=dilation).permute(2, 0, 1)


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

    State: a tensor (R - 1, B, I), R = :attr:`receptive_field` = (p - 1) d + 1: the last R - 1 input
    steps, oldest first (zeros before the first step). None: zeros.

    Shapes:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched (state then (R - 1, I)).
        output: (T, B, H) (or (B, T, H)).
    """

    def __init__(self, input_size: int, hidden_size: int, window: int = 4, dilation: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.window = check_positive_int("window", window)
        self.dilation = check_positive_int("dilation", dilation)
        check_choice("TDNN nonlinearity", nonlinearity, NONLINEARITIES)
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

    def initial_state(self, batch_size: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """Zeros (R - 1, batch_size, I): no input seen yet (dtype and device of ``like``, default the weight)."""
        like = self.weight if like is None else like
        return like.new_zeros(self.receptive_field - 1, batch_size, self.input_size)

    def forward(self, input: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "TDNN")
        batch, d = x.shape[1], self.dilation
        memory = self.receptive_field - 1
        past = batched_state(state, unbatched)
        if past is None:
            past = x.new_zeros(memory, batch, self.input_size)
        check_state_tensor(past, (memory, batch, self.input_size), "TDNN", "state (the last receptive_field - 1 inputs)")
        padded = torch.cat([past, x])  # (R - 1 + T, B, I): x_{-(R-1)}, ..., x_{T-1}
        compute = causal_conv if padded.is_cuda else causal_taps
        output = activate(compute(padded, self.weight, self.bias, d), self.nonlinearity)  # (T, B, H)
        final = padded[padded.shape[0] - memory:]
        return from_time_major(output, self.batch_first, unbatched), unbatched_state(final, unbatched)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, window={self.window}, dilation={self.dilation}, "
                f"nonlinearity={self.nonlinearity!r}, batch_first={self.batch_first}")
