"""Classic recurrent layers (leaky, skip-through-time, Jordan, NARX, TDNN): torch.nn.RNN's contract,
each recurrence against torch.nn.RNN or a hand-written loop, causality and receptive fields,
argument errors, the model configs and a short training run on the adding problem."""
import json

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from lightning_modules.run import train
from src.layers.common import apply_constraints
from src.state import state_tensors
from src.layers.jordan import JordanRNN
from src.layers.leaky import LeakyRNN
from src.layers.narx import NARX
from src.layers.skip import SkipRNN
from src.layers.tdnn import TDNN
from src.networks import RecurrentNetwork
from tests.conftest import QUICK, compose_train
from tests.registry import LAYERS

T, B, I, H = 12, 3, 4, 8
CLASSIC = ["leaky", "leaky_learned", "skip", "jordan", "narx", "tdnn"]  # registry entries, I = 4, H = 8
MODEL_CONFIGS = {"leaky_rnn": LeakyRNN, "skip_rnn": SkipRNN, "jordan": JordanRNN, "narx": NARX, "tdnn": TDNN}


def build(name, seed=0, **kwargs):
    return LAYERS[name](seed=seed, **kwargs)


def copy_into_rnn(layer, weight_hh, nonlinearity="tanh"):
    rnn = nn.RNN(I, H, nonlinearity=nonlinearity)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(layer.weight_ih)
        rnn.weight_hh_l0.copy_(weight_hh)
        rnn.bias_ih_l0.copy_(layer.bias)
        rnn.bias_hh_l0.zero_()
    return rnn


# --- the common contract -------------------------------------------------------------------------

@pytest.mark.parametrize("name", CLASSIC)
def test_shapes_layouts_and_unbatched(name):
    layer = build(name)
    x = torch.randn(T, B, I)
    output, state = layer(x)
    assert output.shape == (T, B, H)
    bf = build(name, batch_first=True)
    output_bf, state_bf = bf(x.transpose(0, 1))
    assert output_bf.shape == (B, T, H)
    torch.testing.assert_close(output_bf.transpose(0, 1), output)
    single, state_single = layer(x[:, 1])
    assert single.shape == (T, H)
    torch.testing.assert_close(single, output[:, 1])
    for batched, unbatched in zip(state_tensors(state), state_tensors(state_single)):  # the batch axis is dim 1
        torch.testing.assert_close(unbatched, batched[:, 1])
    with pytest.raises(ValueError, match="expects input of shape"):
        layer(torch.randn(T, B, I + 1))
    output.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("name", ["leaky", "leaky_learned", "skip", "jordan"])
def test_hx_is_the_state_before_the_first_step_and_is_checked(name):
    """torch.nn.RNN's hx (1, B, H) is h_{-1} (SkipRNN: older states zero); other shapes are one-line errors."""
    layer = build(name)
    x = torch.randn(T, B, I)
    hx = torch.randn(1, B, H)
    output, state = layer(x, hx)
    single, state_one = layer(x[:, 0], hx[:, 0])
    torch.testing.assert_close(single, output[:, 0])
    torch.testing.assert_close(state_one[-1], state[-1, 0])  # the last hidden state / output
    torch.testing.assert_close(state[-1], output[-1])
    wrong = r"SkipRNN state \(the last max\(delays\) states\) must have shape \(3, 3, 8\)" if name == "skip" \
        else r"hx .*must have shape \(1, 3, 8\)"
    with pytest.raises(ValueError, match=wrong) as error:
        layer(x, torch.zeros(2, B, H))
    assert "\n" not in str(error.value)


# Leaky with alpha = 0 and skip with the one delay 1 are the Elman recurrence: torch.nn.RNN with their weights.
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("make, recurrent_weight", [
    (lambda nonlinearity: LeakyRNN(I, H, alpha_range=(0.0, 0.0), nonlinearity=nonlinearity),
     lambda layer: layer.weight_hh),
    (lambda nonlinearity: SkipRNN(I, H, delays=[1], nonlinearity=nonlinearity), lambda layer: layer.weight_hh[0]),
], ids=["leaky-alpha-zero", "skip-delay-one"])
def test_degenerate_settings_are_torch_rnn(make, recurrent_weight, nonlinearity):
    layer = make(nonlinearity)
    rnn = copy_into_rnn(layer, recurrent_weight(layer), nonlinearity)
    x, hx = torch.randn(T, B, I), torch.randn(1, B, H)
    output, h_n = layer(x, hx)
    expected, expected_h = rnn(x, hx)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(h_n, expected_h)


