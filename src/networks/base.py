"""The plain stack, and what every network shares: time-shared dropout, readout and head."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from src.batch import step_mask
from src.checks import check_choice, check_fraction, check_positive_int
from src.layers.bidirectional import Bidirectional
from src.layers.common import apply_constraints
from src.state import initial_state, reset_streams

READOUTS = ("last", "mean", "all")
LINEAR_INITS = ("default", "kaiming_normal", "kaiming_a8")


def init_linear_(linear: nn.Linear, scheme: str) -> nn.Linear:
    """Re-initialise a fully connected layer in place: "default" keeps torch.nn.Linear's own init;
    "kaiming_normal" (the official IndRNN code's classifier) or "kaiming_a8" (kaiming_uniform with
    a=8, its residual network's FC layers) draw the weight so, with a zero bias."""
    check_choice("linear init", scheme, LINEAR_INITS)
    if scheme == "default":
        return linear
    if scheme == "kaiming_normal":
        nn.init.kaiming_normal_(linear.weight)
    else:
        nn.init.kaiming_uniform_(linear.weight, a=8)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class TimeSharedDropout(nn.Module):
    """Dropout with one mask per sequence, shared by all time steps (variational dropout).

    A fresh mask per step would inject noise into every step of a long recurrence; one mask per
    sequence drops the same units throughout, as in the IndRNN papers. Input and output: (B, T, H).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = check_fraction("dropout", p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = torch.empty(x.shape[0], 1, x.shape[2], dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * mask / (1 - self.p)


def layer_states(state: list | None, count: int, network: str) -> list:
    """A network's state as one entry per layer (None entries: start of sequence), checked for length."""
    if state is None:
        return [None] * count
    if not isinstance(state, (list, tuple)) or len(state) != count:
        got = f"{len(state)} entries" if isinstance(state, (list, tuple)) else type(state).__name__
        raise ValueError(f"{network} state must be a list of {count} layer states (one per layer), got {got}")
    return list(state)


def output_width(layer: nn.Module, hidden_size: int) -> int:
    """Features per step a recurrent layer emits: bidirectional layers concatenate both directions."""
    return hidden_size * (2 if getattr(layer, "bidirectional", False) else 1)


def read_out(features: torch.Tensor, readout: str, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """features (B, T, F) -> (B, F) for "last" (step lengths - 1) and "mean" (over the valid steps),
    or (B, T, F) unchanged for "all". ``lengths`` (B,) int64: valid steps of right-padded sequences
    (None: all T)."""
    if readout == "all":
        return features
    if lengths is None:
        return features[:, -1] if readout == "last" else features.mean(dim=1)
    lengths = lengths.to(features.device)
    if readout == "last":
        return features[torch.arange(features.shape[0], device=features.device), lengths - 1]
    mask = step_mask(lengths, features.shape[1]).unsqueeze(-1).to(features.dtype)  # (B, T, 1)
    return (features * mask).sum(dim=1) / lengths.clamp(min=1).unsqueeze(-1).to(features.dtype)


class SequenceNetwork(nn.Module):
    """Base of all networks: ``forward(inputs (B, T, I), state=None, lengths=None) -> (predictions, state)``.

    Subclasses implement :meth:`features` -> ((B, T, F), state) and build ``self.head``; the
    readout ("last" step, "mean" over time, or "all" steps) is chosen by the task.
    Predictions: (B, O) for "last"/"mean", (B, T, O) for "all".

    The state is a list with one state per recurrent layer, each in its layer's own format (see
    :mod:`src.state`); passing back the returned state continues the sequences (truncated BPTT,
    streaming). ``lengths`` (B,) int64 marks right-padded sequences: "last" reads step lengths - 1,
    "mean" averages the valid steps only. The returned state is the one after all T steps (padding
    included): carry it only across batches of full-length sequences.
    """

    def __init__(self, input_size: int, output_size: int, readout: str) -> None:
        super().__init__()
        check_positive_int("input_size", input_size)
        check_positive_int("output_size", output_size)
        self.readout = check_choice("readout", readout, READOUTS)

    def features(self, inputs: torch.Tensor, state: list | None) -> tuple[torch.Tensor, list]:
        raise NotImplementedError

    @property
    def recurrent_layers(self) -> list[nn.Module]:
        """The recurrent layers in the order of the state's entries (one entry per layer)."""
        raise NotImplementedError

    def initial_state(self, batch_size: int, like: torch.Tensor | None = None) -> list:
        """One entry per recurrent layer: its state before the first step (:func:`src.state.initial_state`)."""
        return [initial_state(layer, batch_size, like) for layer in self.recurrent_layers]

    def reset_streams(self, state: list, restart: torch.Tensor) -> list:
        """Layer by layer, the streams with ``restart`` (B,) bool start afresh (see :func:`src.state.reset_streams`)."""
        layers = self.recurrent_layers
        return [reset_streams(layer, entry, restart)
                for layer, entry in zip(layers, layer_states(state, len(layers), type(self).__name__))]

    def forward(self, inputs: torch.Tensor, state: list | None = None,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
        features, final_state = self.features(inputs, state)
        return self.head(read_out(features, self.readout, lengths)), final_state

    def apply_constraints(self) -> None:
        """Re-impose every layer's parameter constraint (e.g. IndRNN's |u| bound); call after each step."""
        apply_constraints(self)


class RecurrentNetwork(SequenceNetwork):
    """Input projection (optional) -> ``num_layers`` recurrent layers -> readout -> linear head.

    Args:
        layer: builds one recurrent layer as ``layer(input_size=..., hidden_size=..., batch_first=True)``
            following the layer contract (``layer(input, state) -> (output, state)``), e.g.
            ``torch.nn.LSTM`` or ``functools.partial(IndRNN, magnitude=2.0, bound_steps=100)``.
        input_size: features per input step, I.
        output_size: outputs per prediction, O (classes, or regression targets).
        hidden_size: units per recurrent layer, H.
        num_layers: number of stacked layers.
        dropout: time-shared dropout between layers and before the head.
        projection_size: if set, a linear map I -> projection_size before the first layer.
        readout: "last", "mean" or "all" (see :class:`SequenceNetwork`).
        last_layer_kwargs: extra arguments for the last layer only, e.g.
            ``{"recurrent_init": "long_memory"}`` (the IndRNN papers' last-layer initialisation).
        head_init: the classifier/regression head's init, one of ``LINEAR_INITS`` ("default": torch's;
            "kaiming_normal" with zero bias: the official IndRNN code).
        bidirectional: wrap every layer in :class:`src.layers.bidirectional.Bidirectional` (a second
            copy reads the sequence backwards; each layer then emits 2H features). A ``bidirectional``
            keyword of a ``functools.partial`` layer (e.g. ``model.layer.bidirectional=true``) is
            routed to the same wrapper.

    Shapes: inputs (B, T, I); state: one state per layer (a list), or None. Returns predictions
    and the final state of each layer, in each layer's own format (e.g. (h, c) for LSTM).
    """

    def __init__(self, layer: Callable[..., nn.Module], input_size: int, output_size: int, hidden_size: int = 128,
                 num_layers: int = 1, dropout: float = 0.0, projection_size: int | None = None,
                 readout: str = "last", last_layer_kwargs: dict | None = None, bidirectional: bool = False,
                 head_init: str = "default") -> None:
        super().__init__(input_size, output_size, readout)
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_layers", num_layers)
        if isinstance(layer, functools.partial) and "bidirectional" in layer.keywords:
            keywords = dict(layer.keywords)
            bidirectional = bool(keywords.pop("bidirectional")) or bidirectional
            layer = functools.partial(layer.func, *layer.args, **keywords)
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
        self.head = init_linear_(nn.Linear(input_size, output_size), head_init)

    @property
    def recurrent_layers(self) -> list[nn.Module]:
        return list(self.layers)

    def features(self, inputs: torch.Tensor, state: list | None) -> tuple[torch.Tensor, list]:
        states = layer_states(state, len(self.layers), type(self).__name__)
        features = self.projection(inputs) if self.projection is not None else inputs
        final_states = []
        for index, layer in enumerate(self.layers):
            if index > 0:
                features = self.dropout(features)
            features, layer_state = layer(features, states[index])
            final_states.append(layer_state)
        return self.dropout(features), final_states
