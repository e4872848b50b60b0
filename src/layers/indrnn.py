"""Independently recurrent neural network (Li et al., CVPR 2018; "Deep IndRNN", 2019).

The papers' official code builds an "IndRNN layer" from an input projection (a fully connected
map applied at every step) followed by a recurrence-only module h_t = act(x_t + u * h_{t-1}),
with batch normalisation before or after the recurrence. :class:`IndRNNRecurrence` is that
recurrence; :class:`IndRNN` is the whole layer.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from src.kernels import ACTIVATIONS, BACKENDS, indrnn_linear_recurrence, indrnn_recurrence
from src.kernels.reference import check_grad_clip
from src.layers.batch_norm import TimeBatchNorm
from src.checks import check_choice, check_positive_int
from src.layers.common import (apply_constraints, batched_state, check_state_tensor, from_time_major, to_time_major,
                               unbatched_state)
from src.state import check_step

RECURRENT_INITS = ("uniform_bound", "uniform01", "long_memory")
PROJECTIONS = ("linear", "conv1d", "none")
INPUT_INITS = ("uniform", "kaiming_a8", "normal")
BATCH_NORMS = ("none", "before", "after")


def resolve_u_bound(u_bound: float | None, magnitude: float | None, bound_steps: int | None) -> float | None:
    """|u| bound: ``u_bound`` if given, else ``magnitude ** (1 / bound_steps)`` (the paper's MAG^(1/T))."""
    if u_bound is not None:
        if not u_bound > 0:
            raise ValueError(f"u_bound must be > 0, got {u_bound}")
        return float(u_bound)
    if magnitude is None:
        return None
    if not magnitude > 0:
        raise ValueError(f"magnitude (MAG) must be > 0, got {magnitude}")
    if bound_steps is None:
        raise ValueError("magnitude needs bound_steps to derive u_bound = magnitude ** (1 / bound_steps)")
    return float(magnitude) ** (1.0 / check_positive_int("bound_steps", bound_steps))


class IndRNNRecurrence(nn.Module):
    r"""The recurrence alone: :math:`h_t = \mathrm{act}(x_t + u \odot h_{t-1})`, x already projected.

    Args:
        hidden_size: H.
        nonlinearity: "relu", "tanh" or "identity".
        u_bound: bound on |u|, or None for none (see :func:`resolve_u_bound`).
        recurrent_init: "uniform_bound" U(0, u_bound), "uniform01" U(0, 1) (clamped into the
            bound), or "long_memory" U(1/u_bound, u_bound), the papers' last-layer initialisation.
        backend: recurrence kernel, see :mod:`src.kernels`: "auto" (the fused kernel for the device; on
            CPU the scan for long single streams), "scan" (the clamp-affine scan, parallel over time;
            relu and identity, tanh warns and runs step by step), "cpu", "triton", "reference", ...
        grad_clip: None, or c > 0: in the backward pass, clamp the gradient with respect to each
            pre-activation x_t + u * h_{t-1} to [-c, c] at every step before it flows on to
            h_{t-1}, u and x (the official Theano code's per-step clipping, Lasagne's grad_clipping).

    Shapes: x (T, B, H), h0 (B, H) -> (T, B, H).
    """

    def __init__(self, hidden_size: int, nonlinearity: str = "relu", u_bound: float | None = None,
                 recurrent_init: str | None = None, backend: str = "auto", grad_clip: float | None = None) -> None:
        super().__init__()
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        check_choice("IndRNN nonlinearity", nonlinearity, ACTIVATIONS)
        check_choice("IndRNN backend", backend, BACKENDS)
        recurrent_init = recurrent_init or ("uniform_bound" if u_bound is not None else "uniform01")
        check_choice("recurrent_init", recurrent_init, RECURRENT_INITS)
        if recurrent_init != "uniform01" and u_bound is None:
            raise ValueError(f"recurrent_init={recurrent_init!r} needs u_bound, or magnitude and bound_steps")
        self.nonlinearity, self.u_bound, self.recurrent_init, self.backend = (
            nonlinearity, u_bound, recurrent_init, backend)
        self.grad_clip = check_grad_clip(grad_clip)
        self.weight_hh = nn.Parameter(torch.empty(hidden_size))  # u: one recurrent weight per unit
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.u_bound or 1.0
        # long_memory: U(1/b, b). For b < 1 (e.g. language modelling's 0.99) that range is empty; every unit
        # then starts at the bound, the longest memory it allows.
        low, high = {"uniform01": (0.0, 1.0), "uniform_bound": (0.0, self.u_bound),
                     "long_memory": (min(1.0 / bound, bound), max(1.0 / bound, bound))}[self.recurrent_init]
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


class IndRNNState(NamedTuple):
    """The whole state of an :class:`IndRNN` layer that needs more than h (see :attr:`IndRNN.carries_more`).

    Attributes:
        h: (1, B, H) the recurrent state h_{t-1} (before batch norm "after", never its output).
        inputs: (k - 1, B, I) the last k - 1 inputs, oldest first, for the causal ``conv1d``
            projection of width k (zeros before the first step); None for other projections.
        step: the absolute step number of the next input (per-step batch norm's row): an int shared by
            every stream, or a (B,) int64 tensor once streams restarted at different times
            (:func:`src.state.reset_streams`).
    """

    h: torch.Tensor
    inputs: torch.Tensor | None
    step: int | torch.Tensor


class IndRNN(nn.Module):
    r"""One IndRNN layer: projection -> [BN] -> :math:`h_t = \mathrm{act}(z_t + u \odot h_{t-1})` -> [BN].

    Gradients through time scale like u^T, so |u| is kept within ``u_bound`` (the paper's
    MAG^(1/T)): call :meth:`apply_constraints` after every optimizer step (the LightningModules do).
    For a bidirectional IndRNN wrap it in :class:`src.layers.bidirectional.Bidirectional` (the
    networks do so for ``bidirectional=True``, also when it is given to the layer factory).

    Args:
        input_size: features per input step, I.
        hidden_size: units, H.
        nonlinearity: "relu" (paper), "tanh" or "identity".
        bias: bias of the projection.
        batch_first: inputs/outputs are (B, T, *) instead of (T, B, *).
        u_bound: fixed bound on |u| (e.g. 0.99 for language modelling); overrides magnitude.
        magnitude: MAG, the gradient growth allowed over bound_steps steps (papers: 2 adding, 5 MNIST/NTU).
        bound_steps: T in u_bound = MAG^(1/T), and the steps with their own statistics for per-step BN.
        recurrent_init: see :class:`IndRNNRecurrence` (default U(0, u_bound)).
        projection: "linear" (the papers' FC, default), "conv1d" (causal convolution over time, the
            papers' convolutional variant) or "none" (input used as is; needs I == H).
        kernel_size: width k of the "conv1d" projection.
        input_init: "uniform" (torch.nn.Linear's default), "kaiming_a8" (official PyTorch code) or
            "normal" with std ``input_init_std`` (official adding-problem code: 0.001).
        batch_norm: "none", "before" the recurrence (on the projection) or "after" it.
        batch_norm_stats: "all_steps" (classification), "per_step" (language modelling: the absolute step;
            needs bound_steps) or "per_window" (the position in the current window, as the CVPR char-PTB code;
            the state then carries h only).
        backend: recurrence kernel ("auto" picks the fused one; "scan" runs parallel over time), see
            :class:`IndRNNRecurrence` and :mod:`src.kernels`.
        grad_clip: None (default), or c > 0: per-step recurrent gradient clipping, see
            :class:`IndRNNRecurrence` (official Theano recipes: 10).

    State: a tensor h (1, B, H) like torch.nn.RNN's, or, when the layer needs more to continue a
    sequence (``conv1d`` projection, per-step batch norm: :attr:`carries_more`), an
    :class:`IndRNNState` (h, inputs, step). Either is accepted as ``state``; None = zeros at step 0.

    Shapes:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched (states then without B).
        output: (T, B, H) (or (B, T, H)), after batch norm "after" if any.
        state returned: as above, after the last step; h is the recurrent state (pre-BN).
    """

    bidirectional = False  # one direction: Bidirectional wraps any layer

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "relu", bias: bool = True,
                 batch_first: bool = False, u_bound: float | None = None, magnitude: float | None = None,
                 bound_steps: int | None = None, recurrent_init: str | None = None, projection: str = "linear",
                 kernel_size: int = 3, input_init: str = "uniform", input_init_std: float = 0.001,
                 batch_norm: str = "none", batch_norm_stats: str = "all_steps",
                 backend: str = "auto", grad_clip: float | None = None) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        check_choice("IndRNN projection", projection, PROJECTIONS)
        check_choice("IndRNN input_init", input_init, INPUT_INITS)
        check_choice("IndRNN batch_norm", batch_norm, BATCH_NORMS)
        if projection == "none" and input_size != hidden_size:
            raise ValueError(f"projection='none' needs input_size == hidden_size, got {input_size} and {hidden_size}")
        self.batch_first = batch_first
        self.input_init, self.input_init_std = input_init, input_init_std
        self.u_bound = resolve_u_bound(u_bound, magnitude, bound_steps)
        if projection == "linear":
            self.projection = nn.Linear(input_size, hidden_size, bias=bias)
        elif projection == "conv1d":
            self.projection = nn.Conv1d(input_size, hidden_size, check_positive_int("kernel_size", kernel_size), bias=bias)
        else:
            self.projection = None
        if batch_norm != "none" and batch_norm_stats == "per_step" and bound_steps is None:
            raise ValueError("batch_norm_stats='per_step' needs bound_steps (the steps with their own statistics), "
                             "got None")
        norm = lambda: TimeBatchNorm(hidden_size, batch_norm_stats, bound_steps)  # noqa: E731
        self.norm_before = norm() if batch_norm == "before" else None
        self.recurrence = IndRNNRecurrence(hidden_size, nonlinearity, self.u_bound, recurrent_init, backend, grad_clip)
        self.norm_after = norm() if batch_norm == "after" else None
        self._reset_projection()

    @property
    def window(self) -> int:
        """Past inputs the projection needs besides the current one: k - 1 for ``conv1d``, else 0."""
        return self.projection.kernel_size[0] - 1 if isinstance(self.projection, nn.Conv1d) else 0

    @property
    def carries_more(self) -> bool:
        """True when the state is an :class:`IndRNNState` (conv1d inputs or a per-step BN step), not just h."""
        per_step = any(norm is not None and norm.stats == "per_step" for norm in (self.norm_before, self.norm_after))
        return isinstance(self.projection, nn.Conv1d) or per_step

    def initial_state(self, batch_size: int, like: torch.Tensor | None = None):
        """The state before the first step for ``batch_size`` sequences: zeros, step 0 (dtype/device of ``like``)."""
        like = self.recurrence.weight_hh if like is None else like
        h = like.new_zeros(1, batch_size, self.hidden_size)
        if not self.carries_more:
            return h
        conv = isinstance(self.projection, nn.Conv1d)
        inputs = like.new_zeros(self.window, batch_size, self.input_size) if conv else None
        return IndRNNState(h, inputs, 0)

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

    def _unpack(self, state, x: torch.Tensor) -> IndRNNState:
        """Any accepted ``state`` as a full :class:`IndRNNState` for a time-major batch ``x`` (T, B, I)."""
        batch = x.shape[1]
        if state is None:
            return IndRNNState(x.new_zeros(1, batch, self.hidden_size),
                               x.new_zeros(self.window, batch, self.input_size), 0)
        if isinstance(state, torch.Tensor):  # torch.nn.RNN's hx: h only, zero past inputs, step 0
            state = IndRNNState(state, None, 0)
        elif not isinstance(state, tuple) or len(state) != 3:
            raise ValueError(f"IndRNN state must be a tensor (1, {batch}, {self.hidden_size}) or an "
                             f"IndRNNState(h, inputs, step), got {type(state).__name__}")
        h, inputs, step = state
        check_state_tensor(h, (1, batch, self.hidden_size), "IndRNN", "hx")
        if inputs is None:
            inputs = x.new_zeros(self.window, batch, self.input_size)
        check_state_tensor(inputs, (self.window, batch, self.input_size), "IndRNN", "state.inputs")
        return IndRNNState(h, inputs, check_step(step, batch, "IndRNN state.step"))

    def _project(self, x: torch.Tensor, past_inputs: torch.Tensor) -> torch.Tensor:
        if isinstance(self.projection, nn.Conv1d):
            # Causal: step t sees steps t-k+1..t, the first k-1 of them carried from the previous chunk.
            series = torch.cat([past_inputs, x]).permute(1, 2, 0)  # (B, I, k - 1 + T)
            return self.projection(series).permute(2, 0, 1)
        return x if self.projection is None else self.projection(x)

    def forward(self, input: torch.Tensor, state=None):
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "IndRNN",
                                     dtype=self.recurrence.weight_hh.dtype)
        h0, past_inputs, step = self._unpack(batched_state(state, unbatched), x)
        recurrence = self.recurrence
        if isinstance(self.projection, nn.Linear) and self.norm_before is None:
            # Projection and recurrence together: one fused kernel where that is faster (few inputs on CPU).
            h = indrnn_linear_recurrence(x, self.projection.weight, self.projection.bias, recurrence.weight_hh, h0[0],
                                         recurrence.nonlinearity, recurrence.backend, recurrence.grad_clip)
        else:
            z = self._project(x, past_inputs)
            h = recurrence(self.norm_before(z, step) if self.norm_before is not None else z, h0[0])
        output = self.norm_after(h, step) if self.norm_after is not None else h
        h_n = h[-1:]  # the recurrent state, never the normalised output
        if self.carries_more:
            history = torch.cat([past_inputs, x])
            inputs = history[history.shape[0] - self.window:] if isinstance(self.projection, nn.Conv1d) else None
            new_state = IndRNNState(h_n, inputs, step + x.shape[0])
        else:
            new_state = h_n
        return from_time_major(output, self.batch_first, unbatched), unbatched_state(new_state, unbatched)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, batch_first={self.batch_first}"
