"""Residual IndRNN (Li et al., "Deep Independently Recurrent Neural Network", 2019).

As in the official code's pre-activation block, the residual stream lives in the space of the
fully connected outputs, and each block computes x + F(x) with
F = [recurrence -> BN -> dropout -> FC] twice (the recurrence and BN act as the "activation").
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from src.checks import check_positive_int
from src.networks.base import SequenceNetwork, TimeSharedDropout, init_linear_, layer_states


class ResidualIndRNN(SequenceNetwork):
    """FC -> ``num_blocks`` residual blocks -> recurrence + BN -> dropout -> readout -> head.

    Args:
        layer: builds one recurrence-with-BN as
            ``layer(input_size=H, hidden_size=H, projection="none", batch_first=True, **extra)``,
            normally ``functools.partial(IndRNN, magnitude=..., bound_steps=..., batch_norm="after")``.
        input_size, output_size: I and O.
        hidden_size: H, the width of the residual stream.
        num_blocks: residual blocks, each with 2 recurrent layers (paper, pMNIST: 5 -> 11 layers).
        dropout: time-shared dropout inside each block and before the head.
        readout: "last", "mean" or "all".
        last_layer_kwargs: extra arguments for the final recurrence only (e.g. long-memory init).
        head_init: the head's init (see :data:`src.networks.base.LINEAR_INITS`; official: "kaiming_normal").
        fc_init: the input FC's and the blocks' FC layers' init (official: "kaiming_a8", zero biases).

    Shapes: inputs (B, T, I) -> predictions (B, O) or (B, T, O); state: a list of the 2 * num_blocks + 1
    recurrent layers' states, in network order (each (1, B, H), or an IndRNNState when it needs more).
    """

    def __init__(self, layer: Callable[..., nn.Module], input_size: int, output_size: int, hidden_size: int = 128,
                 num_blocks: int = 5, dropout: float = 0.1, readout: str = "last",
                 last_layer_kwargs: dict | None = None, head_init: str = "default", fc_init: str = "default") -> None:
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
        self.head = init_linear_(nn.Linear(hidden_size, output_size), head_init)
        for module in [self.input_fc, *(m for block in self.blocks for m in block if isinstance(m, nn.Linear))]:
            init_linear_(module, fc_init)

    @property
    def recurrent_layers(self) -> list[nn.Module]:
        """Each block's two recurrences, then the last one."""
        return [layer for block in self.blocks for layer in (block[0], block[2])] + [self.last]

    def features(self, inputs: torch.Tensor, state: list | None) -> tuple[torch.Tensor, list]:
        initial = iter(layer_states(state, 2 * len(self.blocks) + 1, "ResidualIndRNN"))
        final_states = []

        def run(layer, x):
            x, layer_state = layer(x, next(initial))
            final_states.append(layer_state)
            return x

        stream = self.input_fc(inputs)
        for first, first_fc, second, second_fc in self.blocks:
            residual = first_fc(self.dropout(run(first, stream)))
            residual = second_fc(self.dropout(run(second, residual)))
            stream = stream + residual
        return self.dropout(run(self.last, stream)), final_states
