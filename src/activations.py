"""The elementwise nonlinearities the recurrent layers and kernels name in their configs."""
from __future__ import annotations

import torch

from src.checks import check_choice

FUNCTIONS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda x: x}
IN_PLACE = {"tanh": torch.Tensor.tanh_, "relu": torch.Tensor.relu_, "sigmoid": torch.Tensor.sigmoid_,
            "identity": lambda x: x}


def activate(x: torch.Tensor, name: str) -> torch.Tensor:
    """``name``(x) for "tanh", "relu", "sigmoid" or "identity"; any shape."""
    return FUNCTIONS[check_choice("nonlinearity", name, FUNCTIONS)](x)


def activate_(x: torch.Tensor, name: str) -> torch.Tensor:
    """In-place :func:`activate` (returns ``x``)."""
    return IN_PLACE[check_choice("nonlinearity", name, IN_PLACE)](x)
