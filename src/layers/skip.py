"""Skip-through-time RNN: an Elman network with extra recurrent connections from d steps back
(Lin, Horne, Tino & Giles 1996, "NARX"-style delays in the hidden state).

    h_t = f(W x_t + sum_{d in delays} U_d h_{t-d} + b)

With ``delays=[1]`` this is torch.nn.RNN. A connection of delay d lets a gradient cross d steps
through one weight matrix, so it shortens the paths to distant inputs by a factor of d. The state
is the last max(delays) hidden states, so a sequence continues exactly from a returned state.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from src.activations import activate
from src.checks import check_choice, check_int_list, check_positive_int
from src.kernels.dense_triton import DENSE_BACKENDS, dense_recurrence_triton, resolve_dense_backend
from src.layers.common import (batched_state, check_state_tensor, from_time_major, init_uniform_, to_time_major,
                               unbatched_state)

NONLINEARITIES = ("tanh", "relu")


def check_delays(delays: Sequence[int]) -> tuple[int, ...]:
    """``delays`` as a tuple: a non-empty list of distinct positive ints (1 need not be among them)."""
    values = check_int_list("delays", delays, minimum=1)
    if len(set(values)) != len(values):
        raise ValueError(f"delays must be distinct, got {list(values)}")
    return values


class SkipRNN(nn.Module):
    r"""Elman RNN with recurrent connections from several delays, torch.nn.RNN's contract (one layer).

    Args:
        input_size: features per input step, I.
        hidden_size: units, H.
        delays: distinct positive ints d, one recurrent matrix U_d each, e.g. [1, 4, 16].
        nonlinearity: f, "tanh" or "relu".
        bias: learn the bias b.
        batch_first: inputs/outputs are (B, T, *) instead of (T, B, *).
        backend: "reference", "triton" or "auto", as :class:`src.layers.LeakyRNN`'s.
        device, dtype: where and in which dtype to create the parameters.

    Parameters: ``weight_ih`` W (H, I), ``weight_hh`` (len(delays), H, H) with ``weight_hh[k]`` =
    U_{delays[k]}, ``bias`` b (H,); all U(-1/sqrt(H), 1/sqrt(H)) as torch.nn.RNN, the recurrent
    matrices further divided by sqrt(len(delays)) so that the summed recurrent input keeps its scale.

    State: a tensor (D, B, H), D = max(delays): the last D hidden states h_{t-D}, ..., h_{t-1},
    oldest first (zeros before the first step), so passing it back continues a sequence exactly;
    state[-1] is the last hidden state. A (1, B, H) tensor is accepted too (torch.nn.RNN's hx:
    h_{-1}, with zeros before it). None: all zeros.

    Shapes:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched (states then without B).
        output: (T, B, H) (or (B, T, H)), the hidden state after every step.
    """

    def __init__(self, input_size: int, hidden_size: int, delays: Sequence[int] = (1, 2, 4, 8),
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.delays = check_delays(delays)
        self.backend = check_choice("SkipRNN backend", backend, DENSE_BACKENDS)
        check_choice("SkipRNN nonlinearity", nonlinearity, NONLINEARITIES)
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

    @property
    def memory(self) -> int:
        """D = max(delays): the hidden states the layer's state keeps."""
        return max(self.delays)

    def initial_state(self, batch_size: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """Zeros (D, batch_size, H) (dtype and device of ``like``, default the parameters)."""
        return (self.weight_ih if like is None else like).new_zeros(self.memory, batch_size, self.hidden_size)

    def forward(self, input: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "SkipRNN")
        batch, memory = x.shape[1], self.memory
        past = batched_state(state, unbatched)
        if past is None:
            past = x.new_zeros(memory, batch, self.hidden_size)
        elif isinstance(past, torch.Tensor) and past.dim() == 3 and past.shape[0] == 1 and memory > 1:
            past = F.pad(check_state_tensor(past, (1, batch, self.hidden_size), "SkipRNN", "hx"),
                         (0, 0, 0, 0, memory - 1, 0))  # h_{-1} given, older states zero
        check_state_tensor(past, (memory, batch, self.hidden_size), "SkipRNN", "state (the last max(delays) states)")
        z = F.linear(x, self.weight_ih, self.bias)  # W x_t + b for all steps at once
        if resolve_dense_backend(self.backend, self.weight_hh, "SkipRNN") == "triton":
            no_leak = self.weight_hh.new_zeros(1, self.hidden_size).expand(x.shape[0], self.hidden_size)
            output = dense_recurrence_triton(z, self.weight_hh, past, no_leak, self.delays, self.nonlinearity,
                                             fallback_for="SkipRNN" if self.backend == "auto" else None)
            final = torch.cat([past, output])[-memory:]
            return from_time_major(output, self.batch_first, unbatched), unbatched_state(final, unbatched)
        weights = [w.t() for w in self.weight_hh]
        history = list(past.unbind(0))  # h_{-D}, ..., h_{-1}, then every new state
        for t in range(x.shape[0]):
            total = z[t]
            for delay, weight in zip(self.delays, weights):
                total = torch.addmm(total, history[-delay], weight)  # h_{t-d}
            history.append(activate(total, self.nonlinearity))
        output = torch.stack(history[memory:])
        final = torch.stack(history[-memory:])
        return from_time_major(output, self.batch_first, unbatched), unbatched_state(final, unbatched)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, delays={list(self.delays)}, "
                f"nonlinearity={self.nonlinearity!r}, batch_first={self.batch_first}, backend={self.backend!r}")
