"""Independently recurrent neural network (Li et al., CVPR 2018; "Deep IndRNN", 2019).

The papers' official code builds an "IndRNN layer" from an input projection (a fully connected
map applied at every step) followed by a recurrence-only module h_t = act(x_t + u * h_{t-1}),
with batch normalisation before or after the recurrence. :class:`IndRNNRecurrence` is that
recurrence; :class:`IndRNN` is the whole layer.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from src.kernels import ACTIVATIONS, BACKENDS, indrnn_linear_recurrence, indrnn_recurrence
from src.kernels.reference import check_grad_clip
from src.layers.batch_norm import TimeBatchNorm
from src.layers.common import apply_constraints, check_positive_int, from_time_major, to_time_major

RECURRENT_INITS = ("uniform_bound", "uniform01", "long_memory")
PROJECTIONS = ("linear", "conv1d", "none")
INPUT_INITS = ("uniform", "kaiming_a8", "normal")
BATCH_NORMS = ("none", "before", "after")


def resolve_u_bound(u_bound: float | None, magnitude: float | None, seq_len: int | None) -> float | None:
    """|u| bound: ``u_bound`` if given, else ``magnitude ** (1 / seq_len)`` (the paper's MAG^(1/T))."""
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


class IndRNNRecurrence(nn.Module):
    r"""The recurrence alone: :math:`h_t = \mathrm{act}(x_t + u \odot h_{t-1})`, x already projected.

    Args:
        hidden_size: H.
        nonlinearity: "relu", "tanh" or "identity".
        u_bound: bound on |u|, or None for none (see :func:`resolve_u_bound`).
        recurrent_init: "uniform_bound" U(0, u_bound), "uniform01" U(0, 1) (clamped into the
            bound), or "long_memory" U(1/u_bound, u_bound), the papers' last-layer initialisation.
        backend: recurrence kernel, see :mod:`src.kernels`.
        grad_clip: None, or c > 0: in the backward pass, clamp the gradient with respect to each
            pre-activation x_t + u * h_{t-1} to [-c, c] at every step before it flows on to
            h_{t-1}, u and x (the official Theano code's per-step clipping, Lasagne's grad_clipping).

    Shapes: x (T, B, H), h0 (B, H) -> (T, B, H).
    """

    def __init__(self, hidden_size: int, nonlinearity: str = "relu", u_bound: float | None = None,
                 recurrent_init: str | None = None, backend: str = "auto", grad_clip: float | None = None) -> None:
        super().__init__()
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        if nonlinearity not in ACTIVATIONS:
            raise ValueError(f"unknown IndRNN nonlinearity {nonlinearity!r}; choose one of {ACTIVATIONS}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown IndRNN backend {backend!r}; choose one of {BACKENDS}")
        recurrent_init = recurrent_init or ("uniform_bound" if u_bound is not None else "uniform01")
        if recurrent_init not in RECURRENT_INITS:
            raise ValueError(f"unknown recurrent_init {recurrent_init!r}; choose one of {RECURRENT_INITS}")
        if recurrent_init != "uniform01" and u_bound is None:
            raise ValueError(f"recurrent_init={recurrent_init!r} needs u_bound, or magnitude and seq_len")
        self.nonlinearity, self.u_bound, self.recurrent_init, self.backend = (
            nonlinearity, u_bound, recurrent_init, backend)
        self.grad_clip = check_grad_clip(grad_clip)
        self.weight_hh = nn.Parameter(torch.empty(hidden_size))  # u: one recurrent weight per unit
        self.reset_parameters()

    def reset_parameters(self) -> None:
        low, high = {"uniform01": (0.0, 1.0), "uniform_bound": (0.0, self.u_bound),
                     "long_memory": (1.0 / (self.u_bound or 1.0), self.u_bound)}[self.recurrent_init]
        nn.init.uniform_(self.weight_hh, low, high)
        self.constrain_parameters_()

    @torch.no_grad()
    def constrain_parameters_(self) -> None:
        if self.u_bound is not None:
            self.weight_hh.clamp_(-self.u_bound, self.u_bound)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        return indrnn_recurrence(x, self.weight_hh, h0, self.nonlinearity, self.backend, self.grad_clip)

    def extra_repr(self) -> str:
        clip = f", grad_clip={self.grad_clip}" if self.grad_clip is not None else ""
        return f"{self.hidden_size}, {self.nonlinearity}, u_bound={self.u_bound}, init={self.recurrent_init}{clip}"


class IndRNN(nn.Module):
    r"""One IndRNN layer: projection -> [BN] -> :math:`h_t = \mathrm{act}(z_t + u \odot h_{t-1})` -> [BN].

    Gradients through time scale like u^T, so |u| is kept within ``u_bound`` (the paper's
    MAG^(1/T)): call :meth:`apply_constraints` after every optimizer step (the LightningModules do).

    Args:
        input_size: features per input step, I.
        hidden_size: units, H.
        nonlinearity: "relu" (paper), "tanh" or "identity".
        bias: bias of the projection.
        batch_first: inputs/outputs are (B, T, *) instead of (T, B, *).
        u_bound: fixed bound on |u| (e.g. 0.99 for language modelling); overrides magnitude.
        magnitude: MAG, the gradient growth allowed over seq_len steps (papers: 2 adding, 5 MNIST/NTU).
        seq_len: T in u_bound = MAG^(1/T).
        recurrent_init: see :class:`IndRNNRecurrence` (default U(0, u_bound)).
        projection: "linear" (the papers' FC, default), "conv1d" (causal convolution over time, the
            papers' convolutional variant) or "none" (input used as is; needs I == H).
        kernel_size: width of the "conv1d" projection.
        input_init: "uniform" (torch.nn.Linear's default), "kaiming_a8" (official PyTorch code) or
            "normal" with std ``input_init_std`` (official adding-problem code: 0.001).
        batch_norm: "none", "before" the recurrence (on the projection) or "after" it.
        batch_norm_stats: "all_steps" (classification) or "per_step" (language modelling; uses seq_len).
        bidirectional: add a second layer reading the sequence backwards; outputs are concatenated.
        backend: recurrence kernel ("auto" picks the fused one), see :mod:`src.kernels`.
        grad_clip: None (default), or c > 0: per-step recurrent gradient clipping, see
            :class:`IndRNNRecurrence` (official Theano recipes: 10).

    Shapes:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched.
        hx: (D, B, H) initial state, D = 2 if bidirectional else 1 (zeros when None); (D, H) unbatched.
        output: (T, B, D*H) (or (B, T, D*H)); h_n: (D, B, H), the state after each direction's last step.
    """

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "relu", bias: bool = True,
                 batch_first: bool = False, u_bound: float | None = None, magnitude: float | None = None,
                 seq_len: int | None = None, recurrent_init: str | None = None, projection: str = "linear",
                 kernel_size: int = 3, input_init: str = "uniform", input_init_std: float = 0.001,
                 batch_norm: str = "none", batch_norm_stats: str = "all_steps", bidirectional: bool = False,
                 backend: str = "auto", grad_clip: float | None = None) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        for name, value, allowed in (("projection", projection, PROJECTIONS), ("input_init", input_init, INPUT_INITS),
                                     ("batch_norm", batch_norm, BATCH_NORMS)):
            if value not in allowed:
                raise ValueError(f"unknown IndRNN {name} {value!r}; choose one of {allowed}")
        if projection == "none" and input_size != hidden_size:
            raise ValueError(f"projection='none' needs input_size == hidden_size, got {input_size} and {hidden_size}")
        self.batch_first, self.bidirectional = batch_first, bidirectional
        self.input_init, self.input_init_std = input_init, input_init_std
        self.u_bound = resolve_u_bound(u_bound, magnitude, seq_len)
        if projection == "linear":
            self.projection = nn.Linear(input_size, hidden_size, bias=bias)
        elif projection == "conv1d":
            self.projection = nn.Conv1d(input_size, hidden_size, check_positive_int("kernel_size", kernel_size), bias=bias)
        else:
            self.projection = None
        norm = lambda: TimeBatchNorm(hidden_size, batch_norm_stats, seq_len)  # noqa: E731
        self.norm_before = norm() if batch_norm == "before" else None
        self.recurrence = IndRNNRecurrence(hidden_size, nonlinearity, self.u_bound, recurrent_init, backend, grad_clip)
        self.norm_after = norm() if batch_norm == "after" else None
        self.reverse = None
        if bidirectional:  # an independent layer for the backward direction
            arguments = dict(locals())
            self.reverse = IndRNN(**{k: arguments[k] for k in _INIT_ARGUMENTS}, bidirectional=False)
        self._reset_projection()

    def _reset_projection(self) -> None:
        if self.projection is None:
            return
        if self.input_init == "normal":
            nn.init.normal_(self.projection.weight, 0.0, self.input_init_std)
        elif self.input_init == "kaiming_a8":
            nn.init.kaiming_uniform_(self.projection.weight, a=8, mode="fan_in")
        else:
            nn.init.kaiming_uniform_(self.projection.weight, a=math.sqrt(5))
        if self.projection.bias is not None:
            nn.init.zeros_(self.projection.bias)  # the papers start biases at zero

    def apply_constraints(self) -> None:
        """Clamp u into [-u_bound, u_bound] (call after each optimizer step)."""
        apply_constraints(self)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.projection, nn.Conv1d):
            # Causal: pad the past only, so step t sees steps t-k+1..t.
            series = F.pad(x.permute(1, 2, 0), (self.projection.kernel_size[0] - 1, 0))
            return self.projection(series).permute(2, 0, 1)
        return x if self.projection is None else self.projection(x)

    def _one_direction(self, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        if isinstance(self.projection, nn.Linear) and self.norm_before is None:
            # Projection and recurrence together: one fused kernel where that is faster (few inputs on CPU).
            recurrence = self.recurrence
            h = indrnn_linear_recurrence(x, self.projection.weight, self.projection.bias, recurrence.weight_hh, h0,
                                         recurrence.nonlinearity, recurrence.backend, recurrence.grad_clip)
        else:
            z = self._project(x)
            h = self.recurrence(self.norm_before(z) if self.norm_before is not None else z, h0)
        return self.norm_after(h) if self.norm_after is not None else h

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "IndRNN")
        directions, batch = (2 if self.bidirectional else 1), x.shape[1]
        if hx is None:
            h0 = x.new_zeros(directions, batch, self.hidden_size)
        else:
            h0 = hx.unsqueeze(1) if unbatched else hx
            if h0.shape != (directions, batch, self.hidden_size):
                raise ValueError(f"IndRNN hx must have shape ({directions}, {batch}, {self.hidden_size}), "
                                 f"got {tuple(hx.shape)}")
        output = self._one_direction(x, h0[0])
        h_n = [output[-1]]
        if self.reverse is not None:
            backward = self.reverse._one_direction(x.flip(0), h0[1])
            h_n.append(backward[-1])
            output = torch.cat([output, backward.flip(0)], dim=2)
        h_n = torch.stack(h_n)
        return from_time_major(output, self.batch_first, unbatched), (h_n.squeeze(1) if unbatched else h_n)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, batch_first={self.batch_first}, bidirectional={self.bidirectional}"


_INIT_ARGUMENTS = ("input_size", "hidden_size", "nonlinearity", "bias", "batch_first", "u_bound", "magnitude",
                   "seq_len", "recurrent_init", "projection", "kernel_size", "input_init", "input_init_std",
                   "batch_norm", "batch_norm_stats", "backend", "grad_clip")