@pytest.mark.parametrize("factory, message", [
    (lambda: LeakyRNN(I, 0), "hidden_size must be a positive integer"),
    (lambda: LeakyRNN(I, H, nonlinearity="sigmoid"), "unknown LeakyRNN nonlinearity"),
    (lambda: LeakyRNN(I, H, alpha_mode="slow"), "unknown LeakyRNN alpha_mode"),
    (lambda: LeakyRNN(I, H, alpha_range=(0.9, 0.1)), "low <= high"),
    (lambda: LeakyRNN(I, H, alpha_range=(0.0, 1.5)), r"in \[0, 1\]"),
    (lambda: LeakyRNN(I, H, alpha_mode="learned", alpha_range=(0.5, 1.5)), r"alpha values must be in \[0, 1\]"),
    (lambda: LeakyRNN(I, H, alpha_groups=[0.1, 0.2, 0.3]), "not a multiple of 3 groups"),
    (lambda: SkipRNN(I, H, delays=[]), "delays must be a non-empty list of integers >= 1"),
    (lambda: SkipRNN(I, H, delays=[1, 0]), "delays must be a non-empty list of integers >= 1"),
    (lambda: SkipRNN(I, H, delays=[1, 2, 2]), "must be distinct"),
    (lambda: JordanRNN(I, H, output_nonlinearity="softmax"), "unknown JordanRNN output_nonlinearity"),
    (lambda: JordanRNN(I, H, output_size=0), "output_size must be a positive integer"),
    (lambda: NARX(I, H, input_delays=-1), "input_delays must be a non-negative integer"),
    (lambda: NARX(I, H, output_delays=0), "output_delays must be a positive integer"),
    (lambda: NARX(I, H, mlp_hidden=0), "mlp_hidden must be a positive integer"),
    (lambda: TDNN(I, H, window=0), "window must be a positive integer"),
    (lambda: TDNN(I, H, dilation=0), "dilation must be a positive integer"),
    (lambda: TDNN(I, H, nonlinearity="gelu"), "unknown TDNN nonlinearity"),
    (lambda: NARX(I, H, nonlinearity="gelu"), "unknown NARX nonlinearity"),
])
def test_bad_arguments_are_one_line_value_errors(factory, message):
    with pytest.raises(ValueError, match=message) as info:
        factory()
    assert "\n" not in str(info.value)


# --- LeakyRNN ------------------------------------------------------------------------------------

def test_leaky_update_mixes_old_state_and_elman_step_per_unit():
    layer = LeakyRNN(I, H, alpha_groups=[0.0, 0.5, 0.9, 1.0])
    torch.testing.assert_close(layer.alpha, torch.tensor([0.0] * 2 + [0.5] * 2 + [0.9] * 2 + [1.0] * 2))
    x, hx = torch.randn(T, B, I), torch.randn(1, B, H)
    output, _ = layer(x, hx)
    h, alpha = hx[0], layer.alpha
    for t in range(T):
        h = alpha * h + (1 - alpha) * torch.tanh(x[t] @ layer.weight_ih.T + h @ layer.weight_hh.T + layer.bias)
        torch.testing.assert_close(output[t], h)
    torch.testing.assert_close(output[:, :, -2:], hx[0, :, -2:].expand(T, B, 2))  # alpha = 1: frozen units


def test_leaky_fixed_alpha_is_a_saved_buffer_in_range():
    layer = LeakyRNN(I, 64, alpha_range=(0.3, 0.6))
    assert "alpha_value" in layer.state_dict() and not any("alpha" in n for n, _ in layer.named_parameters())
    assert 0.3 <= layer.alpha.min() and layer.alpha.max() <= 0.6 and layer.alpha.std() > 0
    other = LeakyRNN(I, 64, alpha_range=(0.3, 0.6))
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.alpha, layer.alpha)


def test_learned_alpha_stays_in_bounds_under_a_huge_learning_rate():
    torch.manual_seed(0)
    layer = LeakyRNN(I, H, alpha_mode="learned", alpha_groups=[0.1, 0.9])
    torch.testing.assert_close(layer.alpha, torch.tensor([0.1] * 4 + [0.9] * 4))
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e4)
    x = torch.randn(T, B, I)
    for step in range(20):
        optimizer.zero_grad()
        output, _ = layer(x)
        ((output - (1 if step % 2 else -1)) ** 2).mean().backward()
        optimizer.step()
        assert torch.isfinite(layer.alpha).all() and (layer.alpha >= 0).all() and (layer.alpha <= 1).all()
        apply_constraints(layer)
        assert (layer.alpha > 0).all() and (layer.alpha < 1).all()
    assert layer.alpha_logit.grad is not None


