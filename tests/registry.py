"""The one registry of every recurrent layer and network the tests build (the state contract test
runs over all of it; the layer tests pick entries by name).

Each entry is a :class:`Case`: ``case(seed=0, **overrides)`` builds the module with the entry's
settings (``overrides`` such as ``batch_first=True``, ``backend=...`` or ``dtype=...`` win), and
``case.input_size`` / ``case.width`` are the features per step it reads and emits.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from src.kernels import numba_available
from src.layers import (IRNN, LEM, NARX, TDNN, ClockworkRNN, CoRNN, DiagonalLeakyRNN, IndRNN, JordanRNN, LeakyRNN,
                        SkipRNN, UnICORNN)
from src.networks import DenseIndRNN, RecurrentNetwork, ResidualIndRNN

I, H = 4, 8  # features in, units
CLOCKWORK_H, CLOCKWORK_MODULES = 16, 4


@dataclass(frozen=True)
class Case:
    """One registry entry: ``build(**overrides) -> nn.Module`` and its sizes."""

    build: Callable[..., nn.Module]
    input_size: int = I
    width: int = H
    network: bool = False  # a SequenceNetwork (B, T, I) -> (B, T, O) with readout "all", always batch first
    defaults: dict = field(default_factory=dict)

    def __call__(self, seed: int = 0, **overrides) -> nn.Module:
        torch.manual_seed(seed)
        return self.build(**{**self.defaults, **overrides})


def _clockwork(dtype=None, **kwargs) -> ClockworkRNN:
    kwargs = {"num_modules": CLOCKWORK_MODULES, **kwargs}
    layer = ClockworkRNN(I, CLOCKWORK_H, dtype=dtype, **kwargs)
    with torch.no_grad():  # larger recurrent weights than the default init: states move more
        layer.weight_hh.mul_(3.0).mul_(layer.mask)
    return layer


def _indrnn(**kwargs) -> IndRNN:
    return IndRNN(kwargs.pop("input_size", I), H, **{"u_bound": 1.2, **kwargs})


PER_STEP = {"batch_norm_stats": "per_step", "bound_steps": 12}  # fewer rows than the contract's T: the last is reused

INDRNN_BACKENDS = ["reference", "cpu_torch", "auto", "fused"] + (["cpu", "scan"] if numba_available() else [])

LAYERS: dict[str, Case] = {
    # IndRNN: every backend available on CPU, every option
    **{f"indrnn_{backend}": Case(functools.partial(_indrnn, backend=backend)) for backend in INDRNN_BACKENDS},
    "indrnn_magnitude": Case(functools.partial(IndRNN, I, H, magnitude=2.0, bound_steps=7)),
    "indrnn_tanh": Case(functools.partial(_indrnn, nonlinearity="tanh")),
    "indrnn_bn_before": Case(functools.partial(_indrnn, batch_norm="before")),
    "indrnn_bn_after": Case(functools.partial(_indrnn, batch_norm="after")),
    "indrnn_bn_before_per_step": Case(functools.partial(_indrnn, batch_norm="before", **PER_STEP)),
    "indrnn_bn_after_per_step": Case(functools.partial(_indrnn, batch_norm="after", **PER_STEP)),
    "indrnn_conv1d": Case(functools.partial(_indrnn, projection="conv1d", kernel_size=3)),
    "indrnn_conv1d_k1_reference": Case(functools.partial(_indrnn, projection="conv1d", kernel_size=1,
                                                         backend="reference")),
    "indrnn_conv1d_bn_after_per_step": Case(functools.partial(_indrnn, projection="conv1d", kernel_size=4,
                                                              batch_norm="after", **PER_STEP)),
    "indrnn_projection_none": Case(functools.partial(_indrnn, input_size=H, projection="none"), input_size=H),
    # Clockwork: default powers-of-two periods, other periods, a shifted clock, both backends
    "clockwork": Case(_clockwork, width=CLOCKWORK_H),
    "clockwork_reference": Case(_clockwork, width=CLOCKWORK_H, defaults={"backend": "reference"}),
    "clockwork_periods_1357": Case(_clockwork, width=CLOCKWORK_H, defaults={"periods": (1, 3, 5, 7)}),
    "clockwork_periods_2346_origin1": Case(_clockwork, width=CLOCKWORK_H,
                                           defaults={"periods": (2, 3, 4, 6), "time_origin": 1}),
    # the classic layers
    "leaky": Case(functools.partial(LeakyRNN, I, H)),
    "leaky_learned": Case(functools.partial(LeakyRNN, I, H, alpha_mode="learned", alpha_range=(0.2, 0.8))),
    "diagonal_leaky": Case(functools.partial(DiagonalLeakyRNN, I, H, alpha_mode="learned", alpha_range=(0.2, 0.8))),
    "skip": Case(functools.partial(SkipRNN, I, H, delays=[1, 3])),
    "skip_1248": Case(functools.partial(SkipRNN, I, H, delays=[1, 2, 4, 8])),
    "skip_no_one_step": Case(functools.partial(SkipRNN, I, H, delays=[2, 5], nonlinearity="relu")),
    "jordan": Case(functools.partial(JordanRNN, I, H)),
    "jordan_output_5": Case(functools.partial(JordanRNN, I, H, output_size=5), width=5),
    "narx": Case(functools.partial(NARX, I, H, input_delays=2, output_delays=3, mlp_hidden=5)),
    "narx_no_input_delay": Case(functools.partial(NARX, I, H, input_delays=0, output_delays=1)),
    "tdnn": Case(functools.partial(TDNN, I, H, window=3, dilation=2)),
    "tdnn_window_1": Case(functools.partial(TDNN, I, H, window=1)),
    # the oscillators (time steps large enough that the states move over the contract's 16 steps)
    **{f"unicornn_{backend}": Case(functools.partial(UnICORNN, I, H, dt=0.6, alpha=0.3, backend=backend))
       for backend in ["reference", "auto"] + (["cpu"] if numba_available() else [])},
    "unicornn_uniform_init_no_alpha": Case(functools.partial(UnICORNN, I, H, dt=0.6, input_init="uniform")),
    "cornn": Case(functools.partial(CoRNN, I, H, dt=0.3, gamma=0.4, epsilon=2.0)),
    "cornn_undamped": Case(functools.partial(CoRNN, I, H, dt=0.2, gamma=1.0, epsilon=0.0, bias=False)),
    "lem": Case(functools.partial(LEM, I, H, dt=0.8)),
    "lem_no_bias": Case(functools.partial(LEM, I, H, dt=0.5, bias=False)),
    # IRNN and torch's own
    "irnn": Case(functools.partial(IRNN, I, H)),
    "rnn": Case(functools.partial(nn.RNN, I, H, nonlinearity="tanh")),
    "lstm": Case(functools.partial(nn.LSTM, I, H)),
    "gru": Case(functools.partial(nn.GRU, I, H)),
}

OUT = 3  # network outputs per step


def _network(layer, **kwargs) -> RecurrentNetwork:
    return RecurrentNetwork(layer, I, OUT, **{"hidden_size": H, "num_layers": 2, "readout": "all", **kwargs})


NETWORKS: dict[str, Case] = {
    "network_indrnn_conv1d_per_step": Case(functools.partial(
        _network, functools.partial(IndRNN, u_bound=1.2, projection="conv1d", batch_norm="after", **PER_STEP),
        num_layers=3, dropout=0.2), width=OUT, network=True),
    "network_lstm_projection": Case(functools.partial(_network, nn.LSTM, projection_size=5), width=OUT, network=True),
    "network_clockwork": Case(functools.partial(
        _network, functools.partial(ClockworkRNN, num_modules=2, periods=(1, 3)), num_layers=2), width=OUT,
        network=True),
    "network_tdnn": Case(functools.partial(_network, functools.partial(TDNN, window=2, dilation=3),
                                                num_layers=2), width=OUT, network=True),
    "network_skip_1248": Case(functools.partial(_network, functools.partial(SkipRNN, delays=(1, 2, 4, 8))),
                              width=OUT, network=True),
    "residual_indrnn": Case(functools.partial(
        ResidualIndRNN, functools.partial(IndRNN, magnitude=5.0, bound_steps=12, batch_norm="after"), I, OUT,
        hidden_size=H, num_blocks=2, readout="all", last_layer_kwargs={"recurrent_init": "long_memory"}),
        width=OUT, network=True),
    "network_unicornn": Case(functools.partial(
        _network, functools.partial(UnICORNN, dt=0.6, alpha=0.1), last_layer_kwargs={"dt": 0.9}), width=OUT,
        network=True),
    "network_cornn": Case(functools.partial(_network, functools.partial(CoRNN, dt=0.3)), width=OUT, network=True),
    "network_lem": Case(functools.partial(_network, functools.partial(LEM, dt=0.7), dropout=0.2), width=OUT,
                        network=True),
    "dense_indrnn": Case(functools.partial(
        DenseIndRNN, functools.partial(IndRNN, magnitude=5.0, bound_steps=12, batch_norm="after",
                                       batch_norm_stats="per_step"),
        I, OUT, growth_rate=2, block_config=(2, 1), readout="all"), width=OUT, network=True),
}

REGISTRY: dict[str, Case] = {**LAYERS, **NETWORKS}
