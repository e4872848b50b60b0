"""A bidirectional wrapper for any recurrent layer with torch.nn.RNN's contract."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from src.layers.common import from_time_major, to_time_major


def _stack_states(forward_state, backward_state):
    """Stack two final states along the direction axis (dim 0), tuples (e.g. LSTM's (h, c)) per item."""
    if isinstance(forward_state, tuple):
        return tuple(_stack_states(f, b) for f, b in zip(forward_state, backward_state))
    return torch.cat([forward_state, backward_state], dim=0)


def _split_states(state):
    """Inverse of :func:`_stack_states`: (forward initial state, backward initial state)."""
    if state is None:
        return None, None
    if isinstance(state, tuple):
        pairs = [_split_states(item) for item in state]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    half = state.shape[0] // 2
    return state[:half], state[half:]


class Bidirectional(nn.Module):
    """Runs ``layer`` forwards and an independent copy of it backwards in time; concatenates outputs.

    Args:
        layer: builds one direction as ``layer(input_size=..., hidden_size=..., batch_first=False)``,
            e.g. ``functools.partial(ClockworkRNN, num_modules=4)`` or ``torch.nn.GRU``.
        input_size, hidden_size: I and H of each direction.
        batch_first: inputs and outputs are (B, T, *) instead of (T, B, *).

    Shapes:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched.
        hx: the two directions' initial states stacked along dim 0 (e.g. (2, B, H)), or None.
        output: (T, B, 2H) (or (B, T, 2H)): forward features, then backward features, both aligned
            to step t. h_n: the two final states stacked along dim 0 (backward: its state after
            reading step 0).
    """

    bidirectional = True  # read by the networks: this layer emits 2 * hidden_size features

    def __init__(self, layer: Callable[..., nn.Module], input_size: int, hidden_size: int,
                 batch_first: bool = False) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.batch_first = input_size, hidden_size, batch_first
        self.forward_layer = layer(input_size=input_size, hidden_size=hidden_size, batch_first=False)
        self.backward_layer = layer(input_size=input_size, hidden_size=hidden_size, batch_first=False)

    def forward(self, input: torch.Tensor, hx=None):
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "Bidirectional")
        if unbatched and hx is not None:
            raise ValueError("Bidirectional: pass a batched input (T, 1, I) to give an initial state")
        forward_h0, backward_h0 = _split_states(hx)
        forward_out, forward_state = self.forward_layer(x, forward_h0)
        backward_out, backward_state = self.backward_layer(x.flip(0), backward_h0)
        output = torch.cat([forward_out, backward_out.flip(0)], dim=2)
        return from_time_major(output, self.batch_first, unbatched), _stack_states(forward_state, backward_state)