# --- SkipRNN -------------------------------------------------------------------------------------

def test_skip_matches_a_hand_written_loop_with_zero_history_before_hx():
    layer = build("skip")  # delays [1, 3]
    x, hx = torch.randn(T, B, I), torch.randn(1, B, H)
    output, state = layer(x, hx)
    torch.testing.assert_close(state, output[-3:])  # the last max(delays) states, oldest first
    states = {-1: hx[0]}
    for t in range(T):
        total = x[t] @ layer.weight_ih.T + layer.bias
        for k, d in enumerate(layer.delays):
            total = total + states.get(t - d, torch.zeros(B, H)) @ layer.weight_hh[k].T
        states[t] = torch.tanh(total)
        torch.testing.assert_close(output[t], states[t])


def test_skip_connection_carries_a_perturbation_d_steps_directly():
    layer = SkipRNN(I, H, delays=[1, 3])
    with torch.no_grad():
        layer.weight_hh[0].zero_()  # no one-step recurrence: only the delay-3 path is left
    x = torch.randn(T, B, I, requires_grad=True)
    output, _ = layer(x)
    t = 2
    for later, reached in ((t + 1, False), (t + 2, False), (t + 3, True), (t + 6, True), (t + 4, False)):
        (grad,) = torch.autograd.grad(output[later].sum(), x, retain_graph=True)
        assert bool(grad[t].abs().sum() > 0) == reached, later


# --- JordanRNN -----------------------------------------------------------------------------------

@pytest.mark.parametrize("output_size", [None, 5])
def test_jordan_feeds_back_exactly_the_previous_output(output_size):
    torch.manual_seed(0)
    layer = JordanRNN(I, H, output_size=output_size, nonlinearity="relu", output_nonlinearity="tanh")
    width = output_size or H
    x, hx = torch.randn(T, B, I), torch.randn(1, B, width)
    output, h_n = layer(x, hx)
    assert output.shape == (T, B, width) and h_n.shape == (1, B, width)
    y = hx[0]
    for t in range(T):
        h = torch.relu(x[t] @ layer.weight_ih.T + y @ layer.weight_fb.T + layer.bias_h)
        y = torch.tanh(h @ layer.weight_out.T + layer.bias_out)
        torch.testing.assert_close(output[t], y)
    torch.testing.assert_close(h_n[0], y)


# --- NARX ----------------------------------------------------------------------------------------

def narx_loop(layer, x, y_past, x_past):
    q, p = layer.input_delays, layer.output_delays
    xs, ys = list(x_past) + list(x), list(y_past)
    w_x = layer.weight_x.reshape(layer.mlp_hidden, q + 1, I)
    w_y = layer.weight_y.reshape(layer.mlp_hidden, p, H)
    outputs = []
    for t in range(x.shape[0]):
        now = q + t  # index of x_t in xs
        pre = layer.bias_mlp.clone()
        for k in range(q + 1):
            pre = pre + xs[now - k] @ w_x[:, k].T
        for k in range(1, p + 1):
            pre = pre + ys[-k] @ w_y[:, k - 1].T
        y = torch.tanh(torch.tanh(pre) @ layer.weight_out.T + layer.bias_out)
        ys.append(y)
        outputs.append(y)
    return torch.stack(outputs)


def test_narx_feeds_back_exactly_its_own_past_outputs_and_inputs():
    layer = build("narx")  # q = 2, p = 3
    x = torch.randn(T, B, I)
    output, (y_past, x_past) = layer(x)
    torch.testing.assert_close(output, narx_loop(layer, x, torch.zeros(3, B, H), torch.zeros(2, B, I)))
    torch.testing.assert_close(y_past, output[-3:])
    torch.testing.assert_close(x_past, x[-2:])
    hx = (torch.randn(3, B, H), torch.randn(2, B, I))
    torch.testing.assert_close(layer(x, hx)[0], narx_loop(layer, x, *hx))
    # chunks with the state passed on equal the whole sequence
    first, state = layer(x[:1], hx)
    second, _ = layer(x[1:], state)
    torch.testing.assert_close(torch.cat([first, second]), layer(x, hx)[0])
    with pytest.raises(ValueError, match=r"NARX hx must be a tuple \(y_past, x_past\)"):
        layer(x, torch.zeros(1, B, H))


def test_narx_is_causal():
    layer = build("narx")
    x = torch.randn(T, B, I)
    output, _ = layer(x)
    for t in (0, 4, T - 2):
        changed = x.clone()
        changed[t + 1:] = torch.randn(T - t - 1, B, I)
        torch.testing.assert_close(layer(changed)[0][: t + 1], output[: t + 1], rtol=0, atol=0)
        assert not torch.allclose(layer(changed)[0][t + 1], output[t + 1])


