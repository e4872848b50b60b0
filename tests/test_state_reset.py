"""Per-stream restarts and initial states (src/state.py), for every layer and network in tests/registry.py.

``reset_streams(module, state, restart)`` must leave the streams with restart=True exactly as if they
started afresh (the stream run alone from None) and every other stream exactly as if nothing happened
(the whole sequence run in one call), over the chunk after the reset and the one after that (so the
state returned after a reset carries on too, per-stream step counters included); ``initial_state``
must behave as None. Float64, evaluation mode (batch norm on its running statistics).
"""
import functools

import pytest
import torch

from src.layers import Bidirectional, ClockworkRNN, IndRNN, SkipRNN, TimeBatchNorm
from src.networks import RecurrentNetwork
from src.state import initial_state, merge_streams, reset_streams, state_tensors
from tests.registry import PER_STEP, REGISTRY
from tests.test_host_sync import counting_read_backs
from tests.test_state_contract import assert_same_state, prepared

B = 4
FIRST, SECOND, THIRD = 5, 7, 4  # steps before the reset, after it, and after that (odd: clock phases differ)
RESTARTS = {"stream_1": [False, True, False, False], "random": [True, False, True, True],
            "every_stream": [True] * B, "no_stream": [False] * B}


@pytest.mark.parametrize("restart", RESTARTS)
@pytest.mark.parametrize("name", REGISTRY)
def test_restarted_streams_start_afresh_and_the_others_carry_on(name, restart):
    case, module = prepared(name)
    restart = torch.tensor(RESTARTS[restart])
    x = torch.randn(B, FIRST + SECOND + THIRD, case.input_size, dtype=torch.float64)
    before, after = x[:, :FIRST], x[:, FIRST:]
    whole, _ = module(x)
    _, state = module(before)
    state = reset_streams(module, state, restart)
    second, state = module(after[:, :SECOND], state)
    third, _ = module(after[:, SECOND:], state)
    carried_on = torch.cat([second, third], dim=1)
    for stream in range(B):
        if restart[stream]:
            want = module(after[stream:stream + 1])[0][0]
        else:
            want = whole[stream, FIRST:]
        torch.testing.assert_close(carried_on[stream], want, rtol=1e-10, atol=1e-12, msg=f"stream {stream}")


