"""The state contract, for every layer and network in tests/registry.py: running a sequence in one
call equals running it in chunks (of 1, 7 and T/2 steps) with the returned state passed back, in
values (float64) and in gradients, both through the carried state and within each chunk when the
state is detached between chunks (truncated BPTT); ``initial_state(module, B)`` behaves as None; and
``reset_streams`` restarts exactly the chosen streams (tests/test_state_reset.py). Batch norm is
compared in evaluation mode. The one exemption: a bidirectional layer refuses a carried state, in one line."""
import functools

import pytest
import torch

from src.layers import Bidirectional, ClockworkRNN, IndRNN
from src.networks import RecurrentNetwork
from src.state import detach_state, state_tensors
from tests.registry import LAYERS, REGISTRY

T, B = 16, 2
CHUNKS = (1, 7, T // 2)


def prepared(name):
    """The entry in float64 and evaluation mode, after one training pass (non-trivial BN statistics)."""
    case = REGISTRY[name]
    module = (case() if case.network else case(batch_first=True)).double()
    with torch.no_grad():
        module.train()
        module(torch.randn(B + 3, T, case.input_size, dtype=torch.float64) * 2 + 0.5)
    return case, module.eval()


def run_chunks(module, x, size, carry=lambda state: state):
    outputs, state = [], None
    for start in range(0, x.shape[1], size):
        output, state = module(x[:, start:start + size], state)
        outputs.append(output)
        state = carry(state)
    return torch.cat(outputs, dim=1), state


def assert_same_state(actual, expected):
    assert type(actual) is type(expected) or isinstance(actual, torch.Tensor)
    for a, e in zip(state_tensors(actual), state_tensors(expected), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    ints = lambda state: [s for s in (state if isinstance(state, (tuple, list)) else [state]) if isinstance(s, int)]
    assert ints(actual) == ints(expected)


@pytest.mark.parametrize("name", REGISTRY)
def test_chunks_with_the_carried_state_equal_one_call(name):
    case, module = prepared(name)
    x = torch.randn(B, T, case.input_size, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(B, T, case.width, dtype=torch.float64)
    whole, final = module(x)
    assert whole.shape == (B, T, case.width)
    parameters = [p for p in module.parameters() if p.requires_grad]
    expected = torch.autograd.grad((whole * weights).sum(), [x, *parameters])
    for size in CHUNKS:
        chunked, state = run_chunks(module, x, size)
        torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-12, msg=f"chunks of {size}")
        assert_same_state(state, final)
        gradients = torch.autograd.grad((chunked * weights).sum(), [x, *parameters])
        for got, want in zip(gradients, expected):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=f"gradient, chunks of {size}")


@pytest.mark.parametrize("name", REGISTRY)
def test_gradients_within_each_chunk_with_the_state_detached(name):
    """Truncated BPTT: with detach_state between chunks, the gradient of a chunk's outputs with respect
    to that chunk's inputs equals the one-call gradient (paths inside the chunk are the same)."""
    case, module = prepared(name)
    x = torch.randn(B, T, case.input_size, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(B, T, case.width, dtype=torch.float64)
    whole, _ = module(x)
    for size in CHUNKS[1:2]:
        chunked, _ = run_chunks(module, x, size, carry=detach_state)
        for start in range(0, T, size):
            window = slice(start, start + size)
            (want,) = torch.autograd.grad((whole[:, window] * weights[:, window]).sum(), x, retain_graph=True)
            (got,) = torch.autograd.grad((chunked[:, window] * weights[:, window]).sum(), x, retain_graph=True)
            torch.testing.assert_close(got[:, window], want[:, window], rtol=1e-9, atol=1e-11)
            assert got[:, :start].abs().max() == 0 if start else True  # nothing flows past a detached state


@pytest.mark.parametrize("name", [n for n, case in LAYERS.items() if not n.startswith(("rnn", "lstm", "gru", "irnn"))])
def test_unbatched_chunks_and_initial_state(name):
    """(T, I) inputs carry unbatched states ((k, F) tensors); initial_state(B) equals starting from None."""
    case = LAYERS[name]
    layer = case().double().eval()
    x = torch.randn(T, B, case.input_size, dtype=torch.float64)
    whole, _ = layer(x)
    first, state = layer(x[:5, 0])
    second, _ = layer(x[5:, 0], state)
    torch.testing.assert_close(torch.cat([first, second]), whole[:, 0], rtol=1e-10, atol=1e-12)
    if hasattr(layer, "initial_state"):
        torch.testing.assert_close(layer(x, layer.initial_state(B))[0], whole, rtol=0, atol=0)


@pytest.mark.parametrize("layer", [torch.nn.GRU, functools.partial(ClockworkRNN, num_modules=2),
                                   functools.partial(IndRNN, u_bound=1.0, projection="conv1d")])
def test_a_bidirectional_layer_refuses_a_carried_state_in_one_line(layer):
    wrapped = Bidirectional(layer, 3, 4, batch_first=True)
    x = torch.randn(B, 6, 3)
    output, state = wrapped(x)  # the final state is still reported
    assert output.shape == (B, 6, 8) and state_tensors(state)
    with pytest.raises(ValueError, match="Bidirectional layers take no carried state") as error:
        wrapped(x, state)
    assert "\n" not in str(error.value)
    network = RecurrentNetwork(layer, 3, 2, hidden_size=4, num_layers=2, bidirectional=True)
    _, states = network(x)
    with pytest.raises(ValueError, match="Bidirectional layers take no carried state"):
        network(x, states)


def test_a_network_state_has_one_entry_per_layer():
    network = RecurrentNetwork(torch.nn.GRU, 3, 2, hidden_size=4, num_layers=3)
    _, states = network(torch.randn(B, 5, 3))
    assert len(states) == 3
    with pytest.raises(ValueError, match=r"RecurrentNetwork state must be a list of 3 layer states \(one per layer\), "
                                         "got 2 entries"):
        network(torch.randn(B, 5, 3), states[:2])
