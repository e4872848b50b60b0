"""Layers: torch.nn.RNN's contract, IndRNN's recurrence and constraint, IRNN's initialisation."""
import functools

import pytest
import torch

from src.layers import IRNN, IndRNN
from src.networks import RecurrentNetwork
from tests.registry import LAYERS

T, B, I, H = 7, 3, 4, 5


def final_hidden(state):
    """The last hidden state (1, B, H) in any layer's state: LSTM's h of (h, c), an IndRNNState's h."""
    return state[0] if isinstance(state, tuple) else state


@pytest.mark.parametrize("name", ["rnn", "irnn", "lstm", "gru", "indrnn_auto", "indrnn_bn_after", "indrnn_conv1d"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_shapes_and_final_state(name, batch_first):
    case = LAYERS[name]
    layer = case(batch_first=batch_first).eval()
    x = torch.randn(B, T, case.input_size) if batch_first else torch.randn(T, B, case.input_size)
    output, state = layer(x)
    assert output.shape == ((B, T, case.width) if batch_first else (T, B, case.width))
    assert final_hidden(state).shape == (1, B, case.width)
    if name != "indrnn_bn_after":  # with BN after, the output is normalised; the state is the recurrent h
        last = output[:, -1] if batch_first else output[-1]
        torch.testing.assert_close(final_hidden(state)[0], last)


def test_indrnn_state_is_the_recurrent_state_not_the_batch_normalised_output():
    layer = IndRNN(I, H, u_bound=1.0, batch_norm="after")
    with torch.no_grad():
        layer.norm_after.running_mean.fill_(0.7)  # non-trivial statistics: output != state
    layer.eval()
    x = torch.randn(T, B, I)
    output, state = layer(x)
    recurrence_only = IndRNN(I, H, u_bound=1.0)
    recurrence_only.load_state_dict(layer.state_dict(), strict=False)
    hidden, _ = recurrence_only(x)
    torch.testing.assert_close(state[0], hidden[-1])
    assert not torch.allclose(state[0], output[-1])


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


def test_indrnn_bound_from_magnitude_and_initialisations():  # bound_steps is T in MAG^(1/T)
    bound = 2.0 ** (1 / 100)
    assert IndRNN(I, H, magnitude=2.0, bound_steps=100).u_bound == pytest.approx(bound)
    big = 4096
    u = IndRNN(1, big, magnitude=2.0, bound_steps=100).recurrence.weight_hh
    assert 0 <= u.min() and u.max() <= bound
    u = IndRNN(1, big, magnitude=2.0, bound_steps=100, recurrent_init="long_memory").recurrence.weight_hh
    assert u.min() >= 1 / bound and u.max() <= bound
    u = IndRNN(1, big, u_bound=0.5, recurrent_init="uniform01").recurrence.weight_hh
    assert u.max() <= 0.5  # U(0,1) draws are clamped into the bound


def test_indrnn_constraint_holds_after_optimizer_steps():
    torch.manual_seed(0)
    network = RecurrentNetwork(functools.partial(IndRNN, magnitude=2.0, bound_steps=T), I, 1, hidden_size=H,
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
    ({"dropout": 1.5}, r"dropout must be a number in \[0.0, 1.0\), got 1.5"),
    ({"readout": "first"}, "unknown readout"),
])
def test_network_rejects_impossible_sizes(kwargs, message):
    arguments = dict(layer=torch.nn.GRU, input_size=I, output_size=1) | kwargs
    with pytest.raises(ValueError, match=message):
        RecurrentNetwork(**arguments)


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_size": -3}, "hidden_size must be a positive integer"),
    ({"nonlinearity": "sigmoid"}, "unknown IndRNN nonlinearity"),
    ({"magnitude": 2.0}, "needs bound_steps"),
    ({"batch_norm": "after", "batch_norm_stats": "per_step", "u_bound": 1.0}, "per_step' needs bound_steps"),
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
    with pytest.raises(ValueError, match=r"IndRNN hx must have shape \(1, 3, 5\), got \(3, 5\)"):
        layer(torch.randn(T, B, I), torch.zeros(B, H))
    with pytest.raises(ValueError, match=r"IndRNN state.inputs must have shape \(2, 3, 4\)"):
        IndRNN(I, H, projection="conv1d")(torch.randn(T, B, I), (torch.zeros(1, B, H), torch.zeros(1, B, I), 0))


@pytest.mark.parametrize("readout, shape", [("last", (B, 2)), ("mean", (B, 2)), ("all", (B, T, 2))])
def test_network_readouts(readout, shape):
    network = RecurrentNetwork(torch.nn.LSTM, I, 2, hidden_size=H, num_layers=2, dropout=0.2,
                               projection_size=6, readout=readout)
    prediction, states = network(torch.randn(B, T, I))
    assert prediction.shape == shape and len(states) == 2


@pytest.mark.parametrize("readout", ["last", "mean", "all"])
def test_readouts_respect_lengths(readout):
    """A right-padded batch reads out each sequence as if it were alone, at its own length."""
    torch.manual_seed(0)
    network = RecurrentNetwork(torch.nn.GRU, I, 2, hidden_size=H, num_layers=2, readout=readout).eval()
    lengths = torch.tensor([T, 3, 5])
    x = torch.randn(B, T, I)
    padded = x.clone()
    for row, length in enumerate(lengths):
        padded[row, length:] = 100.0  # padding that would change any readout that saw it
    prediction, _ = network(padded, lengths=lengths)
    for row, length in enumerate(lengths.tolist()):
        alone, _ = network(x[row:row + 1, :length])
        if readout == "all":  # every step unchanged: the objective masks the padded ones
            torch.testing.assert_close(prediction[row:row + 1, :length], alone)
        else:
            torch.testing.assert_close(prediction[row:row + 1], alone)
    if readout != "all":  # without lengths the padding is read
        assert not torch.allclose(network(padded)[0][1:], prediction[1:])
