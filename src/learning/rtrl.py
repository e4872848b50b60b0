"""Real-time recurrent learning (RTRL) for stacks of diagonal recurrent layers: exact gradients
computed forward in time, with memory that does not grow with the sequence.

RTRL (Williams & Zipser 1989) carries dh_t/dtheta forward alongside h_t and turns the loss gradient
of each step into a parameter gradient at once, so no past state is ever stored and no window is
ever truncated. For a dense recurrence the sensitivities cost O(H^4) per step; for the diagonal
layers of :mod:`src.learning.diagonal` (IndRNN, the diagonal leaky unit) unit j of h_t depends on
row j of the parameters only, so a layer's own sensitivities are (P, B, H) for its per-unit
parameters and (B, H, I) for its input weights, updated at about the cost of the forward pass
(:mod:`src.kernels.rtrl`).

Modes, for a network ``net`` with ``net.layers`` (diagonal layers, stacked) and ``net.head`` (the
readout, applied to the top layer's state at every step):

* ``"exact"``: the gradient of the sum of the losses equals backpropagation through time over the
  whole sequence. One layer needs only its own sensitivities. In a stack, the state of layer l
  also depends on the parameters of every layer k < l below it, through its input at every past
  step; these cross-layer sensitivities dh^l/dtheta^k are dense, (B, H_l, P_k) with P_k the number
  of parameters of layer k (H_k I_k + a few H_k), updated each step as
  J^{l,k}_t = c^l_t * J^{l,k}_{t-1} + e^l_t * (W^l J^{l-1,k}_t): feasible for small widths only
  (B H_l H_k I_k values per pair of layers, and a matrix product per step).
* ``"layer_local"``: each layer keeps its own sensitivities only; the loss gradient of each
  layer's state is backpropagated through the layers above it within the same step. Paths where a
  lower layer's parameter changes an upper layer's state through the upper layer's own recurrence
  are dropped, so this is an APPROXIMATION in stacks (exact for one layer); its error against BPTT
  is measured in tests/test_rtrl.py (see the README's RTRL section for figures). It costs L times
  one layer.

Usage (one sequence in chunks; the gradient lands in the parameters' ``.grad``)::

    rtrl = RTRL(net, mode="exact")
    rtrl.reset(batch_size)                        # zero state, zero sensitivities
    for chunk in inputs.split(k, dim=1):          # (B, K, I) each
        loss, predictions = rtrl.accumulate(chunk, loss_fn)   # predictions (B, K, O)
        optimizer.step(); optimizer.zero_grad(); net.apply_constraints()   # optional, every k steps

``loss_fn(predictions (B, K, O)) -> scalar tensor or None`` gives the loss of those steps (None when
no loss arrives in the chunk). Without parameter updates inside a sequence, the gradients summed
over its chunks equal BPTT's for the sum of the chunk losses, whatever the chunk length; with
updates every k steps, the sensitivities carried past an update were computed with the previous
parameters (RTRL's usual online approximation), and nothing is truncated.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from src.checks import check_choice, check_positive_int
from src.kernels.rtrl import sensitivity_chunk
from src.learning.diagonal import DiagonalCell, cell_scan, cell_terms, diagonal_cell, step_graph
from src.state import check_restart, initial_state, merge_streams, reset_streams

RTRL_MODES = ("exact", "layer_local")

LossFunction = Callable[[torch.Tensor], "torch.Tensor | None"]


def _add_grad(parameter: torch.Tensor, value: torch.Tensor) -> None:
    value = value.to(parameter.dtype).reshape(parameter.shape)
    if parameter.grad is None:
        parameter.grad = value.clone()
    else:
        parameter.grad.add_(value)


class RTRL:
    """Online exact (or layer-local) gradients for ``net``: diagonal recurrent layers + a readout head.

    Args:
        net: a network with ``layers`` (an nn.ModuleList of :class:`src.layers.IndRNN` with
            ``projection="linear"`` and ``batch_norm="none"``, or :class:`src.layers.DiagonalLeakyRNN`)
            and ``head`` (any module mapping (B, K, H) to (B, K, O)), e.g.
            :class:`src.networks.RecurrentNetwork` without ``projection_size`` and with dropout 0.
            Every trainable parameter of ``net`` must belong to a layer or the head.
        mode: "exact" or "layer_local" (see the module docstring).
        backend: the sensitivity loop, see :data:`src.kernels.rtrl.SENSITIVITY_BACKENDS`.

    The carried state (hidden states and sensitivities) is created by :meth:`reset`; it has the
    dtype and device of the layers' parameters.
    """

    def __init__(self, net: nn.Module, mode: str = "exact", backend: str = "auto") -> None:
        self.mode = check_choice("RTRL mode", mode, RTRL_MODES)
        self.backend = backend
        layers, head = getattr(net, "layers", None), getattr(net, "head", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or not isinstance(head, nn.Module):
            raise ValueError(f"RTRL: the network must have `layers` (a ModuleList of diagonal layers) and a `head`, "
                             f"got {type(net).__name__}")
        if getattr(net, "projection", None) is not None:
            raise ValueError("RTRL: the network's input projection (model.projection_size) is not supported; "
                             "set projection_size=null (IndRNN layers project their inputs themselves)")
        dropout = getattr(getattr(net, "dropout", None), "p", 0.0)
        if dropout:
            raise ValueError(f"RTRL: dropout={dropout} draws one mask per whole sequence, which an online "
                             "learner never sees; use dropout=0")
        self.net, self.head = net, head
        self.cells: list[DiagonalCell] = [diagonal_cell(layer, index) for index, layer in enumerate(layers)]
        for index in range(1, len(self.cells)):
            if self.cells[index].input_size != self.cells[index - 1].hidden_size:
                raise ValueError(f"RTRL: layer {index} reads {self.cells[index].input_size} features, but layer "
                                 f"{index - 1} has {self.cells[index - 1].hidden_size} units")
        covered = {id(p) for cell in self.cells for p in [cell.weight, *cell.diagonal_parameters()]}
        covered |= {id(p) for p in head.parameters()}
        others = [name for name, p in net.named_parameters() if p.requires_grad and id(p) not in covered]
        if others:
            raise ValueError(f"RTRL: parameters outside the diagonal layers and the head are not supported: {others}")
        self.hidden: list[torch.Tensor] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.cells)

    def reset(self, batch_size: int, initial_states: Sequence[torch.Tensor | None] | None = None) -> None:
        """Start B new sequences: states from ``initial_states`` (one per layer, (B, H) or (1, B, H),
        None = zeros; constants, not trained) and zero sensitivities."""
        batch = check_positive_int("RTRL batch_size", batch_size)
        like = self.cells[0].weight
        factory = {"dtype": like.dtype, "device": like.device}
        initial_states = list(initial_states) if initial_states is not None else [None] * self.num_layers
        if len(initial_states) != self.num_layers:
            raise ValueError(f"RTRL: initial_states needs one state per layer ({self.num_layers}), "
                             f"got {len(initial_states)}")
        self.hidden = []
        for cell, state in zip(self.cells, initial_states):
            shape = (batch, cell.hidden_size)
            if state is None:
                self.hidden.append(initial_state(cell.layer, batch, like)[0])
            else:
                if state.numel() != batch * cell.hidden_size:
                    raise ValueError(f"RTRL: an initial state must have shape (1, {batch}, {cell.hidden_size}), "
                                     f"got {tuple(state.shape)}")
                self.hidden.append(state.detach().reshape(shape).to(**factory).clone())
        self.s_diag = [torch.zeros(len(c.diagonal_parameters()), batch, c.hidden_size, **factory) for c in self.cells]
        self.s_weight = [torch.zeros(batch, c.hidden_size, c.input_size, **factory) for c in self.cells]
        self.cross: dict[tuple[int, int], torch.Tensor] = {}
        if self.mode == "exact":
            for upper in range(1, self.num_layers):
                for lower in range(upper):
                    self.cross[upper, lower] = torch.zeros(batch, self.cells[upper].hidden_size,
                                                           self._flat_size(lower), **factory)

    def reset_streams(self, restart: torch.Tensor) -> None:
        """Restart the streams where ``restart`` (B,) bool is True: each layer's fresh state there (the state
        contract's :func:`src.state.reset_streams`) and zero sensitivities; the other streams go on unchanged.
        Chosen on the device, without a host synchronisation."""
        self._require_state()
        restart = check_restart(restart, self.hidden)
        self.hidden = [reset_streams(cell.layer, h.unsqueeze(0), restart)[0]  # the layer's state is (1, B, H)
                       for cell, h in zip(self.cells, self.hidden)]

        def zero_where_restarted(sensitivity: torch.Tensor, batch_dim: int) -> torch.Tensor:
            return merge_streams(restart, torch.zeros_like(sensitivity), sensitivity, batch_dim)

        self.s_diag = [zero_where_restarted(s, 1) for s in self.s_diag]          # (P, B, H)
        self.s_weight = [zero_where_restarted(s, 0) for s in self.s_weight]      # (B, H, I)
        self.cross = {key: zero_where_restarted(s, 0) for key, s in self.cross.items()}  # (B, H_l, P_k)

    def state(self) -> list[torch.Tensor]:
        """The current hidden state of each layer, (1, B, H) (the network's state format)."""
        self._require_state()
        return [h.unsqueeze(0).clone() for h in self.hidden]

    def _require_state(self) -> None:
        if self.hidden is None:
            raise RuntimeError("RTRL: call reset(batch_size) before the first chunk of a sequence")

    def _flat_size(self, index: int) -> int:
        cell = self.cells[index]
        return cell.hidden_size * (cell.input_size + len(cell.diagonal_parameters()))

    def accumulate(self, inputs: torch.Tensor, loss_fn: LossFunction) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Advance over the chunk ``inputs`` (B, K, I) and add the gradient of ``loss_fn``'s loss to ``.grad``.

        Returns (the loss, detached, or None; the predictions (B, K, O) of every step, detached).
        """
        self._require_state()
        batch = self.hidden[0].shape[0]
        if inputs.dim() != 3 or inputs.shape[0] != batch or inputs.shape[2] != self.cells[0].input_size:
            raise ValueError(f"RTRL: a chunk must have shape ({batch}, K, {self.cells[0].input_size}), "
                             f"got {tuple(inputs.shape)}")
        x = inputs.detach().transpose(0, 1).to(self.hidden[0].dtype).contiguous()
        layer_inputs, states, terms = [], [], []
        current = x
        for cell, h0 in zip(self.cells, self.hidden):
            h, activated = cell_scan(cell, current, h0)
            layer_inputs.append(current)
            states.append(h)
            terms.append(cell_terms(cell, h, activated, h0))
            current = h
        loss, predictions, state_grads = self._loss_gradients(x, states, loss_fn)
        if self.mode == "exact" and self.num_layers > 1:
            self._exact_stack(layer_inputs, terms, state_grads[-1])
        else:
            for index, cell in enumerate(self.cells):
                grad_diag = torch.zeros_like(self.s_diag[index][:, 0])
                grad_weight = torch.zeros_like(cell.weight, dtype=self.s_weight[index].dtype)
                sensitivity_chunk(terms[index].carry, terms[index].gain, layer_inputs[index], terms[index].direct,
                                  state_grads[index], self.s_diag[index], self.s_weight[index], grad_diag,
                                  grad_weight, self.backend)
                if state_grads[index] is not None:
                    self._add_layer_grads(index, grad_weight, grad_diag)
        self.hidden = [h[-1].clone() for h in states]
        return loss, predictions

    def _loss_gradients(self, x: torch.Tensor, states: list[torch.Tensor], loss_fn: LossFunction):
        """The chunk's loss, predictions and dloss/dh^l_t for each layer (None where not needed).

        Exact mode needs the top layer's only (the lower layers reach the loss through the
        cross-layer sensitivities); the layer-local mode backpropagates within each step.
        """
        head_parameters = [p for p in self.head.parameters() if p.requires_grad]
        with torch.enable_grad():
            if self.mode == "layer_local":
                wrt, current = [], x
                for cell, h0, h in zip(self.cells, self.hidden, states):
                    previous = torch.cat([h0.unsqueeze(0), h[:-1]])
                    current = step_graph(cell, current, previous)
                    wrt.append(current)
                top = wrt[-1]
            else:
                top = states[-1].detach().requires_grad_(True)
                wrt = [top]
            predictions = self.head(top.transpose(0, 1))
            loss = loss_fn(predictions)
        state_grads: list[torch.Tensor | None] = [None] * self.num_layers
        if loss is not None:
            grads = torch.autograd.grad(loss, wrt + head_parameters, allow_unused=True)
            for parameter, grad in zip(head_parameters, grads[len(wrt):]):
                if grad is not None:
                    _add_grad(parameter, grad)
            found = [g.contiguous() if g is not None else None for g in grads[:len(wrt)]]
            state_grads[self.num_layers - len(wrt):] = found
            loss = loss.detach()
        return loss, predictions.detach(), state_grads

    def _add_layer_grads(self, index: int, grad_weight: torch.Tensor, grad_diag: torch.Tensor) -> None:
        cell = self.cells[index]
        _add_grad(cell.weight, grad_weight)
        for parameter, grad in zip(cell.diagonal_parameters(), grad_diag):
            _add_grad(parameter, grad)

    def _spread(self, weight: torch.Tensor, lower: int) -> torch.Tensor:
        """W^l (H_l, H_k) times layer k's own (structured) sensitivities, as a dense (B, H_l, P_k) block."""
        s_weight, s_diag = self.s_weight[lower], self.s_diag[lower]
        batch = s_weight.shape[0]
        by_weight = weight[None, :, :, None] * s_weight[:, None, :, :]            # (B, H_l, H_k, I_k)
        by_diag = weight[None, :, None, :] * s_diag.transpose(0, 1)[:, None]    # (B, H_l, P_k, H_k)
        return torch.cat([by_weight.reshape(batch, weight.shape[0], -1), by_diag.reshape(batch, weight.shape[0], -1)],
                         dim=2)

    @torch.no_grad()
    def _exact_stack(self, layer_inputs, terms, grad_top: torch.Tensor | None) -> None:
        """The exact update of a stack, step by step: own sensitivities, then the cross-layer ones."""
        top = self.num_layers - 1
        flat = [torch.zeros(self._flat_size(k), dtype=self.s_weight[k].dtype, device=self.s_weight[k].device)
                for k in range(top)]
        grad_weight = torch.zeros_like(self.s_weight[top][0])
        grad_diag = torch.zeros_like(self.s_diag[top][:, 0])
        for t in range(layer_inputs[0].shape[0]):
            for upper, cell in enumerate(self.cells):
                carry, gain = terms[upper].carry[t], terms[upper].gain[t]
                self.s_diag[upper].mul_(carry).add_(terms[upper].direct[:, t])
                self.s_weight[upper].mul_(carry.unsqueeze(-1)).addcmul_(gain.unsqueeze(-1),
                                                                       layer_inputs[upper][t].unsqueeze(1))
                weight = cell.weight.detach()
                for lower in range(upper):
                    spread = (self._spread(weight, lower) if lower == upper - 1
                              else torch.matmul(weight, self.cross[upper - 1, lower]))
                    self.cross[upper, lower].mul_(carry.unsqueeze(-1)).addcmul_(gain.unsqueeze(-1), spread)
            if grad_top is not None:
                g = grad_top[t]
                grad_diag.add_((g * self.s_diag[top]).sum(dim=1))
                grad_weight.add_(torch.einsum("bh,bhi->hi", g, self.s_weight[top]))
                for lower in range(top):
                    flat[lower].add_(torch.einsum("bm,bmp->p", g, self.cross[top, lower]))
        if grad_top is None:
            return
        self._add_layer_grads(top, grad_weight, grad_diag)
        for lower in range(top):
            cell = self.cells[lower]
            split = cell.hidden_size * cell.input_size
            self._add_layer_grads(lower, flat[lower][:split].reshape(cell.weight.shape),
                                  flat[lower][split:].reshape(-1, cell.hidden_size))

    def parameters(self) -> list[torch.Tensor]:
        """Every parameter RTRL computes gradients for: the layers' and the head's."""
        found = [p for cell in self.cells for p in [cell.weight, *cell.diagonal_parameters()]]
        return found + [p for p in self.head.parameters() if p.requires_grad]
