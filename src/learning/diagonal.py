"""Diagonal recurrent layers as RTRL sees them: one form for IndRNN and the diagonal leaky unit.

Both layers RTRL handles exactly are cases of one per-unit recurrence,

    a_t = W x_t + b + u * h_{t-1},      h_t = alpha * h_{t-1} + (1 - alpha) * f(a_t)

* IndRNN (:class:`src.layers.IndRNN`, ``projection="linear"``, no batch norm): alpha = 0, W and b
  are ``projection.weight`` / ``projection.bias``, u is ``recurrence.weight_hh``;
* the diagonal leaky unit (:class:`DiagonalLeakyRNN` below): the leaky integrator of
  :class:`src.layers.LeakyRNN` with a diagonal recurrent matrix u (or none, ``recurrent=False``:
  h_t = alpha h_{t-1} + (1 - alpha) f(W x_t + b)), per-unit leak rates alpha fixed or learned as
  sigmoid(alpha_logit).

:func:`diagonal_cell` reads a layer into a :class:`DiagonalCell` (views of the layer's own
parameters, so gradients land on them); :func:`cell_scan` runs the recurrence over a chunk without
autograd and returns what the sensitivity update needs (:func:`cell_terms`).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from src.activations import activate
from src.checks import check_choice, check_positive_int
from src.kernels import indrnn_recurrence
from src.layers.common import init_uniform_, initial_state, sequence_and_final_state, to_time_major
from src.layers.indrnn import IndRNN
from src.layers.leaky import ALPHA_MODES, LOGIT_BOUND

DIAGONAL_NONLINEARITIES = ("relu", "tanh", "identity")


class DiagonalLeakyRNN(nn.Module):
    r"""Leaky-integrator layer with a diagonal recurrence: the per-unit form RTRL trains exactly.

    :math:`h_t = \alpha \odot h_{t-1} + (1 - \alpha) \odot f(W x_t + b + u \odot h_{t-1})`, alpha per
    unit in (0, 1) (learned: sigmoid(alpha_logit), clamped like :class:`src.layers.LeakyRNN`'s).

    Args:
        input_size: I. hidden_size: H.
        nonlinearity: f, "tanh", "relu" or "identity".
        alpha_mode: "fixed" (buffer ``alpha_value``) or "learned" (parameter ``alpha_logit``).
        alpha_range: (low, high): each unit's alpha is drawn uniformly in it (learned: inside (0, 1)).
        recurrent: learn the diagonal recurrent weights u (``weight_hh`` (H,), initialised U(0, 1)
            clamped to ``u_bound``); False: no u, the pure leaky unit h_t = alpha h_{t-1} + (1 - alpha) f(W x_t + b).
        u_bound: |u| <= u_bound after every optimizer step (:meth:`constrain_parameters_`), or None.
        bias: learn b. batch_first: (B, T, *) layout.

    Parameters: ``weight_ih`` (H, I), ``bias`` (H,), ``weight_hh`` (H,), ``alpha_logit`` (H,) or the
    buffer ``alpha_value`` (H,).

    Shapes: input (T, B, I) ((B, T, I) with batch_first, (T, I) unbatched); state h (1, B, H) or
    None (zeros) -> output (T, B, H), state (1, B, H).
    """

    def __init__(self, input_size: int, hidden_size: int, nonlinearity: str = "tanh", alpha_mode: str = "fixed",
                 alpha_range: Sequence[float] = (0.0, 0.9), recurrent: bool = True, u_bound: float | None = 1.0,
                 bias: bool = True, batch_first: bool = False) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.nonlinearity = check_choice("DiagonalLeakyRNN nonlinearity", nonlinearity, DIAGONAL_NONLINEARITIES)
        self.alpha_mode = check_choice("DiagonalLeakyRNN alpha_mode", alpha_mode, ALPHA_MODES)
        low, high = (float(a) for a in alpha_range)
        strict = alpha_mode == "learned"
        if not (0 < low <= high < 1 if strict else 0 <= low <= high <= 1):
            allowed = "0 < low <= high < 1" if strict else "0 <= low <= high <= 1"
            raise ValueError(f"DiagonalLeakyRNN alpha_range must satisfy {allowed}, got {list(alpha_range)}")
        if u_bound is not None and not u_bound > 0:
            raise ValueError(f"DiagonalLeakyRNN u_bound must be > 0 or None, got {u_bound}")
        self.alpha_range, self.u_bound, self.batch_first = (low, high), u_bound, batch_first
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))
        self.bias = nn.Parameter(torch.empty(hidden_size)) if bias else None
        self.weight_hh = nn.Parameter(torch.empty(hidden_size)) if recurrent else None
        if strict:
            self.alpha_logit = nn.Parameter(torch.empty(hidden_size))
        else:
            self.register_buffer("alpha_value", torch.empty(hidden_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_uniform_((self.weight_ih, self.bias), self.hidden_size)
        if self.weight_hh is not None:
            self.weight_hh.uniform_(0.0, 1.0)
        alpha = torch.empty(self.hidden_size).uniform_(*self.alpha_range)
        if self.alpha_mode == "learned":
            self.alpha_logit.copy_(torch.logit(alpha))
        else:
            self.alpha_value.copy_(alpha)
        self.constrain_parameters_()

    @torch.no_grad()
    def constrain_parameters_(self) -> None:
        """Clamp |u| to u_bound and a learned alpha_logit to [-12, 12] (call after each optimizer step)."""
        if self.weight_hh is not None and self.u_bound is not None:
            self.weight_hh.clamp_(-self.u_bound, self.u_bound)
        if self.alpha_mode == "learned":
            self.alpha_logit.clamp_(-LOGIT_BOUND, LOGIT_BOUND)

    @property
    def alpha(self) -> torch.Tensor:
        """Leak rate per unit, shape (H,)."""
        return torch.sigmoid(self.alpha_logit) if self.alpha_mode == "learned" else self.alpha_value

    def forward(self, input: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "DiagonalLeakyRNN")
        h = initial_state(state, x.shape[1], self.hidden_size, unbatched, "DiagonalLeakyRNN", like=x)
        z = F.linear(x, self.weight_ih, self.bias)
        alpha, outputs = self.alpha, []
        for z_t in z.unbind(0):
            pre = z_t if self.weight_hh is None else z_t + self.weight_hh * h
            h = alpha * h + (1 - alpha) * activate(pre, self.nonlinearity)
            outputs.append(h)
        return sequence_and_final_state(torch.stack(outputs), self.batch_first, unbatched)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, {self.nonlinearity}, alpha_mode={self.alpha_mode!r}, "
                f"alpha_range={self.alpha_range}, recurrent={self.weight_hh is not None}, u_bound={self.u_bound}")


class DiagonalCell(NamedTuple):
    """One diagonal layer's parameters (the layer's own tensors) and form.

    Attributes:
        layer: the module (IndRNN or DiagonalLeakyRNN).
        weight: W (H, I). bias: b (H,) or None. recurrent: u (H,) or None.
        alpha_logit: learned leak logits (H,) or None. alpha_fixed: fixed leak rates (H,) or None
            (both None: IndRNN, alpha = 0).
        activation: f. backend: the IndRNN recurrence backend for the forward scan, or None.
    """

    layer: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    recurrent: torch.Tensor | None
    alpha_logit: torch.Tensor | None
    alpha_fixed: torch.Tensor | None
    activation: str
    backend: str | None

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[0]

    @property
    def input_size(self) -> int:
        return self.weight.shape[1]

    def diagonal_parameters(self) -> list[torch.Tensor]:
        """The per-unit parameters, in the order of the sensitivity rows: bias, u, alpha_logit (where present)."""
        return [p for p in (self.bias, self.recurrent, self.alpha_logit) if p is not None]

    def alpha(self) -> torch.Tensor | None:
        if self.alpha_logit is not None:
            return torch.sigmoid(self.alpha_logit)
        return self.alpha_fixed


def diagonal_cell(layer: nn.Module, index: int = 0) -> DiagonalCell:
    """``layer`` as a :class:`DiagonalCell`; a one-line ValueError for a layer RTRL cannot handle exactly."""
    where = f"RTRL: layer {index} ({type(layer).__name__})"
    if isinstance(layer, DiagonalLeakyRNN):
        return DiagonalCell(layer, layer.weight_ih, layer.bias, layer.weight_hh,
                            layer.alpha_logit if layer.alpha_mode == "learned" else None,
                            layer.alpha_value if layer.alpha_mode == "fixed" else None, layer.nonlinearity, None)
    if not isinstance(layer, IndRNN):
        raise ValueError(f"{where}: RTRL handles diagonal recurrences only: src.layers.IndRNN or "
                         f"src.learning.DiagonalLeakyRNN")
    if not isinstance(layer.projection, nn.Linear):
        raise ValueError(f"{where}: needs projection='linear', got a {type(layer.projection).__name__} projection")
    if getattr(layer, "norm_before", None) is not None or getattr(layer, "norm_after", None) is not None:
        raise ValueError(f"{where}: needs batch_norm='none' (batch statistics couple the samples of a batch)")
    if getattr(layer, "bidirectional", False) or getattr(layer, "reverse", None) is not None:
        raise ValueError(f"{where}: a bidirectional layer reads the future; RTRL runs forward in time only")
    recurrence = layer.recurrence
    if getattr(recurrence, "grad_clip", None) is not None:
        raise ValueError(f"{where}: grad_clip={recurrence.grad_clip} clips the backward pass, which RTRL does not "
                         "run; use grad_clip=null")
    return DiagonalCell(layer, layer.projection.weight, layer.projection.bias, recurrence.weight_hh, None, None,
                        recurrence.nonlinearity, recurrence.backend)


def _derivative(activated: torch.Tensor, activation: str) -> torch.Tensor:
    """f'(a) from f(a): relu [f > 0] (0 at a = 0, as autograd), tanh 1 - f^2, identity 1."""
    if activation == "relu":
        return (activated > 0).to(activated.dtype)
    if activation == "tanh":
        return 1 - activated * activated
    return torch.ones_like(activated)


