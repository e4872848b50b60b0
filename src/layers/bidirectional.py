"""The one bidirectional wrapper, for every recurrent layer (IndRNN, Clockwork, LSTM, ...)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from src.layers.common import from_time_major, to_time_major


def stack_directions(forward_state, backward_state):
    """The two directions' final states as one: tensors concatenated along dim 0 (torch's (2, B, H)
    layout, per item for tuples such as LSTM's (h, c)), equal ints kept, anything else paired."""
    if isinstance(forward_state, torch.Tensor) and isinstance(backward_state, torch.Tensor):
        return torch.cat([forward_state, backward_state], dim=0)
    if isinstance(forward_state, int) and forward_state == backward_state:
        return forward_state  # e.g. Clockwork's step counter: both directions read T steps
    if (isinstance(forward_state, tuple) and type(forward_state) is type(backward_state)
            and len(forward_state) == len(backward_state)):
        items = [stack_directions(f, b) for f, b in zip(forward_state, backward_state)]
        return type(forward_state)(*items) if hasattr(forward_state, "_fields") else tuple(items)
    if forward_state is None and backward_state is None:
        return None
    return forward_state, backward_state


def refuse_carried_state(state) -> None:
    """A one-line ValueError unless ``state`` is None."""
    if state is not None:
        raise ValueError("Bidirectional layers take no carried state (state must be None): the backward "
                         "direction of a continued sequence would need steps that have not been read yet")


class Bidirectional(nn.Module):
    """Runs ``layer`` forwards and an independent copy of it backwards in time; concatenates outputs.

    Args:
        layer: builds one direction as ``layer(input_size=..., hidden_size=..., batch_first=False, **kwargs)``,
            e.g. ``functools.partial(ClockworkRNN, num_modules=4)``, ``torch.nn.GRU`` or
            ``functools.partial(IndRNN, magnitude=2.0, bound_steps=100)``.
        input_size, hidden_size: I and H of each direction.
        batch_first: inputs and outputs are (B, T, *) instead of (T, B, *).
        **kwargs: further arguments for both directions (e.g. ``recurrent_init="long_memory"`` for
            a network's last layer).

    A bidirectional layer cannot continue a sequence: its backward direction starts from the end
    of the sequence, which the next chunk has not seen. So ``state`` must be None (a one-line
    ValueError otherwise). The returned state is still reported (e.g. for an encoder's summary).

    Shapes:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched.
        output: (T, B, 2H) (or (B, T, 2H)): forward features, then backward features, both aligned
            to step t.
        state returned: the two directions' final states stacked along dim 0 (e.g. (2, B, H), as
            torch's bidirectional RNNs; see :func:`stack_directions`); backward: its state after
            reading step 0.
    """

    bidirectional = True  # read by the networks: this layer emits 2 * hidden_size features

    def __init__(self, layer: Callable[..., nn.Module], input_size: int, hidden_size: int,
                 batch_first: bool = False, **kwargs) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.batch_first = input_size, hidden_size, batch_first
        self.forward_layer = layer(input_size=input_size, hidden_size=hidden_size, batch_first=False, **kwargs)
        self.backward_layer = layer(input_size=input_size, hidden_size=hidden_size, batch_first=False, **kwargs)

    def initial_state(self, batch_size: int, like: torch.Tensor | None = None) -> None:
        """None: a bidirectional layer always starts afresh (it takes no carried state)."""
        return None

    def reset_streams(self, state, restart: torch.Tensor):
        """Only None (the start) can be restarted: a bidirectional layer's state is never carried."""
        refuse_carried_state(state)
        return None

    def forward(self, input: torch.Tensor, state=None):
        refuse_carried_state(state)
        x, unbatched = to_time_major(input, self.batch_first, self.input_size, "Bidirectional")
        forward_out, forward_state = self.forward_layer(x)
        backward_out, backward_state = self.backward_layer(x.flip(0))
        output = torch.cat([forward_out, backward_out.flip(0)], dim=-1)
        return from_time_major(output, self.batch_first, unbatched), stack_directions(forward_state, backward_state)
