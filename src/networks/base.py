"""The plain stack, and what every network shares: time-shared dropout, readout and head."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from src.layers.bidirectional import Bidirectional
from src.layers.common import apply_constraints, check_positive_int

READOUTS = ("last", "mean", "all")


class TimeSharedDropout(nn.Module):
    """Dropout with one mask per sequence, shared by all time steps (variational dropout).

    A fresh mask per step would inject noise into every step of a long recurrence; one mask per
    sequence drops the same units throughout, as in the IndRNN papers. Input and output: (B, T, H).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = torch.empty(x.shape[0], 1, x.shape[2], dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * mask / (1 - self.p)


def output_width(layer: nn.Module, hidden_size: int) -> int:
    """Features per step a recurrent layer emits: bidirectional layers concatenate both directions."""
    return hidden_size * (2 if getattr(layer, "bidirectional", False) else 1)


class SequenceNetwork(nn.Module):
    """Base of all networks: ``forward(inputs (B, T, I), states=None) -> (predictions, states)``.

    Subclasses implement :meth:`features` -> ((B, T, F), states) and build ``self.head``;
    the readout ("last" step, "mean" over time, or "all" steps) is chosen by the task.
    Predictions: (B, O) for "last"/"mean", (B, T, O) for "all".
    """

    def __init__(self, input_size: int, output_size: int, readout: str) -> None:
        super().__init__()
        check_positive_int("input_size", input_size)
        check_positive_int("output_size", output_size)
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; choose one of {READOUTS}")
        self.readout = readout

    def features(self, inputs: torch.Tensor, states: list | None) -> tuple[torch.Tensor, list]:
        raise NotImplementedError

    def forward(self, inputs: torch.Tensor, states: list | None = None) -> tuple[torch.Tensor, list]:
        features, final_states = self.features(inputs, states)
        if self.readout == "last":
            features = features[:, -1]
        elif self.readout == "mean":
            features = features.mean(dim=1)
        return self.head(features), final_states

    def apply_constraints(self) -> None:
        """Re-impose every layer's parameter constraint (e.g. IndRNN's |u| bound); call after each step."""
        apply_constraints(self)


class RecurrentNetwork(SequenceNetwork):
    """Input projection (optional) -> ``num_layers`` recurrent layers -> readout -> linear head.

    Args:
        layer: builds one recurrent layer as ``layer(input_size=..., hidden_size=..., batch_first=True)``
            following torch.nn.RNN's contract, e.g. ``torch.nn.LSTM`` or
            ``functools.partial(IndRNN, magnitude=2.0, seq_len=100)``.
        input_size: features per input step, I.
        output_size: outputs per prediction, O (classes, or regression targets).
        hidden_size: units per recurrent layer, H.
        num_layers: number of stacked layers.
        dropout: time-shared dropout between layers and before the head.
        projection_size: if set, a linear map I -> projection_size before the first layer.
        readout: "last", "mean" or "all" (see :class:`SequenceNetwork`).
        last_layer_kwargs: extra arguments for the last layer only, e.g.
            ``{"recurrent_init": "long_memory"}`` (the IndRNN papers' last-layer initialisation).
        bidirectional: wrap every layer in :class:`src.layers.bidirectional.Bidirectional` (a second
            copy reads the sequence backwards; each layer then emits 2H features).

    Shapes: inputs (B, T, I); states: one initial state per layer, or None. Returns predictions
    and the final state of each layer, in each layer's own format (e.g. (h, c) for LSTM).
    """

    def __init__(self, layer: Callable[..., nn.Module], input_size: int, output_size: int, hidden_size: int = 128,
                 num_layers: int = 1, dropout: float = 0.0, projection_size: int | None = None,
                 readout: str = "last", last_layer_kwargs: dict | None = None, bidirectional: bool = False) -> None:
        super().__init__(input_size, output_size, readout)
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_layers", num_layers)
        if bidirectional:
            layer = functools.partial(Bidirectional, layer)
        self.projection = None
        if projection_size is not None:
            self.projection = nn.Linear(input_size, check_positive_int("projection_size", projection_size))
            input_size = projection_size
        self.layers = nn.ModuleList()
        for index in range(num_layers):
            extra = dict(last_layer_kwargs or {}) if index == num_layers - 1 else {}
            self.layers.append(layer(input_size=input_size, hidden_size=hidden_size, batch_first=True, **extra))
            input_size = output_width(self.layers[-1], hidden_size)
        self.dropout = TimeSharedDropout(dropout)
        self.head = nn.Linear(input_size, output_size)

    def features(self, inputs: torch.Tensor, states: list | None) -> tuple[torch.Tensor, list]:
        features = self.projection(inputs) if self.projection is not None else inputs
        final_states = []
        for index, layer in enumerate(self.layers):
            if index > 0:
                features = self.dropout(features)
            features, state = layer(features, None if states is None else states[index])
            final_states.append(state)
        return self.dropout(features), final_states