@torch.no_grad()
def cell_scan(cell: DiagonalCell, inputs: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence over a chunk without autograd.

    Args:
        cell: the layer. inputs: x, shape (K, B, I). h0: h_{-1}, shape (B, H).

    Returns:
        (h (K, B, H), f(a) (K, B, H)); for IndRNN the two are the same tensor.
    """
    z = F.linear(inputs, cell.weight, cell.bias)
    alpha = cell.alpha()
    if alpha is None:  # IndRNN: the project's fused recurrence
        h = indrnn_recurrence(z, cell.recurrent, h0, cell.activation, cell.backend)
        return h, h
    states, activated = torch.empty_like(z), torch.empty_like(z)
    h = h0
    for t in range(z.shape[0]):
        pre = z[t] if cell.recurrent is None else z[t] + cell.recurrent * h
        activated[t] = activate(pre, cell.activation)
        h = states[t] = alpha * h + (1 - alpha) * activated[t]
    return states, activated


class CellTerms(NamedTuple):
    """The per-step coefficients of the sensitivity update (see :mod:`src.kernels.rtrl`), each (K, B, H)
    except ``direct`` (P, K, B, H), one row per :meth:`DiagonalCell.diagonal_parameters` entry."""

    carry: torch.Tensor
    gain: torch.Tensor
    direct: torch.Tensor


@torch.no_grad()
def cell_terms(cell: DiagonalCell, states: torch.Tensor, activated: torch.Tensor, h0: torch.Tensor) -> CellTerms:
    """c_t = dh_t/dh_{t-1}, e_t = dh_t/da_t and the direct derivatives d_t[p] over a chunk.

    Args:
        states: h (K, B, H) and activated: f(a) (K, B, H) from :func:`cell_scan`; h0: h_{-1} (B, H).
    """
    previous = torch.cat([h0.unsqueeze(0), states[:-1]])
    gain = _derivative(activated, cell.activation)
    alpha = cell.alpha()
    if alpha is not None:
        gain = gain * (1 - alpha)
    carry = gain * cell.recurrent if cell.recurrent is not None else torch.zeros_like(gain)
    if alpha is not None:
        carry = carry + alpha
    direct = []
    if cell.bias is not None:
        direct.append(gain)
    if cell.recurrent is not None:
        direct.append(gain * previous)
    if cell.alpha_logit is not None:  # d alpha / d logit = alpha (1 - alpha)
        direct.append(alpha * (1 - alpha) * (previous - activated))
    direct = torch.stack(direct) if direct else gain.new_zeros((0,) + gain.shape)
    return CellTerms(carry.contiguous(), gain.contiguous(), direct.contiguous())


def step_graph(cell: DiagonalCell, inputs: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """h_t recomputed with autograd from x_t and a constant h_{t-1}, for every step of a chunk at once.

    The graph links each layer's state to its input at the same step only (never to the past), so
    gradients through it are the within-step backpropagation of the layer-local RTRL variant.
    Shapes: inputs (K, B, I), previous (K, B, H) (detached) -> (K, B, H).
    """
    pre = F.linear(inputs, cell.weight, cell.bias)
    if cell.recurrent is not None:
        pre = pre + cell.recurrent.detach() * previous
    activated = activate(pre, cell.activation)
    alpha = cell.alpha()
    return activated if alpha is None else alpha.detach() * previous + (1 - alpha.detach()) * activated
