"""Diagonal recurrent layers as RTRL sees them: one form for IndRNN and the diagonal leaky unit.

Both layers RTRL handles exactly are cases of one per-unit recurrence,

    a_t = W x_t + b + u * h_{t-1},      h_t = alpha * h_{t-1} + (1 - alpha) * f(a_t)

* IndRNN (:class:`src.layers.IndRNN`, ``projection="linear"``, no batch norm): alpha = 0, W and b
  are ``projection.weight`` / ``projection.bias``, u is ``recurrence.weight_hh``;
* the diagonal leaky unit (:class:`src.layers.DiagonalLeakyRNN`): the leaky integrator of
  :class:`src.layers.LeakyRNN` with a diagonal recurrent matrix u (or none, ``recurrent=False``:
  h_t = alpha h_{t-1} + (1 - alpha) f(W x_t + b)), per-unit leak rates alpha fixed or learned as
  sigmoid(alpha_logit).

:func:`diagonal_cell` reads a layer into a :class:`DiagonalCell` (views of the layer's own
parameters, so gradients land on them); :func:`cell_scan` runs the recurrence over a chunk without
autograd and returns what the sensitivity update needs (:func:`cell_terms`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from src.activations import activate
from src.kernels import indrnn_recurrence
from src.layers.diagonal_leaky import DiagonalLeakyRNN
from src.layers.indrnn import IndRNN

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
