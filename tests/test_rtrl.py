"""Real-time recurrent learning: exact gradients equal BPTT's, the layer-local variant's error,
the fused sensitivity loops against the plain loop, and memory that does not grow with T."""
from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.recurrence import _cpu_peak_bytes
from src.kernels.rtrl import sensitivity_chunk
from src.kernels.rtrl_cpu import numba_chunk_applies
from src.kernels.rtrl_triton import triton_chunk_applies
from src.layers import IndRNN
from src.layers import DiagonalLeakyRNN
from src.learning import RTRL
from src.networks import RecurrentNetwork
from src.state import reset_streams

DOUBLE = torch.float64
BATCH, INPUTS, HIDDEN, OUTPUTS = 3, 3, 4, 2


def indrnn(nonlinearity: str, backend: str = "reference"):
    return functools.partial(IndRNN, nonlinearity=nonlinearity, u_bound=1.0, backend=backend)


def make_net(layer, num_layers: int, seed: int = 0, hidden: int = HIDDEN) -> RecurrentNetwork:
    torch.manual_seed(seed)
    net = RecurrentNetwork(layer, input_size=INPUTS, output_size=OUTPUTS, hidden_size=hidden,
                           num_layers=num_layers, readout="all").to(DOUBLE)
    with torch.no_grad():  # u anywhere in [-1, 1], biases non-zero: every relu unit switches on and off
        for module in net.modules():
            if isinstance(module, IndRNN):
                module.recurrence.weight_hh.uniform_(-1.0, 1.0)
                module.projection.bias.uniform_(-0.3, 0.3)
    return net