@pytest.mark.parametrize("name", REGISTRY)
def test_initial_state_behaves_as_none(name):
    case, module = prepared(name)
    x = torch.randn(B, 6, case.input_size, dtype=torch.float64)
    start = initial_state(module, B)
    assert all(t.dtype == torch.float64 for t in state_tensors(start))
    whole, final = module(x)
    from_initial, final_from_initial = module(x, start)
    torch.testing.assert_close(from_initial, whole, rtol=0, atol=0)
    assert_same_state(final_from_initial, final)
    # every stream restarted: the same tensors as initial_state (counters may be per-stream tensors of its int)
    _, state = module(x)
    restarted = reset_streams(module, state, torch.ones(B, dtype=torch.bool))
    floating = lambda state: [t for t in state_tensors(state) if t.is_floating_point()]  # noqa: E731
    for got, want in zip(floating(restarted), floating(start), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_counter_stays_an_int_while_every_stream_shares_it_then_one_step_per_stream():
    layer = ClockworkRNN(3, 8, num_modules=2, periods=(1, 3))
    start = layer.initial_state(B)
    assert reset_streams(layer, start, torch.tensor([True, False, False, True])).step == 0  # nothing differs
    _, state = layer(torch.randn(5, B, 3))
    assert state.step == 5
    assert reset_streams(layer, state, None) is state
    mixed = reset_streams(layer, state, torch.tensor([True, False, False, True]))
    assert mixed.step.tolist() == [0, 5, 5, 0] and mixed.step.dtype == torch.long
    _, later = layer(torch.randn(2, B, 3), mixed)
    assert later.step.tolist() == [2, 7, 7, 2]  # one clock per stream from now on


def test_per_stream_steps_equal_to_a_shared_step_give_the_shared_numbers_in_training():
    """Per-step batch norm in training: running statistics and outputs with a (B,) step tensor whose
    entries are all s equal the int path at step s (the fast path, unchanged); mixed steps move each row
    toward the statistics that fell on it."""
    torch.manual_seed(0)
    shared, per_stream = TimeBatchNorm(6, "per_step", max_steps=10), TimeBatchNorm(6, "per_step", max_steps=10)
    x = torch.randn(7, B, 6, dtype=torch.float64)
    shared.double(), per_stream.double()
    want = shared(x, 5)
    got = per_stream(x, torch.full((B,), 5, dtype=torch.long))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(per_stream.running_mean, shared.running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(per_stream.running_var, shared.running_var, rtol=1e-12, atol=1e-14)
    mixed = TimeBatchNorm(6, "per_step", max_steps=10).double()
    mixed(x, torch.tensor([0, 0, 9, 9]))
    # Streams 0, 1 put position t on row t; streams 2, 3 put position 0 on row 9 and the rest past the last row.
    momentum, mean = mixed.momentum, x.mean(dim=1)
    expected = torch.zeros(10, 6, dtype=torch.float64)
    expected[:7], expected[9] = momentum * mean, momentum * mean[0]
    torch.testing.assert_close(mixed.running_mean, expected, rtol=1e-12, atol=1e-14)


def test_a_bidirectional_layer_restarts_nothing_but_none():
    network = RecurrentNetwork(torch.nn.GRU, 3, 2, hidden_size=4, num_layers=2, bidirectional=True)
    assert initial_state(network, B) == [None, None]
    assert reset_streams(network, [None, None], torch.ones(B, dtype=torch.bool)) == [None, None]
    _, states = network(torch.randn(B, 5, 3))
    with pytest.raises(ValueError, match="Bidirectional layers take no carried state"):
        reset_streams(network, states, torch.ones(B, dtype=torch.bool))
    assert isinstance(network.layers[0], Bidirectional)


def test_bad_restart_flags_and_foreign_states_are_one_line_errors():
    layer = IndRNN(3, 4, u_bound=1.0)
    _, state = layer(torch.randn(5, B, 3))
    for bad, expected in ((torch.ones(B), "restart must be a \\(B,\\) bool tensor"),
                          (torch.ones(B, 1, dtype=torch.bool), "restart must be a \\(B,\\) bool tensor")):
        with pytest.raises(ValueError, match=expected) as error:
            reset_streams(layer, state, bad)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="pass the state the module returned"):
        reset_streams(layer, torch.zeros(2, B, 4), torch.ones(B, dtype=torch.bool))
    with pytest.raises(ValueError, match="a step counter must be an int or one step per stream"):
        merge_streams(torch.ones(B, dtype=torch.bool), 0, torch.zeros(B + 1, dtype=torch.long))
    with pytest.raises(TypeError, match="defines no initial_state"):
        initial_state(torch.nn.Linear(2, 2), B)


@pytest.mark.parametrize("layer", [
    functools.partial(ClockworkRNN, num_modules=2, periods=(1, 3)),
    functools.partial(IndRNN, u_bound=1.0, projection="conv1d", batch_norm="after", backend="reference", **PER_STEP),
    torch.nn.LSTM, functools.partial(SkipRNN, delays=(1, 3))], ids=["clockwork", "indrnn_per_step_bn", "lstm", "skip"])
def test_a_partial_restart_and_training_on_after_it_read_nothing_back_to_the_host(layer):
    """On a GPU a read-back stalls the pipeline: reset_streams and the per-stream paths it leads to (Clockwork's
    clocks, per-step batch norm's rows, in training) make none."""
    network = RecurrentNetwork(layer, 3, 2, hidden_size=8, num_layers=2, readout="all").train()
    x = torch.randn(B, 6, 3)
    _, state = network(x)
    counts: dict[str, int] = {}
    with counting_read_backs(counts):
        state = reset_streams(network, state, torch.tensor([True, False, True, False]))
        output, state = network(x, state)
        output.sum().backward()
        reset_streams(network, state, torch.tensor([False, True, False, False]))
    assert counts == {}
