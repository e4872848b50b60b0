"""NARX recurrent layer: nonlinear autoregressive model with exogenous inputs (Lin et al. 1996).

    y_t = g(U f(sum_{k=0..q} W_k x_{t-k} + sum_{k=1..p} V_k y_{t-k} + b) + c)

A one-hidden-layer MLP reads the last q + 1 inputs (tapped delay line on the input, ``input_delays``
= q) and its own last p outputs (``output_delays`` = p); the outputs y_t are the layer's output and
its recurrent state. Inputs and outputs before the first step are zeros unless given in the state.
The input taps of all steps are projected with one matmul before the loop over time.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from src.checks import check_non_negative_int, check_positive_int
from src.layers.common import batched_state, check_state_tensor, from_time_major, to_time_major, unbatched_state
from src.layers.jordan import output_feedback_loop, set_feedback_settings


class NARX(nn.Module):
    r"""NARX layer, following torch.nn.RNN's contract except for the state, a tuple (see Shapes).

    Args:
        input_size: features per input step, I.
        hidden_size: width H of the output y_t, which is fed back (the features passed to the next
            layer in :class:`src.networks.RecurrentNetwork`).
        input_delays: q >= 0: the MLP sees x_t, x_{t-1}, ..., x_{t-q}.
        output_delays: p >= 1: the MLP sees y_{t-1}, ..., y_{t-p}.
        mlp_hidden: width M of the MLP's hidden layer; default (None) H.
        nonlinearity: f for the MLP's hidden layer: "tanh", "relu", "sigmoid" or "identity".
        output_nonlinearity: g for the outputs (default "tanh", a bounded feedback).
        bias: learn the biases b and c.
        batch_first: inputs/outputs are (B, T, *) instead of (T, B, *).
        device, dtype: where and in which dtype to create the parameters.

    Parameters: ``weight_x`` (M, (q+1) I), column block k for x_{t-k}; ``weight_y`` (M, p H), block k - 1
    for y_{t-k}; ``bias_mlp`` b (M,); ``weight_out`` U (H, M); ``bias_out`` c (H,). Initialised like
    torch.nn.Linear (U(-1/sqrt(fan_in), 1/sqrt(fan_in))).

    Shapes:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched.
        state: None (all zeros) or a tuple ``(y_past, x_past)``: y_past (p, B, H) the outputs
            y_{-p}, ..., y_{-1} and x_past (q, B, I) the inputs x_{-q}, ..., x_{-1}, oldest first
            ((p, H) and (q, I) unbatched).
        output: (T, B, H) (or (B, T, H)), the outputs y_t.
        state returned: the same tuple for the next chunk: the last p outputs and the last q inputs
            (zeros where the sequence was shorter), so that passing it back continues a sequence
            exactly. h_n[0][-1] is the last output.
    """

    def __init__(self, input_size: int, hidden_size: int, input_delays: int = 2, output_delays: int = 2,
                 mlp_hidden: int | None = None, nonlinearity: str = "tanh", output_nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        set_feedback_settings(self, "NARX", input_size, hidden_size, nonlinearity, output_nonlinearity, batch_first)
        self.input_delays = check_non_negative_int("input_delays", input_delays)
        self.output_delays = check_positive_int("output_delays", output_delays)
        self.mlp_hidden = hidden_size if mlp_hidden is None else check_positive_int("mlp_hidden", mlp_hidden)
        factory = {"device": device, "dtype": dtype}
        m = self.mlp_hidden
        self.weight_x = nn.Parameter(torch.empty(m, (input_delays + 1) * input_size, **factory))
        self.weight_y = nn.Parameter(torch.empty(m, output_delays * hidden_size, **factory))
        self.bias_mlp = nn.Parameter(torch.empty(m, **factory)) if bias else None
        self.weight_out = nn.Parameter(torch.empty(hidden_size, m, **factory))
        self.bias_out = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        fan_in_mlp = self.weight_x.shape[1] + self.weight_y.shape[1]
        for params, fan_in in (((self.weight_x, self.weight_y, self.bias_mlp), fan_in_mlp),
                               ((self.weight_out, self.bias_out), self.mlp_hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            for param in params:
                if param is not None:
                    nn.init.uniform_(param, -bound, bound)

    def initial_state(self, batch_size: int, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeros: (y_past (p, batch_size, H), x_past (q, batch_size, I)) (dtype and device of ``like``)."""
        like = self.weight_out if like is None else like
        return (like.new_zeros(self.output_delays, batch_size, self.hidden_size),
                like.new_zeros(self.input_delays, batch_size, self.input_size))

    def _unpack(self, x: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor]:
        batch, p, q = x.shape[1], self.output_delays, self.input_delays
        if state is None:
            return x.new_zeros(p, batch, self.hidden_size), x.new_zeros(q, batch, self.input_size)
        expected = ((p, batch, self.hidden_size), (q, batch, self.input_size))
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise ValueError(f"NARX hx must be a tuple (y_past, x_past) of shapes {expected}, "
                             f"got {type(state).__name__}")
        for tensor, shape, name in zip(state, expected, ("y_past", "x_past")):
            check_state_tensor(tensor, shape, "NARX", f"hx (y_past, x_past): {name}")
        return state[0], state[1]

    def forward(self, input: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "NARX")
        steps, q, p = x.shape[0], self.input_delays, self.output_delays
        y_past, x_past = self._unpack(x, batched_state(state, unbatched))
        padded = torch.cat([x_past, x])  # (q + T, B, I): x_{-q}, ..., x_{T-1}
        taps = torch.cat([padded[q - k: q - k + steps] for k in range(q + 1)], dim=-1)  # (T, B, (q+1) I)
        z = F.linear(taps, self.weight_x, self.bias_mlp)  # input part of the MLP for all steps at once
        output = output_feedback_loop(z, list(y_past.unbind(0)), self.weight_y, self.weight_out, self.bias_out,
                                      self.nonlinearity, self.output_nonlinearity)
        final = (torch.cat([y_past, output[-p:]])[-p:], padded[steps:])  # the last p outputs
        return from_time_major(output, self.batch_first, unbatched), unbatched_state(final, unbatched)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, input_delays={self.input_delays}, "
                f"output_delays={self.output_delays}, mlp_hidden={self.mlp_hidden}, "
                f"nonlinearity={self.nonlinearity!r}, output_nonlinearity={self.output_nonlinearity!r}, "
                f"batch_first={self.batch_first}")
