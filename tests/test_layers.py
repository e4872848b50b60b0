"""Layers: torch.nn.RNN's contract, IndRNN's recurrence and constraint, IRNN's initialisation."""
import functools

import pytest
import torch

from src.layers import IRNN, IndRNN
from src.networks import RecurrentNetwork

T, B, I, H = 7, 3, 4, 5

LAYERS = {
    "rnn": functools.partial(torch.nn.RNN, nonlinearity="tanh"),
    "irnn": IRNN,
    "lstm": torch.nn.LSTM,
    "gru": torch.nn.GRU,
    "indrnn": functools.partial(IndRNN, magnitude=2.0, seq_len=T),
}


def final_hidden(h_n):
    return h_n[0] if isinstance(h_n, tuple) else h_n  # LSTM returns (h_n, c_n)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_shapes_and_final_state(name, batch_first):
    layer = LAYERS[name](input_size=I, hidden_size=H, batch_first=batch_first)
    x = torch.randn(B, T, I) if batch_first else torch.randn(T, B, I)
    output, h_n = layer(x)
    assert output.shape == ((B, T, H) if batch_first else (T, B, H))
    assert final_hidden(h_n).shape == (1, B, H)
    last = output[:, -1] if batch_first else output[-1]
    torch.testing.assert_close(final_hidden(h_n)[0], last)


@pytest.mark.parametrize("name", LAYERS)
def test_initial_state_is_used_and_states_chain(name):
    """Running two halves with the carried state equals one run over the whole sequence."""
    torch.manual_seed(0)
    layer = LAYERS[name](input_size=I, hidden_size=H, batch_first=True)
    x = torch.randn(B, T, I)
    whole, _ = layer(x)
    first, state = layer(x[:, :3])
    second, _ = layer(x[:, 3:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)


@pytest.mark.parametrize("activation", ["relu", "tanh", "identity"])
def test_indrnn_equals_hand_written_loop(activation):
    torch.manual_seed(0)
    layer = IndRNN(I, H, nonlinearity=activation, u_bound=1.5, recurrent_init="uniform01")
    W, b, u = layer.projection.weight, layer.projection.bias, layer.recurrence.weight_hh
    with torch.no_grad():
        b.uniform_(-0.5, 0.5)
    x, h0 = torch.randn(T, B, I), torch.randn(1, B, H)
    act = {"relu": torch.relu, "tanh": torch.tanh, "identity": lambda a: a}[activation]
    h = h0[0]
    expected = []
    for t in range(T):
        h = act(x[t] @ W.T + b + u * h)
        expected.append(h)
    output, h_n = layer(x, h0)
    torch.testing.assert_close(output, torch.stack(expected))
    torch.testing.assert_close(h_n[0], expected[-1])


def test_indrnn_unbatched_input():
    layer = IndRNN(I, H, u_bound=1.0)
    x = torch.randn(T, I)
    output, h_n = layer(x)
    assert output.shape == (T, H) and h_n.shape == (1, H)
    torch.testing.assert_close(output, layer(x.unsqueeze(1))[0][:, 0])


def test_indrnn_bound_from_magnitude_and_initialisations():
    bound = 2.0 ** (1 / 100)
    assert IndRNN(I, H, magnitude=2.0, seq_len=100).u_bound == pytest.approx(bound)
    big = 4096
    u = IndRNN(1, big, magnitude=2.0, seq_len=100).recurrence.weight_hh
    assert 0 <= u.min() and u.max() <= bound
    u = IndRNN(1, big, magnitude=2.0, seq_len=100, recurrent_init="long_memory").recurrence.weight_hh
    assert u.min() >= 1 / bound and u.max() <= bound
    u = IndRNN(1, big, u_bound=0.5, recurrent_init="uniform01").recurrence.weight_hh
    assert u.max() <= 0.5  # U(0,1) draws are clamped into the bound


def test_indrnn_constraint_holds_after_optimizer_steps():
    torch.manual_seed(0)
    network = RecurrentNetwork(functools.partial(IndRNN, magnitude=2.0, seq_len=T), I, 1, hidden_size=H,
                               num_layers=2)
    # Adam moves every weight by ~lr per step, far past the bound (~1.1), without overflowing.
    optimizer = torch.optim.Adam(network.parameters(), lr=1.0)
    for _ in range(5):
        optimizer.zero_grad()
        prediction, _ = network(torch.randn(B, T, I))
        (-prediction.sum()).backward()
        optimizer.step()
        network.apply_constraints()
        for layer in network.layers:
            assert layer.recurrence.weight_hh.abs().max() <= layer.u_bound + 1e-7


def test_irnn_initialisation():
    layer = IRNN(I, H)
    torch.testing.assert_close(layer.weight_hh_l0, torch.eye(H))
    assert layer.bias_ih_l0.abs().max() == 0 and layer.bias_hh_l0.abs().max() == 0
    assert layer.weight_ih_l0.std() < 0.01
    with pytest.raises(ValueError, match="ReLU"):
        IRNN(I, H, nonlinearity="tanh")


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"num_layers": 0}, "num_layers must be a positive integer"),
    ({"dropout": 1.5}, "dropout must be in"),
    ({"readout": "first"}, "unknown readout"),
])
def test_network_rejects_impossible_sizes(kwargs, message):
    arguments = dict(layer=torch.nn.GRU, input_size=I, output_size=1) | kwargs
    with pytest.raises(ValueError, match=message):
        RecurrentNetwork(**arguments)


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_size": -3}, "hidden_size must be a positive integer"),
    ({"nonlinearity": "sigmoid"}, "unknown IndRNN nonlinearity"),
    ({"magnitude": 2.0}, "needs seq_len"),
    ({"u_bound": 0.0}, "u_bound must be > 0"),
    ({"recurrent_init": "long_memory"}, "needs u_bound"),
    ({"backend": "cuda_magic"}, "unknown IndRNN backend"),
])
def test_indrnn_rejects_bad_arguments(kwargs, message):
    arguments = dict(input_size=I, hidden_size=H) | kwargs
    with pytest.raises(ValueError, match=message):
        IndRNN(**arguments)


def test_indrnn_rejects_wrong_input_shape():
    layer = IndRNN(I, H)
    with pytest.raises(ValueError, match=r"expects input of shape"):
        layer(torch.randn(T, B, I + 1))
    with pytest.raises(ValueError, match=r"hx must have shape"):
        layer(torch.randn(T, B, I), torch.zeros(B, H))


@pytest.mark.parametrize("readout, shape", [("last", (B, 2)), ("mean", (B, 2)), ("all", (B, T, 2))])
def test_network_readouts(readout, shape):
    network = RecurrentNetwork(torch.nn.LSTM, I, 2, hidden_size=H, num_layers=2, dropout=0.2,
                               projection_size=6, readout=readout)
    prediction, states = network(torch.randn(B, T, I))
    assert prediction.shape == shape and len(states) == 2
