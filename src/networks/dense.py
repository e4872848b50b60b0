"""Dense IndRNN (Li et al., "Deep Independently Recurrent Neural Network", 2019).

As DenseNet, over time: every layer of a dense block receives the concatenation of all earlier
features of the block and adds ``growth_rate`` new ones through a bottleneck; transition layers
between blocks halve the width. Each "IndRNN layer" is FC -> recurrence -> BN (the layer factory).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from src.checks import check_int_list, check_positive_int
from src.networks.base import SequenceNetwork, TimeSharedDropout, init_linear_, layer_states


class DenseIndRNN(SequenceNetwork):
    """First layer -> dense blocks with halving transitions -> readout -> head.

    Args:
        layer: builds one IndRNN layer (FC + recurrence + BN) as
            ``layer(input_size=..., hidden_size=..., batch_first=True, **extra)``.
        input_size, output_size: I and O.
        growth_rate: k, features each dense layer adds (paper, pMNIST: 16).
        block_config: dense layers per block (paper: (8, 6, 4)).
        bottleneck_factor: bottleneck width = factor * k (paper: 4).
        first_layer_factor: width of the first layer = factor * k (paper: 6).
        add_last_layer: also put a halving transition after the last block (paper: yes; it is the
            layer that gets ``last_layer_kwargs``, e.g. the long-memory initialisation).
        dropout_first, dropout_bottleneck, dropout_dense, dropout_transition: time-shared dropout
            after the first layer, each bottleneck, each dense layer and each transition
            (paper, pMNIST: 0.2, 0.1, 0.2, 0.1).
        readout: "last", "mean" or "all".
        head_init: the head's init (see :data:`src.networks.base.LINEAR_INITS`; official: "kaiming_normal").

    Shapes: inputs (B, T, I) -> predictions (B, O) or (B, T, O); state: a list with one state per
    recurrent layer, in network order (first layer; per dense layer its bottleneck, then the dense
    layer; each transition after its block).
    """

    def __init__(self, layer: Callable[..., nn.Module], input_size: int, output_size: int, growth_rate: int = 16,
                 block_config: Sequence[int] = (8, 6, 4), bottleneck_factor: int = 4, first_layer_factor: int = 6,
                 add_last_layer: bool = True, dropout_first: float = 0.2, dropout_bottleneck: float = 0.1,
                 dropout_dense: float = 0.2, dropout_transition: float = 0.1, readout: str = "last",
                 last_layer_kwargs: dict | None = None, head_init: str = "default") -> None:
        super().__init__(input_size, output_size, readout)
        k = check_positive_int("growth_rate", growth_rate)
        check_positive_int("bottleneck_factor", bottleneck_factor)
        check_positive_int("first_layer_factor", first_layer_factor)
        if isinstance(block_config, (str, bytes)):
            raise ValueError(f"block_config must be a non-empty list of integers >= 1, got {block_config!r}")
        block_config = check_int_list("block_config", block_config, minimum=1)

        def indrnn(width_in: int, width_out: int, **extra) -> nn.Module:
            return layer(input_size=width_in, hidden_size=width_out, batch_first=True, **extra)

        width = first_layer_factor * k
        self.first_layer = indrnn(input_size, width)
        self.blocks, self.transitions = nn.ModuleList(), nn.ModuleList()
        for index, layers in enumerate(block_config):
            block = nn.ModuleList()
            for _ in range(layers):
                block.append(nn.ModuleList([indrnn(width, bottleneck_factor * k), indrnn(bottleneck_factor * k, k)]))
                width += k
            self.blocks.append(block)
            last_block = index == len(block_config) - 1
            if not last_block or add_last_layer:
                # width >= first_layer_factor * k + k >= 2 here, so halving always leaves a feature.
                extra = dict(last_layer_kwargs or {}) if last_block else {}
                self.transitions.append(indrnn(width, width // 2, **extra))
                width //= 2
        self.output_width = width
        self.dropouts = nn.ModuleDict({name: TimeSharedDropout(p) for name, p in (
            ("first", dropout_first), ("bottleneck", dropout_bottleneck), ("dense", dropout_dense),
            ("transition", dropout_transition))})
        self.head = init_linear_(nn.Linear(width, output_size), head_init)

    @property
    def num_recurrent_layers(self) -> int:
        """Recurrent layers, i.e. entries of the state: first + 2 per dense layer + transitions."""
        return 1 + 2 * sum(len(block) for block in self.blocks) + len(self.transitions)

    @property
    def recurrent_layers(self) -> list[nn.Module]:
        """First layer; per dense layer its bottleneck, then the dense layer; each transition after its block."""
        found = [self.first_layer]
        for index, block in enumerate(self.blocks):
            found += [layer for pair in block for layer in pair]
            found += [self.transitions[index]] if index < len(self.transitions) else []
        return found

    def features(self, inputs: torch.Tensor, state: list | None) -> tuple[torch.Tensor, list]:
        initial = iter(layer_states(state, self.num_recurrent_layers, "DenseIndRNN"))
        final_states = []

        def run(layer, x):
            x, layer_state = layer(x, next(initial))
            final_states.append(layer_state)
            return x

        x = self.dropouts["first"](run(self.first_layer, inputs))
        for index, block in enumerate(self.blocks):
            for bottleneck, dense in block:
                new = self.dropouts["bottleneck"](run(bottleneck, x))
                new = self.dropouts["dense"](run(dense, new))
                x = torch.cat([x, new], dim=2)
            if index < len(self.transitions):
                x = self.dropouts["transition"](run(self.transitions[index], x))
        return x, final_states
