"""The elementwise nonlinearities the recurrent layers and kernels name in their configs."""
from __future__ import annotations

import torch

FUNCTIONS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda x: x}
IN_PLACE = {"tanh": torch.Tensor.tanh_, "relu": torch.Tensor.relu_, "sigmoid": torch.Tensor.sigmoid_,
            "identity": lambda x: x}


def activate(x: torch.Tensor, name: str) -> torch.Tensor:
    """``name``(x) for "tanh", "relu", "sigmoid" or "identity"; any shape."""
    if name not in FUNCTIONS:
        raise ValueError(f"unknown nonlinearity {name!r}; choose one of {tuple(FUNCTIONS)}")
    return FUNCTIONS[name](x)


def activate_(x: torch.Tensor, name: str) -> torch.Tensor:
    """In-place :func:`activate` (returns ``x``)."""
    if name not in IN_PLACE:
        raise ValueError(f"unknown nonlinearity {name!r}; choose one of {tuple(IN_PLACE)}")
    return IN_PLACE[name](x)
