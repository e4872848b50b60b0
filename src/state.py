"""The recurrent state contract shared by every layer and network (see ARCHITECTURE.md).

A layer's ``forward(input, state=None) -> (output, state)`` returns a state that holds everything
needed to continue the sequence: running the sequence in one call equals running it in chunks with
the returned state passed back. A state is a tensor (e.g. IndRNN's (1, B, H), as torch.nn.RNN), a
tuple of states (LSTM's (h, c), a layer's (h, extra...)), a list of states (one per layer of a
network), a NamedTuple, a dict, or a step counter (e.g. Clockwork's phase). ``None`` means "start
of a sequence" everywhere.

Where the batch of B streams sits, so that objectives can restart single streams without knowing a
layer's format:

* every tensor of a layer's state has the streams at dim 1: (k, B, F), as torch.nn.RNN's hx
  ((num_layers * directions, B, H)), LSTM's (h, c), a window of the last k steps (SkipRNN, TDNN,
  NARX, IndRNN's conv1d inputs);
* a step counter is a plain int while every stream is at the same step, and a (B,) int64 tensor,
  one step per stream, once streams have restarted at different times (:func:`reset_streams`);
  layers with a counter accept both.

:func:`initial_state` (the state before the first step, the same as None) and
:func:`reset_streams` (restart some streams) are the one home of both; a module may define its own
``initial_state(batch_size, like=None)`` / ``reset_streams(state, restart)`` (networks do, per
layer), and :func:`merge_streams` is the rule every format follows. These helpers walk nested
states, so that objectives (truncated BPTT, streaming evaluation, RTRL) never need a layer's own
format.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

State = Any  # None | torch.Tensor | int | tuple/list/NamedTuple/dict of State


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


def module_like(module: nn.Module, like: torch.Tensor | None = None) -> torch.Tensor | None:
    """``like`` if given, else the module's first parameter (or buffer): the dtype and device of its states."""
    if like is not None:
        return like
    for tensor in module.parameters():
        return tensor
    for tensor in module.buffers():
        return tensor
    return None


