"""Independently recurrent neural network layer (Li et al., CVPR 2018)."""
from __future__ import annotations

import math

import torch
from torch import nn

from src.kernels import ACTIVATIONS, BACKENDS, indrnn_recurrence
from src.layers.common import check_positive_int, to_time_major, from_time_major

RECURRENT_INITS = ("uniform_bound", "uniform01", "long_memory")


class IndRNN(nn.Module):
    r"""One IndRNN layer: :math:`h_t = \mathrm{act}(W x_t + u \odot h_{t-1} + b)`.

    Each unit has a single scalar recurrent weight u_j, so units are independent across time and
    the layer is a cheap elementwise recurrence after one big input matmul. Gradients through
    time scale like u_j^T, which is why u is kept within ``u_bound`` (the paper's
    ``MAG ** (1 / T)``): call :meth:`apply_constraints` after every optimizer step (the
    LightningModules do this).

    Args:
        input_size: features per step of the input, I.
        hidden_size: number of units, H.
        nonlinearity: "relu" (paper default), "tanh" or "identity".
        bias: learn the bias b.
        batch_first: inputs and outputs are (B, T, *) instead of (T, B, *).
        u_bound: explicit bound on |u| (e.g. 0.99 for language modelling); overrides
            ``magnitude``/``seq_len``.
        magnitude: MAG, the largest gradient growth allowed over ``seq_len`` steps
            (papers: 2 for the adding problem, 5 for MNIST/NTU); u_bound = MAG ** (1/seq_len).
        seq_len: T used to derive u_bound from ``magnitude``.
        recurrent_init: "uniform_bound" U(0, u_bound) (default when a bound exists),
            "uniform01" U(0, 1), or "long_memory" U(1/u_bound, u_bound) (the paper's
            initialisation for the last layer, keeping long-range information).
        backend: recurrence implementation, see :mod:`src.kernels` ("auto" picks the fused one).

    Shapes:
        input: (T, B, I), or (B, T, I) with ``batch_first``, or (T, I) unbatched.
        hx: (1, B, H) initial state (zeros when None); (1, H) for unbatched input.
        output: (T, B, H) (or (B, T, H)); h_n: (1, B, H), the state after the last step.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        nonlinearity: str = "relu",
        bias: bool = True,
        batch_first: bool = False,
        u_bound: float | None = None,
        magnitude: float | None = None,
        seq_len: int | None = None,
        recurrent_init: str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        if nonlinearity not in ACTIVATIONS:
            raise ValueError(f"unknown IndRNN nonlinearity {nonlinearity!r}; choose one of {ACTIVATIONS}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown IndRNN backend {backend!r}; choose one of {BACKENDS}")
        self.nonlinearity, self.backend, self.batch_first = nonlinearity, backend, batch_first
        self.u_bound = self._resolve_bound(u_bound, magnitude, seq_len)
        if recurrent_init is None:
            recurrent_init = "uniform_bound" if self.u_bound is not None else "uniform01"
        if recurrent_init not in RECURRENT_INITS:
            raise ValueError(f"unknown recurrent_init {recurrent_init!r}; choose one of {RECURRENT_INITS}")
        if recurrent_init != "uniform01" and self.u_bound is None:
            raise ValueError(f"recurrent_init={recurrent_init!r} needs u_bound, or magnitude and seq_len")
        self.recurrent_init = recurrent_init
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size))  # u: one recurrent weight per unit
        self.bias = nn.Parameter(torch.empty(hidden_size)) if bias else None
        self.reset_parameters()

    @staticmethod
    def _resolve_bound(u_bound, magnitude, seq_len) -> float | None:
        if u_bound is not None:
            if not u_bound > 0:
                raise ValueError(f"u_bound must be > 0, got {u_bound}")
            return float(u_bound)
        if magnitude is None:
            return None
        if not magnitude > 0:
            raise ValueError(f"magnitude (MAG) must be > 0, got {magnitude}")
        if seq_len is None:
            raise ValueError("magnitude needs seq_len to derive u_bound = magnitude ** (1 / seq_len)")
        return float(magnitude) ** (1.0 / check_positive_int("seq_len", seq_len))

    def reset_parameters(self) -> None:
        # Input weights: the default of nn.Linear (Kaiming uniform), biases zero as in the paper.
        nn.init.kaiming_uniform_(self.weight_ih, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.recurrent_init == "uniform01":
            nn.init.uniform_(self.weight_hh, 0.0, 1.0)
        elif self.recurrent_init == "uniform_bound":
            nn.init.uniform_(self.weight_hh, 0.0, self.u_bound)
        else:
            nn.init.uniform_(self.weight_hh, 1.0 / self.u_bound, self.u_bound)
        self.apply_constraints()

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Clamp u into [-u_bound, u_bound] (call after each optimizer step)."""
        if self.u_bound is not None:
            self.weight_hh.clamp_(-self.u_bound, self.u_bound)

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "IndRNN")
        steps, batch = x.shape[0], x.shape[1]
        if hx is None:
            h0 = x.new_zeros(batch, self.hidden_size)
        else:
            h0 = hx.unsqueeze(1) if unbatched else hx
            if h0.shape != (1, batch, self.hidden_size):
                raise ValueError(f"IndRNN hx must have shape (1, {batch}, {self.hidden_size}), got {tuple(hx.shape)}")
            h0 = h0[0]
        # One matmul for all steps; only the elementwise recurrence remains sequential.
        z = nn.functional.linear(x, self.weight_ih, self.bias)
        output = indrnn_recurrence(z, self.weight_hh, h0, self.nonlinearity, self.backend)
        h_n = output[-1].unsqueeze(0)
        if unbatched:
            h_n = h_n.squeeze(1)
        return from_time_major(output, self.batch_first, unbatched), h_n

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, nonlinearity={self.nonlinearity}, "
                f"u_bound={self.u_bound}, recurrent_init={self.recurrent_init}, batch_first={self.batch_first}")
