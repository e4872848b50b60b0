"""The bidirectional wrapper: equals torch's own bidirectional GRU, and wraps our layers."""
import functools

import torch

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
    x, h0 = torch.randn(B, T, I), torch.randn(2, B, H)
    expected, expected_h = reference(x, h0)
    output, h_n = wrapped(x, h0)
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


def test_network_stacks_bidirectional_layers_of_any_kind():
    layer = functools.partial(Bidirectional, functools.partial(IndRNN, u_bound=1.0))
    network = RecurrentNetwork(layer, I, 2, hidden_size=H, num_layers=2)
    assert network.layers[1].input_size == 2 * H
    prediction, states = network(torch.randn(B, T, I))
    assert prediction.shape == (B, 2) and states[0].shape == (2, B, H)
