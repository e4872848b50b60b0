"""The bidirectional wrapper: equals torch's own bidirectional GRU, wraps our layers (also those whose
state is more than h), and is what model.bidirectional / model.layer.bidirectional build."""
import functools

import pytest
import torch
from hydra.utils import instantiate

from src.layers import ClockworkRNN, IndRNN
from src.layers.bidirectional import Bidirectional
from src.networks import RecurrentNetwork

T, B, I, H = 7, 3, 4, 6


def test_matches_torch_bidirectional_gru():
    torch.manual_seed(0)
    reference = torch.nn.GRU(I, H, bidirectional=True, batch_first=True)
    wrapped = Bidirectional(torch.nn.GRU, I, H, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(wrapped.forward_layer, f"{name}_l0").copy_(getattr(reference, f"{name}_l0"))
            getattr(wrapped.backward_layer, f"{name}_l0").copy_(getattr(reference, f"{name}_l0_reverse"))
    x = torch.randn(B, T, I)
    expected, expected_h = reference(x)
    output, h_n = wrapped(x)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(h_n, expected_h)


def test_lstm_states_are_stacked_per_item():
    wrapped = Bidirectional(torch.nn.LSTM, I, H)
    output, (h_n, c_n) = wrapped(torch.randn(T, B, I))
    assert output.shape == (T, B, 2 * H) and h_n.shape == (2, B, H) and c_n.shape == (2, B, H)


def test_backward_direction_reads_the_future_only():
    wrapped = Bidirectional(functools.partial(ClockworkRNN, num_modules=2), I, H)
    x = torch.randn(T, B, I)
    changed = x.clone()
    changed[5] += 1.0
    before, after = wrapped(x)[0], wrapped(changed)[0]
    torch.testing.assert_close(before[:5, :, :H], after[:5, :, :H])      # forward: steps < 5 unchanged
    torch.testing.assert_close(before[6:, :, H:], after[6:, :, H:])      # backward: steps > 5 unchanged
    assert not torch.allclose(before[5, :, H:], after[5, :, H:])


def test_states_that_are_more_than_h_are_reported_per_direction():
    wrapped = Bidirectional(functools.partial(ClockworkRNN, num_modules=2), I, H)
    _, state = wrapped(torch.randn(T, B, I))
    assert state.h.shape == (2, B, H) and state.step == T  # both directions read T steps
    wrapped = Bidirectional(functools.partial(IndRNN, u_bound=1.0, projection="conv1d", kernel_size=3), I, H)
    _, state = wrapped(torch.randn(T, B, I))
    assert state.h.shape == (2, B, H) and state.inputs.shape == (4, B, I)


@pytest.mark.parametrize("flag", ["model.bidirectional=true", "model.layer.bidirectional=true"])
def test_indrnn_config_builds_bidirectional_layers(train_cfg, flag):
    """Both flags (which failed with "unexpected keyword argument 'recurrent_init'" when the last layer's
    settings reached the wrapper) give wrapped IndRNN layers, the last with the long-memory init."""
    cfg = train_cfg(["model=indrnn", "model.hidden_size=8", flag])
    network = instantiate(cfg.model)
    assert all(isinstance(layer, Bidirectional) and isinstance(layer.forward_layer, IndRNN) for layer in network.layers)
    assert network.layers[-1].forward_layer.recurrence.recurrent_init == "long_memory"
    prediction, _ = network(torch.randn(2, cfg.task.seq_len, cfg.task.input_size))
    assert prediction.shape == (2, cfg.task.output_size)


def test_network_stacks_bidirectional_layers_of_any_kind():
    layer = functools.partial(Bidirectional, functools.partial(IndRNN, u_bound=1.0))
    network = RecurrentNetwork(layer, I, 2, hidden_size=H, num_layers=2)
    assert network.layers[1].input_size == 2 * H
    prediction, states = network(torch.randn(B, T, I))
    assert prediction.shape == (B, 2) and states[0].shape == (2, B, H)
