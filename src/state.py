"""The recurrent state contract shared by every layer and network (see ARCHITECTURE.md).

A layer's ``forward(input, state=None) -> (output, state)`` returns a state that holds everything
needed to continue the sequence: running the sequence in one call equals running it in chunks with
the returned state passed back. A state is a tensor (e.g. IndRNN's (1, B, H), as torch.nn.RNN), a
tuple of states (LSTM's (h, c), a layer's (h, extra...)), a list of states (one per layer of a
network), a NamedTuple, or a plain Python int (a step counter, e.g. Clockwork's phase). ``None``
means "start of a sequence" everywhere.

These helpers walk such nested states, so that objectives (truncated BPTT, streaming evaluation)
never need to know a layer's own format.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

State = Any  # None | torch.Tensor | int | tuple/list/NamedTuple of State


def map_state(function: Callable[[torch.Tensor], torch.Tensor], state: State) -> State:
    """Apply ``function`` to every tensor in a nested state; ints and None are kept as they are."""
    if state is None or isinstance(state, (int, float, bool)):
        return state
    if isinstance(state, torch.Tensor):
        return function(state)
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # NamedTuple: keep its type
        return type(state)(*(map_state(function, item) for item in state))
    if isinstance(state, (tuple, list)):
        return type(state)(map_state(function, item) for item in state)
    if isinstance(state, dict):
        return {key: map_state(function, value) for key, value in state.items()}
    raise TypeError(f"a recurrent state holds tensors, ints, tuples, lists and dicts, not {type(state).__name__}")


def detach_state(state: State) -> State:
    """The same state cut from the autograd graph: truncated BPTT carries values, not gradients."""
    return map_state(torch.Tensor.detach, state)


def state_tensors(state: State) -> list[torch.Tensor]:
    """Every tensor in a nested state, depth first (for comparisons in tests and for hooks)."""
    found: list[torch.Tensor] = []
    map_state(lambda tensor: found.append(tensor) or tensor, state)
    return found
