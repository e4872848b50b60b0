"""Small helpers shared by the recurrent layers: layout conversion and one-layer states."""
from __future__ import annotations

import math

import torch

from src.state import State, map_state


def to_time_major(input: torch.Tensor, batch_first: bool, input_size: int, layer: str,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, bool]:
    """Return ``input`` as (T, B, I) and whether it was unbatched (T, I).

    With ``dtype`` (the layer's parameters' dtype), an input of another floating dtype is a one-line
    ValueError: every kernel backend then fails the same way (numba's would be a long TypingError).
    """
    if input.dim() not in (2, 3) or input.shape[-1] != input_size:
        raise ValueError(
            f"{layer} expects input of shape (T, B, {input_size}), (B, T, {input_size}) with batch_first, "
            f"or (T, {input_size}) unbatched; got {tuple(input.shape)}"
        )
    if dtype is not None and input.dtype != dtype and not _autocast_enabled(input):
        raise ValueError(f"{layer} got {input.dtype} input but its parameters are {dtype}: convert the input "
                         f"(input.to({dtype})) or the layer (layer.to({input.dtype}))")
    if input.dim() == 2:
        return input.unsqueeze(1), True
    return (input.transpose(0, 1) if batch_first else input), False


def _autocast_enabled(input: torch.Tensor) -> bool:
    """Under autocast (mixed precision) inputs and parameters differ in dtype by design."""
    try:
        return torch.is_autocast_enabled(input.device.type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled()


def from_time_major(output: torch.Tensor, batch_first: bool, unbatched: bool) -> torch.Tensor:
    """Inverse of :func:`to_time_major` for a (T, B, H) output."""
    if unbatched:
        return output.squeeze(1)
    return output.transpose(0, 1) if batch_first else output


@torch.no_grad()
def init_uniform_(parameters, fan: int) -> None:
    """torch.nn.RNN's initialisation: every given parameter (None entries skipped) ~ U(-1/sqrt(fan), 1/sqrt(fan))."""
    bound = 1.0 / math.sqrt(fan)
    for parameter in parameters:
        if parameter is not None:
            torch.nn.init.uniform_(parameter, -bound, bound)


def initial_state(hx: torch.Tensor | None, batch: int, size: int, unbatched: bool, layer: str,
                      like: torch.Tensor, what: str = "hx") -> torch.Tensor:
    """A one-layer state ``hx`` (1, B, size), or (1, size) for unbatched input, as (B, size).

    None gives zeros (dtype and device of ``like``); any other shape is a one-line ValueError.
    """
    if hx is None:
        return like.new_zeros(batch, size)
    if not isinstance(hx, torch.Tensor):
        raise ValueError(f"{layer} {what} must be a tensor of shape {(1, batch, size)}, got {type(hx).__name__}")
    expected = (1, size) if unbatched else (1, batch, size)
    if tuple(hx.shape) != expected:
        raise ValueError(f"{layer} {what} must have shape {expected}, got {tuple(hx.shape)}")
    return hx.reshape(batch, size)


def batched_state(state: State, unbatched: bool) -> State:
    """The state of an unbatched call ((k, F) tensors) with the batch axis added at dim 1: (k, 1, F)."""
    return map_state(lambda tensor: tensor.unsqueeze(1), state) if unbatched else state


def unbatched_state(state: State, unbatched: bool) -> State:
    """Inverse of :func:`batched_state`: drop the batch axis (dim 1) of every tensor for an unbatched call."""
    return map_state(lambda tensor: tensor.squeeze(1), state) if unbatched else state


def check_state_tensor(tensor, expected: tuple[int, ...], layer: str, what: str) -> torch.Tensor:
    """``tensor`` if it is a tensor of shape ``expected``, else a one-line ValueError naming ``what``."""
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(expected):
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{layer} {what} must have shape {tuple(expected)}, got {got}")
    return tensor


def sequence_and_final_state(output: torch.Tensor, batch_first: bool, unbatched: bool):
    """From a one-layer time-major output (T, B, H): (the output in the caller's layout, h_n (1, B, H)),
    h_n being the last step; (T, H) and (1, H) for unbatched input."""
    h_n = output[-1].unsqueeze(0)
    return from_time_major(output, batch_first, unbatched), (h_n.squeeze(1) if unbatched else h_n)


def apply_constraints(module: torch.nn.Module) -> None:
    """Re-impose every parameter constraint in ``module``'s tree; call after each optimizer step.

    A module with a constraint on its own parameters (e.g. IndRNN's |u| <= u_bound) defines
    ``constrain_parameters_()``; this walks the tree and calls each one once.
    """
    with torch.no_grad():
        for child in module.modules():
            constrain = getattr(child, "constrain_parameters_", None)
            if constrain is not None:
                constrain()


class OscillatorState:
    """What the oscillator layers (coRNN, UnICORNN, LEM) share, mixed into their nn.Module: the state and shapes.

    State: a tuple (y, z), each (1, B, H) (position and velocity, or output and memory), as
    torch.nn.LSTM's (h, c); None starts from zeros.

    Shapes:
        input: (T, B, I), (B, T, I) with ``batch_first``, or (T, I) unbatched (state then (1, H) each).
        output: (T, B, H) (or (B, T, H)): y at every step.

    Subclasses set ``layer_name`` (for errors), ``hidden_size`` and ``batch_first``.
    """

    layer_name: str
    bidirectional = False  # one direction: Bidirectional wraps any layer

    def initial_state(self, batch_size: int, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeros (y, z), each (1, B, H), in the dtype and device of ``like`` (default: the parameters)."""
        like = next(self.parameters()) if like is None else like
        return like.new_zeros(1, batch_size, self.hidden_size), like.new_zeros(1, batch_size, self.hidden_size)

    def start_pair(self, x: torch.Tensor, state, unbatched: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``state`` (None: zeros) for the time-major ``x`` (T, B, I), checked, as (y0, z0) (B, H) each."""
        batch = x.shape[1]
        state = batched_state(state, unbatched)
        if state is None:
            state = self.initial_state(batch, x)
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise ValueError(f"{self.layer_name} state must be a tuple (y, z) of two (1, {batch}, {self.hidden_size}) "
                             f"tensors, got {type(state).__name__}")
        y0, z0 = (check_state_tensor(s, (1, batch, self.hidden_size), self.layer_name, what)
                  for s, what in zip(state, ("state y", "state z")))
        return y0[0], z0[0]

    def finish_pair(self, ys: torch.Tensor, z_last: torch.Tensor, y0: torch.Tensor, unbatched: bool):
        """(the output y (T, B, H) in the caller's layout, the state (y_{T-1}, z_{T-1}) (1, B, H) each)."""
        new_state = (ys[-1:] if len(ys) else y0.unsqueeze(0), z_last.unsqueeze(0))
        return from_time_major(ys, self.batch_first, unbatched), unbatched_state(new_state, unbatched)
