"""Residual IndRNN (Li et al., "Deep Independently Recurrent Neural Network", 2019).

As in the official code's pre-activation block, the residual stream lives in the space of the
fully connected outputs, and each block computes x + F(x) with
F = [recurrence -> BN -> dropout -> FC] twice (the recurrence and BN act as the "activation").
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from src.layers.common import check_positive_int
from src.networks.base import SequenceNetwork, TimeSharedDropout


class ResidualIndRNN(SequenceNetwork):
    """FC -> ``num_blocks`` residual blocks -> recurrence + BN -> dropout -> readout -> head.

    Args:
        layer: builds one recurrence-with-BN as
            ``layer(input_size=H, hidden_size=H, projection="none", batch_first=True, **extra)``,
            normally ``functools.partial(IndRNN, magnitude=..., seq_len=..., batch_norm="after")``.
        input_size, output_size: I and O.
        hidden_size: H, the width of the residual stream.
        num_blocks: residual blocks, each with 2 recurrent layers (paper, pMNIST: 5 -> 11 layers).
        dropout: time-shared dropout inside each block and before the head.
        readout: "last", "mean" or "all".
        last_layer_kwargs: extra arguments for the final recurrence only (e.g. long-memory init).

    Shapes: inputs (B, T, I) -> predictions (B, O) or (B, T, O); states: list of (1, B, H).
    """

    def __init__(self, layer: Callable[..., nn.Module], input_size: int, output_size: int, hidden_size: int = 128,
                 num_blocks: int = 5, dropout: float = 0.1, readout: str = "last",
                 last_layer_kwargs: dict | None = None) -> None:
        super().__init__(input_size, output_size, readout)
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_blocks", num_blocks)

        def recurrence(**extra) -> nn.Module:
            return layer(input_size=hidden_size, hidden_size=hidden_size, projection="none", batch_first=True,
                         **extra)

        self.input_fc = nn.Linear(input_size, hidden_size)
        self.blocks = nn.ModuleList(
            nn.ModuleList([recurrence(), nn.Linear(hidden_size, hidden_size),
                           recurrence(), nn.Linear(hidden_size, hidden_size)])
            for _ in range(num_blocks))
        self.last = recurrence(**dict(last_layer_kwargs or {}))
        self.dropout = TimeSharedDropout(dropout)
        self.head = nn.Linear(hidden_size, output_size)

    def features(self, inputs: torch.Tensor, states: list | None) -> tuple[torch.Tensor, list]:
        initial = iter(states) if states is not None else None
        final_states = []

        def run(layer, x):
            x, state = layer(x, next(initial) if initial is not None else None)
            final_states.append(state)
            return x

        stream = self.input_fc(inputs)
        for first, first_fc, second, second_fc in self.blocks:
            residual = first_fc(self.dropout(run(first, stream)))
            residual = second_fc(self.dropout(run(second, residual)))
            stream = stream + residual
        return self.dropout(run(self.last, stream)), final_states