def initial_state(module: nn.Module, batch_size: int, like: torch.Tensor | None = None) -> State:
    """The state of ``batch_size`` streams before their first step: running from it equals running from None.

    Args:
        module: a layer or network keeping the state contract: one with its own
            ``initial_state(batch_size, like=None)`` method (every layer and network of this project),
            or torch's nn.RNN / nn.GRU / nn.LSTM (and subclasses such as IRNN).
        batch_size: B, the number of streams.
        like: a tensor whose dtype and device the state's tensors take (default: the module's parameters).

    Returns:
        The module's state format, e.g. zeros (1, B, H) for IndRNN, ``ClockworkState(zeros (1, B, H),
        time_origin)``, (h, c) zeros (L * D, B, H) for LSTM, one entry per layer for a network.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"initial_state: batch_size must be an int >= 1, got {batch_size!r}")
    own = getattr(module, "initial_state", None)
    if callable(own):
        return own(batch_size, like=like)
    if isinstance(module, nn.RNNBase):  # torch's fused layers: zeros (num_layers * directions, B, H)
        like = module_like(module, like)
        layers = module.num_layers * (2 if module.bidirectional else 1)
        h = like.new_zeros(layers, batch_size, module.proj_size or module.hidden_size)
        return (h, like.new_zeros(layers, batch_size, module.hidden_size)) if isinstance(module, nn.LSTM) else h
    raise TypeError(f"initial_state: {type(module).__name__} defines no initial_state(batch_size, like=None); "
                    "add one to the layer (see src/state.py)")


def reset_streams(module: nn.Module, state: State, restart: torch.Tensor | None) -> State:
    """The state of B streams in which those with ``restart`` start afresh and the others go on unchanged.

    Args:
        module: the layer or network that returned ``state`` (see :func:`initial_state`).
        state: its state for a batch of B streams (as returned by its forward pass), or None.
        restart: (B,) bool, True for the streams that start a new sequence at the next step; None: none.

    Returns:
        A state of the same format: for every stream j with ``restart[j]``, running on from it equals
        running stream j alone from None; every other stream's entries are the carried ones, unchanged
        (step counters become per-stream (B,) int64 tensors where the streams' steps now differ). No
        host synchronisation: the choice is made with ``torch.where`` on the device.

    A module may define its own ``reset_streams(state, restart)`` (networks: layer by layer); the
    default is :func:`merge_streams` of ``initial_state(module, B)`` and ``state``.
    """
    if state is None or restart is None:
        return state
    own = getattr(module, "reset_streams", None)
    if callable(own):
        return own(state, restart)
    restart = check_restart(restart, state)
    tensors = state_tensors(state)
    return merge_streams(restart, initial_state(module, restart.shape[0], like=tensors[0] if tensors else None),
                         state)


def check_restart(restart: torch.Tensor, state: State = None) -> torch.Tensor:
    """``restart`` as a (B,) bool tensor on the device of ``state``'s tensors; a one-line ValueError otherwise."""
    if not isinstance(restart, torch.Tensor) or restart.dim() != 1 or restart.dtype != torch.bool:
        got = f"{restart.dtype} {tuple(restart.shape)}" if isinstance(restart, torch.Tensor) else type(restart).__name__
        raise ValueError(f"reset_streams: restart must be a (B,) bool tensor (True where a stream starts afresh), "
                         f"got {got}")
    tensors = state_tensors(state)
    return restart.to(tensors[0].device, non_blocking=True) if tensors else restart


def merge_streams(restart: torch.Tensor, fresh: State, carried: State, batch_dim: int = 1) -> State:
    """``fresh`` for the streams where ``restart`` (B,) is True, ``carried`` for the others, item by item.

    The two states have one format. Tensors: the streams at ``batch_dim`` (1 for layer states, (k, B, F));
    ``fresh`` is cast to ``carried``'s dtype. Where ``fresh`` holds an int (a step counter): the carried
    int if it is the same, else a (B,) int64 tensor of per-stream steps (``carried`` may already be one).
    None stays None. A mismatch of formats or shapes is a one-line ValueError.
    """
    if carried is None and fresh is None:
        return None
    if isinstance(fresh, int) and not isinstance(fresh, bool):
        if isinstance(carried, int) and not isinstance(carried, bool):
            if carried == fresh:
                return carried
            carried = torch.full(restart.shape, carried, dtype=torch.long, device=restart.device)
        if not isinstance(carried, torch.Tensor) or carried.shape != restart.shape:
            raise ValueError(f"reset_streams: a step counter must be an int or one step per stream "
                             f"{tuple(restart.shape)}, got {_describe(carried)}")
        return torch.where(restart, fresh, carried)
    if isinstance(fresh, torch.Tensor):
        if not isinstance(carried, torch.Tensor) or carried.shape != fresh.shape:
            raise ValueError(f"reset_streams: the carried state has {_describe(carried)} where a fresh one has "
                             f"{_describe(fresh)}: pass the state the module returned")
        shape = [1] * carried.dim()
        shape[batch_dim] = restart.shape[0]
        return torch.where(restart.view(shape), fresh.to(carried.dtype), carried)
    if isinstance(fresh, (tuple, list)) and isinstance(carried, (tuple, list)) and len(fresh) == len(carried):
        items = [merge_streams(restart, f, c, batch_dim) for f, c in zip(fresh, carried)]
        if isinstance(carried, tuple) and hasattr(carried, "_fields"):
            return type(carried)(*items)
        return type(carried)(items)
    if isinstance(fresh, dict) and isinstance(carried, dict) and fresh.keys() == carried.keys():
        return {key: merge_streams(restart, fresh[key], carried[key], batch_dim) for key in fresh}
    raise ValueError(f"reset_streams: the carried state ({_describe(carried)}) is not in the module's format "
                     f"({_describe(fresh)}): pass the state the module returned")


def _describe(item: State) -> str:
    if isinstance(item, torch.Tensor):
        return f"a tensor of shape {tuple(item.shape)}"
    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} of {len(item)}"
    return type(item).__name__


def check_step(step, batch: int, what: str) -> int | torch.Tensor:
    """A step counter of a state of ``batch`` streams: an int >= 0 (every stream at that step) or a (B,)
    int64 tensor (one step per stream, after :func:`reset_streams`); a one-line ValueError naming ``what``."""
    if isinstance(step, torch.Tensor):
        if step.shape != (batch,) or step.dtype != torch.long:
            raise ValueError(f"{what} must be an int >= 0 or a ({batch},) int64 tensor (one step per stream), "
                             f"got a {step.dtype} tensor of shape {tuple(step.shape)}")
        return step
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{what} must be an int >= 0 or a ({batch},) int64 tensor (one step per stream), got {step!r}")
    return step
