"""Skip-through-time RNN: an Elman network with extra recurrent connections from d steps back
(Lin, Horne, Tino & Giles 1996, "NARX"-style delays in the hidden state).

    h_t = f(W x_t + sum_{d in delays} U_d h_{t-d} + b)

With ``delays=[1]`` this is torch.nn.RNN. A connection of delay d lets a gradient cross d steps
through one weight matrix, so it shortens the paths to distant inputs by a factor of d.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from src.activations import activate
from src.layers.common import check_positive_int, init_uniform_, initial_state, sequence_and_final_state, to_time_major

NONLINEARITIES = ("tanh", "relu")


def check_delays(delays: Sequence[int]) -> tuple[int, ...]:
    """``delays`` as a tuple: a non-empty list of distinct positive ints (1 need not be among them)."""
    values = list(delays)
    if not values or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in values):
        raise ValueError(f"delays must be a non-empty list of positive integers, got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"delays must be distinct, got {values}")
    return tuple(values)


class SkipRNN(nn.Module):
    r"""Elman RNN with recurrent connections from several delays, torch.nn.RNN's contract (one layer).

    Args:
        input_size: features per input step, I.
        hidden_size: units, H.
        delays: distinct positive ints d, one recurrent matrix U_d each, e.g. [1, 4, 16].
        nonlinearity: f, "tanh" or "relu".
        bias: learn the bias b.
        batch_first: inputs/outputs are (B, T, *) instead of (T, B, *).
        device, dtype: where and in which dtype to create the parameters.

    Parameters: ``weight_ih`` W (H, I), ``weight_hh`` (len(delays), H, H) with ``weight_hh[k]`` =
    U_{delays[k]}, ``bias`` b (H,); all U(-1/sqrt(H), 1/sqrt(H)) as torch.nn.RNN, the recurrent
    matrices further divided by sqrt(len(delays)) so that the summed recurrent input keeps its scale.

    States before the first step: h_{-1} = hx, and h_{-2}, h_{-3}, ... are zeros. So hx carries only
    the last state: splitting a sequence into chunks and passing h_n on is exact for ``delays=[1]``
    but drops the older history of the longer delays.

    Shapes:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched.
        hx: (1, B, H) initial state h_{-1} (zeros when None); (1, H) unbatched.
        output: (T, B, H) (or (B, T, H)), the state after every step; h_n: (1, B, H), the last.
    """

    def __init__(self, input_size: int, hidden_size: int, delays: Sequence[int] = (1, 2, 4, 8),
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.delays = check_delays(delays)
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"unknown SkipRNN nonlinearity {nonlinearity!r}; choose one of {NONLINEARITIES}")
        self.nonlinearity, self.batch_first = nonlinearity, batch_first
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(len(self.delays), hidden_size, hidden_size, **factory))
        self.bias = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_uniform_((self.weight_ih, self.weight_hh, self.bias), self.hidden_size)
        self.weight_hh.div_(math.sqrt(len(self.delays)))

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "SkipRNN")
        batch = x.shape[1]
        h0 = initial_state(hx, batch, self.hidden_size, unbatched, "SkipRNN", like=x)
        z = F.linear(x, self.weight_ih, self.bias)  # W x_t + b for all steps at once
        weights = [w.t() for w in self.weight_hh]
        outputs: list[torch.Tensor] = []
        for t in range(x.shape[0]):
            total = z[t]
            for delay, weight in zip(self.delays, weights):
                source = t - delay  # index of h_{t-d}; -1 is hx, earlier ones are zeros
                if source >= 0:
                    total = torch.addmm(total, outputs[source], weight)
                elif source == -1:
                    total = torch.addmm(total, h0, weight)
            outputs.append(activate(total, self.nonlinearity))
        output = torch.stack(outputs)
        return sequence_and_final_state(output, self.batch_first, unbatched)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, delays={list(self.delays)}, "
                f"nonlinearity={self.nonlinearity!r}, batch_first={self.batch_first}")