# --- TDNN ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("window, dilation", [(1, 1), (3, 1), (3, 2), (4, 3)])
def test_tdnn_sees_exactly_its_window_and_is_causal(window, dilation):
    torch.manual_seed(0)
    layer = TDNN(I, H, window=window, dilation=dilation)
    steps = 20
    x = torch.randn(steps, B, I, requires_grad=True)
    output, state = layer(x)
    assert state.shape == ((window - 1) * dilation, B, I)  # the input steps the next chunk still needs
    torch.testing.assert_close(state, x[steps - (window - 1) * dilation:].detach())
    t = 15
    (grad,) = torch.autograd.grad(output[t].sum(), x)
    seen = {s for s in range(steps) if grad[s].abs().sum() > 0}
    assert seen == {t - k * dilation for k in range(window)}
    assert layer.receptive_field == (window - 1) * dilation + 1
    changed = x.detach().clone()
    changed[t + 1:] = torch.randn(steps - t - 1, B, I)
    torch.testing.assert_close(layer(changed)[0][: t + 1], output[: t + 1].detach(), rtol=0, atol=0)


def test_tdnn_matches_the_delay_line_sum_and_checks_its_state():
    layer = build("tdnn")  # window 3, dilation 2
    x = torch.randn(T, B, I)
    output, _ = layer(x)
    weight, bias = layer.weight, layer.bias
    conv = nn.Conv1d(I, H, 3, dilation=2)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    padded = nn.functional.pad(x.permute(1, 2, 0), (4, 0))
    torch.testing.assert_close(output, torch.tanh(conv(padded)).permute(2, 0, 1))
    for t in range(T):
        total = bias.clone()
        for k in range(3):
            if t - 2 * k >= 0:
                total = total + x[t - 2 * k] @ weight[:, :, 2 - k].T
        torch.testing.assert_close(output[t], torch.tanh(total))
    with pytest.raises(ValueError, match=r"TDNN state \(the last receptive_field - 1 inputs\) must have shape "
                                         r"\(4, 3, 4\), got \(1, 3, 8\)"):
        layer(x, torch.zeros(1, B, H))


@pytest.mark.parametrize("window, dilation", [(1, 1), (3, 2), (4, 3)])
def test_tdnn_gpu_convolution_equals_the_cpu_taps_in_float64(window, dilation):
    # The CUDA path (one causal F.conv1d) against the CPU path (one matmul over stacked taps), values and
    # gradients of the inputs, the carried past inputs, weight and bias, on a chunk that starts from a state.
    from src.layers.tdnn import causal_conv, causal_taps

    generator = torch.Generator().manual_seed(window)
    memory = (window - 1) * dilation
    padded = torch.randn(memory + 11, B, I, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(H, I, window, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(H, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(11, B, H, generator=generator, dtype=torch.float64)
    results = []
    for compute in (causal_taps, causal_conv):
        output = compute(padded, weight, bias, dilation)
        results.append((output, *torch.autograd.grad(output, (padded, weight, bias), grad)))
    for taps, conv in zip(*results):
        torch.testing.assert_close(conv, taps, rtol=1e-12, atol=1e-12)


# --- configs and training --------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_config_builds_a_network(tmp_path, name):
    cfg = compose_train(tmp_path, [f"model={name}", "model.hidden_size=16"])
    network = instantiate(cfg.model).eval()
    assert isinstance(network, RecurrentNetwork) and len(network.layers) == cfg.model.num_layers
    assert all(type(layer) is MODEL_CONFIGS[name] and layer.hidden_size == 16 and layer.batch_first
               for layer in network.layers)
    inputs = torch.randn(2, 7, cfg.task.input_size)
    predictions, states = network(inputs)
    assert predictions.shape == (2, cfg.task.output_size) and len(states) == cfg.model.num_layers
    # The states passed back continue the sequences: 3 + 4 steps equal 7 in one call.
    _, first = network(inputs[:, :3])
    torch.testing.assert_close(network(inputs[:, 3:], first)[0], predictions)


@pytest.mark.slow  # make test trains each of these models through train() in tests/test_train.py (fast_dev_run)
@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_short_training_on_the_adding_problem_finishes(tmp_path, name):
    run = tmp_path / "run"
    train(compose_train(run, [f"model={name}", *QUICK, "model.hidden_size=16", "trainer.max_steps=30",
                              "task.stop_at=null", "logger=csv"]))
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished" and results["model"] == name and results["steps"] == 30
    assert results["test/mse"] == results["test/mse"]  # not NaN