def problem(steps: int, num_layers: int, hidden: int = HIDDEN, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(BATCH, steps, INPUTS, generator=generator, dtype=DOUBLE)
    targets = torch.randn(BATCH, steps, OUTPUTS, generator=generator, dtype=DOUBLE)
    initial = [torch.randn(1, BATCH, hidden, generator=generator, dtype=DOUBLE) * 0.5 for _ in range(num_layers)]
    # A loss at every third step and the last one: steps without a loss must carry sensitivities too.
    weights = torch.zeros(steps, dtype=DOUBLE)
    weights[::3] = 1.0
    weights[-1] = 1.0
    return inputs, targets, initial, weights


def step_losses(predictions, targets, weights):
    """Sum over steps of weight_t * squared error: predictions/targets (B, K, O), weights (K,)."""
    return (((predictions - targets) ** 2).sum(dim=(0, 2)) * weights).sum()


def bptt_gradients(net, inputs, targets, initial, weights) -> list[torch.Tensor]:
    predictions, _ = net(inputs, initial)
    return list(torch.autograd.grad(step_losses(predictions, targets, weights), list(net.parameters())))


def rtrl_gradients(net, inputs, targets, initial, weights, mode="exact", chunk=5,
                   backend="auto") -> list[torch.Tensor]:
    net.zero_grad(set_to_none=True)
    rtrl = RTRL(net, mode=mode, backend=backend)
    rtrl.reset(BATCH, initial)
    for start in range(0, inputs.shape[1], chunk):
        stop = min(start + chunk, inputs.shape[1])

        def loss_fn(predictions, start=start, stop=stop):
            chunk_weights = weights[start:stop]
            return step_losses(predictions, targets[:, start:stop], chunk_weights) if chunk_weights.any() else None
        rtrl.accumulate(inputs[:, start:stop], loss_fn)
    return [p.grad.clone() for p in net.parameters()]


def relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest |got - expected| over all parameters, relative to the largest |expected|."""
    scale = max(float(g.abs().max()) for g in expected)
    return max(float((a - b).abs().max()) for a, b in zip(got, expected)) / scale


@pytest.mark.parametrize("steps", [1, 7, 500])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("nonlinearity", ["relu", "tanh", "identity"])
def test_exact_rtrl_equals_bptt(nonlinearity, num_layers, steps):
    net = make_net(indrnn(nonlinearity), num_layers)
    inputs, targets, initial, weights = problem(steps, num_layers)
    expected = bptt_gradients(net, inputs, targets, initial, weights)
    got = rtrl_gradients(net, inputs, targets, initial, weights, chunk=128 if steps > 100 else 3)
    assert [p.grad is not None for p in net.parameters()] == [True] * len(expected)
    assert relative_error(got, expected) < 1e-10


@pytest.mark.parametrize("alpha_mode", ["fixed", "learned"])
@pytest.mark.parametrize("recurrent", [True, False])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_diagonal_leaky_exact_rtrl_equals_bptt(alpha_mode, recurrent, num_layers):
    layer = functools.partial(DiagonalLeakyRNN, nonlinearity="tanh", alpha_mode=alpha_mode,
                              alpha_range=(0.2, 0.9), recurrent=recurrent)
    net = make_net(layer, num_layers)
    inputs, targets, initial, weights = problem(40, num_layers)
    expected = bptt_gradients(net, inputs, targets, initial, weights)
    assert relative_error(rtrl_gradients(net, inputs, targets, initial, weights), expected) < 1e-10


def test_one_chunk_and_many_chunks_agree_with_every_backend():
    net = make_net(indrnn("relu"), 1)
    inputs, targets, initial, weights = problem(60, 1)
    expected = bptt_gradients(net, inputs, targets, initial, weights)
    backends = ["reference"] + (["cpu"] if numba_chunk_applies(inputs) else [])
    for backend in backends:
        for chunk in (1, 7, 60):
            got = rtrl_gradients(net, inputs, targets, initial, weights, chunk=chunk, backend=backend)
            assert relative_error(got, expected) < 1e-10, (backend, chunk)


@pytest.mark.parametrize("layer", ["indrnn", "diagonal_leaky"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_restarting_streams_mid_sequence_equals_bptt_through_the_state_contracts_reset(num_layers, layer):
    """RTRL.reset_streams between chunks: predictions and gradients equal BPTT's over the network's own
    reset_streams (src/state.py): the kept streams carry on (their graph too), the restarted ones start fresh."""
    layer = indrnn("tanh") if layer == "indrnn" else functools.partial(
        DiagonalLeakyRNN, nonlinearity="tanh", alpha_mode="learned", alpha_range=(0.2, 0.9))
    net = make_net(layer, num_layers)
    inputs, targets, initial, weights = problem(12, num_layers)
    restart, split = torch.tensor([False, True, True]), 5
    first, state = net(inputs[:, :split], initial)
    second, _ = net(inputs[:, split:], reset_streams(net, state, restart))
    expected_predictions = torch.cat([first, second], dim=1)
    expected = bptt_gradients_of(net, step_losses(expected_predictions, targets, weights))
    net.zero_grad(set_to_none=True)
    rtrl = RTRL(net, mode="exact")
    rtrl.reset(BATCH, initial)
    predictions = []
    for start, stop in ((0, 3), (3, split), (split, 9), (9, 12)):
        if start == split:
            rtrl.reset_streams(restart)
        predictions.append(rtrl.accumulate(inputs[:, start:stop], lambda p, a=start, b=stop: step_losses(
            p, targets[:, a:b], weights[a:b]))[1])
    torch.testing.assert_close(torch.cat(predictions, dim=1), expected_predictions.detach(), rtol=1e-10, atol=1e-12)
    assert relative_error([p.grad for p in net.parameters()], expected) < 1e-10


def bptt_gradients_of(net, loss) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(net.parameters())))


@pytest.mark.parametrize("steps", [7, 500])
def test_layer_local_variant_error_is_reported(steps, record_property):
    """One layer: layer-local is exact. Stacks: an approximation; its error is measured, not asserted."""
    errors = {}
    for nonlinearity in ("relu", "tanh", "identity"):
        for num_layers in (1, 2):
            net = make_net(indrnn(nonlinearity), num_layers)
            inputs, targets, initial, weights = problem(steps, num_layers)
            expected = bptt_gradients(net, inputs, targets, initial, weights)
            got = rtrl_gradients(net, inputs, targets, initial, weights, mode="layer_local", chunk=100)
            errors[f"{nonlinearity}_L{num_layers}"] = relative_error(got, expected)
            # The top layer's own parameters and the head get exact gradients in any stack.
            top = list(net.layers[-1].parameters()) + list(net.head.parameters())
            names = {id(p) for p in top}
            pairs = [(a, b) for a, b, p in zip(got, expected, net.parameters()) if id(p) in names]
            assert relative_error(*zip(*pairs)) < 1e-10
    print(f"layer-local RTRL, relative gradient error vs BPTT at T={steps}: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    record_property("layer_local_relative_error", errors)
    for key, value in errors.items():
        if key.endswith("L1"):
            assert value < 1e-10
        else:
            assert 0 < value < float("inf")


def random_chunk(steps, batch, hidden, inputs, n_diag, dtype, with_grad, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    read = dict(carry=rand(steps, batch, hidden) * 0.5, gain=rand(steps, batch, hidden), inputs=rand(steps, batch, inputs),
                direct=rand(n_diag, steps, batch, hidden),
                grad_h=rand(steps, batch, hidden) if with_grad else None)
    if with_grad:  # no loss at some steps, as under a "last" readout
        read["grad_h"][::2] = 0
    state = dict(s_diag=rand(n_diag, batch, hidden), s_weight=rand(batch, hidden, inputs),
                 grad_diag=rand(n_diag, hidden), grad_weight=rand(hidden, inputs))
    return read, state


def run_chunk(read, state, backend):
    state = {k: v.clone() for k, v in state.items()}
    sensitivity_chunk(**read, **state, backend=backend)
    return state


@pytest.mark.skipif(not numba_chunk_applies(torch.zeros(1)), reason="numba is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_diag", [0, 2, 3])
@pytest.mark.parametrize("with_grad", [True, False])
def test_numba_sensitivity_loop_equals_plain_loop(dtype, n_diag, with_grad):
    read, state = random_chunk(37, 3, 5, 4, n_diag, dtype, with_grad)
    expected, got = run_chunk(read, state, "reference"), run_chunk(read, state, "cpu")
    tolerance = 1e-12 if dtype == torch.float64 else 1e-4
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=tolerance, atol=tolerance)


def _triton_cases():
    if triton_chunk_applies(torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return None


@pytest.mark.skipif(_triton_cases() is None,
                    reason="needs triton with CUDA, or with TRITON_INTERPRET=1 set before triton is imported")
@pytest.mark.parametrize("n_diag", [0, 3])
@pytest.mark.parametrize("shape", [(19, 3, 5, 4), (6, 2, 70, 40)])
def test_triton_sensitivity_kernel_equals_plain_loop(n_diag, shape):
    device = _triton_cases()
    read, state = random_chunk(*shape, n_diag, torch.float32, True)
    move = {k: (v.to(device) if v is not None else None) for k, v in read.items()}
    expected = run_chunk(read, state, "reference")
    got = run_chunk(move, {k: v.to(device) for k, v in state.items()}, "triton")
    for key in expected:
        torch.testing.assert_close(got[key].cpu(), expected[key], rtol=1e-4, atol=1e-4)


def rtrl_training_step(net, inputs, targets, chunk: int) -> None:
    """One online training sequence: a loss at the last step, an optimizer update at the end."""
    rtrl = RTRL(net, mode="exact")
    rtrl.reset(inputs.shape[0])
    steps = inputs.shape[1]
    for start in range(0, steps, chunk):
        last = start + chunk >= steps
        rtrl.accumulate(inputs[:, start:start + chunk],
                        lambda p, last=last: ((p[:, -1] - targets) ** 2).mean() if last else None)
    with torch.no_grad():
        for p in net.parameters():
            p -= 1e-3 * p.grad
            p.grad = None


def test_rtrl_memory_does_not_grow_with_sequence_length():
    torch.manual_seed(0)
    net = RecurrentNetwork(functools.partial(IndRNN, u_bound=1.0), input_size=2, output_size=1, hidden_size=8,
                           num_layers=1, readout="all")
    targets = torch.rand(2, 1)
    rtrl_training_step(net, torch.rand(2, 1_000, 2), targets, chunk=1_000)  # numba compiled or loaded from cache
    peaks = {}
    for steps in (1_000, 100_000):
        inputs = torch.rand(2, steps, 2)  # allocated before the measurement: the data, not the learner
        peaks[steps] = _cpu_peak_bytes(lambda: rtrl_training_step(net, inputs, targets, chunk=1_000))
    print(f"RTRL training step peak memory: T=1,000 {peaks[1_000] / 2**10:.1f} KiB, "
          f"T=100,000 {peaks[100_000] / 2**10:.1f} KiB")
    assert abs(peaks[100_000] - peaks[1_000]) <= 0.1 * peaks[1_000]


def test_rtrl_rejects_what_it_cannot_train_exactly():
    with pytest.raises(ValueError, match="diagonal recurrences only"):
        RTRL(RecurrentNetwork(torch.nn.LSTM, input_size=2, output_size=1, hidden_size=4))
    with pytest.raises(ValueError, match="batch_norm='none'"):
        RTRL(RecurrentNetwork(functools.partial(IndRNN, u_bound=1.0, batch_norm="after"), input_size=2,
                              output_size=1, hidden_size=4))
    with pytest.raises(ValueError, match="dropout"):
        RTRL(RecurrentNetwork(functools.partial(IndRNN, u_bound=1.0), input_size=2, output_size=1, hidden_size=4,
                              num_layers=2, dropout=0.1))
    with pytest.raises(ValueError, match="unknown RTRL mode"):
        RTRL(make_net(indrnn("relu"), 1), mode="approximate")
    rtrl = RTRL(make_net(indrnn("relu"), 1))
    with pytest.raises(RuntimeError, match="reset"):
        rtrl.accumulate(torch.zeros(BATCH, 2, INPUTS, dtype=DOUBLE), lambda p: None)


def test_rtrl_trains_online_with_updates_inside_the_sequence():
    """A leaky sum (y_t = 0.9 y_{t-1} + x_t at every step) of one long stream, an update every 20 steps."""
    torch.manual_seed(0)
    net = RecurrentNetwork(functools.partial(IndRNN, u_bound=1.0, nonlinearity="identity"), input_size=1,
                           output_size=1, hidden_size=8, num_layers=1, readout="all")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    rtrl = RTRL(net)
    rtrl.reset(8)
    stream = torch.randn(8, 4_000, 1)
    targets = torch.empty_like(stream)
    running = torch.zeros(8, 1)
    for t in range(stream.shape[1]):
        running = targets[:, t] = 0.9 * running + stream[:, t]
    losses = []
    for start in range(0, stream.shape[1], 20):
        target = targets[:, start:start + 20]
        loss, _ = rtrl.accumulate(stream[:, start:start + 20], lambda p, target=target: ((p - target) ** 2).mean())
        optimizer.step()
        optimizer.zero_grad()
        net.apply_constraints()
        losses.append(float(loss))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.1 * first, (first, last)
