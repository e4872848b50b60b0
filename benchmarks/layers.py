"""The registry of the recurrent layers that the benchmarks time: ``name -> factory(input_size,
hidden_size, device) -> nn.Module`` (batch first, torch.nn.RNN's call: ``forward(x) -> (output, state)``).

One entry per layer and backend worth comparing; benchmarks/recurrence.py runs them, gpu_check.py and
long_series.py pick rows. A new layer is one line here. Rows whose name ends in ``_triton`` or
``_graphs`` run on CUDA only (the persistent Triton kernels, CUDA-graph capture of the PyTorch loop).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from src.layers import (LEM, NARX, TDNN, ClockworkRNN, CoRNN, IndRNN, JordanRNN, LeakyRNN, SkipRNN,
                        UnICORNN)

# |u| <= 1: a stable recurrence whatever T (timing does not depend on the value).
INDRNN_U_BOUND = 1.0

Factory = Callable[[int, int, torch.device], nn.Module]


def clockwork_modules(hidden_size: int) -> int:
    """8 modules (periods 1..128); fewer where H is not a multiple of 8 (tiny test shapes)."""
    return next(g for g in (8, 4, 2, 1) if hidden_size % g == 0)


def graphed(layer: nn.Module) -> nn.Module:
    """``layer`` with its forward and backward captured in a CUDA graph (lightning_modules/cuda_graph.py)."""
    from lightning_modules.cuda_graph import GraphedForward

    GraphedForward(layer, report=lambda line: None).install()
    return layer


def indrnn(backend: str) -> Factory:
    return lambda i, h, device: IndRNN(i, h, u_bound=INDRNN_U_BOUND, batch_first=True, backend=backend).to(device)


IMPLS: dict[str, Factory] = {
    "indrnn": indrnn("auto"),
    "indrnn_fused": indrnn("fused"),
    "indrnn_scan": indrnn("scan"),
    "indrnn_reference": indrnn("reference"),
    "lstm": lambda i, h, device: nn.LSTM(i, h, batch_first=True, device=device),
    "gru": lambda i, h, device: nn.GRU(i, h, batch_first=True, device=device),
    "rnn_tanh": lambda i, h, device: nn.RNN(i, h, nonlinearity="tanh", batch_first=True, device=device),
    "rnn_relu": lambda i, h, device: nn.RNN(i, h, nonlinearity="relu", batch_first=True, device=device),
    "cwrnn": lambda i, h, device: ClockworkRNN(i, h, num_modules=clockwork_modules(h), batch_first=True,
                                               device=device),
    "leaky": lambda i, h, device: LeakyRNN(i, h, batch_first=True, backend="reference").to(device),
    "skip": lambda i, h, device: SkipRNN(i, h, batch_first=True, backend="reference").to(device),
    "jordan": lambda i, h, device: JordanRNN(i, h, batch_first=True, backend="reference").to(device),
    "narx": lambda i, h, device: NARX(i, h, batch_first=True).to(device),
    "tdnn": lambda i, h, device: TDNN(i, h, batch_first=True).to(device),
    # The oscillator RNNs with the time steps of their EigenWorms recipes (the speed does not depend on them).
    "unicornn": lambda i, h, device: UnICORNN(i, h, dt=0.0343, alpha=0.0, batch_first=True, backend="auto").to(device),
    "unicornn_reference": lambda i, h, device: UnICORNN(i, h, dt=0.0343, alpha=0.0, batch_first=True,
                                                        backend="reference").to(device),
    "cornn": lambda i, h, device: CoRNN(i, h, dt=0.01, gamma=1.0, epsilon=1.0, batch_first=True).to(device),
    "lem": lambda i, h, device: LEM(i, h, dt=0.00017, batch_first=True).to(device),
    # CUDA only.
    "leaky_triton": lambda i, h, device: LeakyRNN(i, h, batch_first=True, backend="triton").to(device),
    "leaky_graphs": lambda i, h, device: graphed(LeakyRNN(i, h, batch_first=True, backend="reference").to(device)),
    "skip_triton": lambda i, h, device: SkipRNN(i, h, batch_first=True, backend="triton").to(device),
    "skip_graphs": lambda i, h, device: graphed(SkipRNN(i, h, batch_first=True, backend="reference").to(device)),
    "cwrnn_triton": lambda i, h, device: ClockworkRNN(i, h, num_modules=clockwork_modules(h), batch_first=True,
                                                      backend="triton").to(device),
    "cwrnn_graphs": lambda i, h, device: graphed(ClockworkRNN(i, h, num_modules=clockwork_modules(h),
                                                              batch_first=True).to(device)),
    "jordan_triton": lambda i, h, device: JordanRNN(i, h, batch_first=True, backend="triton").to(device),
    "jordan_graphs": lambda i, h, device: graphed(JordanRNN(i, h, batch_first=True).to(device)),
    "narx_graphs": lambda i, h, device: graphed(NARX(i, h, batch_first=True).to(device)),
}

CUDA_ONLY = tuple(name for name in IMPLS if name.endswith(("_triton", "_graphs")))


def impls_for(device: str) -> list[str]:
    """Every registered implementation that runs on ``device`` ("cpu" or "cuda")."""
    return [name for name in IMPLS if device == "cuda" or name not in CUDA_ONLY]


__all__ = ["CUDA_ONLY", "Factory", "IMPLS", "INDRNN_U_BOUND", "impls_for"]
