"""Clockwork RNN: torch.nn.RNN's contract, the clock (kept states, slow -> fast flow only), the fused
recurrence against the dense masked reference (values, gradients, gradcheck), the masked weights,
argument errors, the model config and a short learning run."""
import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.func import functional_call

from src.kernels import clockwork_recurrence
from src.kernels.clockwork import active_modules, clockwork_mask, clockwork_reference, clockwork_schedule
from src.layers.clockwork import ClockworkRNN, ClockworkState
from tests.registry import CLOCKWORK_H, CLOCKWORK_MODULES, LAYERS

T, B, I, H, G = 19, 3, 4, CLOCKWORK_H, CLOCKWORK_MODULES  # 4 modules of 4 units, periods 1, 2, 4, 8
BACKENDS = ("fused", "reference")


def make_layer(backend="fused", dtype=torch.float32, seed=0, **kwargs):
    """The registry's Clockwork layer (recurrent weights scaled up) with this backend, dtype and settings."""
    return LAYERS["clockwork"](seed=seed, backend=backend, dtype=dtype, **kwargs)


def units(module, size=H // G):
    return slice(module * size, (module + 1) * size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_final_state_and_layouts(backend):
    layer = make_layer(backend)
    x = torch.randn(T, B, I)
    output, (h_n, step) = layer(x)
    assert output.shape == (T, B, H) and h_n.shape == (1, B, H) and step == T
    assert torch.equal(h_n[0], output[-1])
    # batch_first in and out, with the same parameters
    layer_bf = make_layer(backend, batch_first=True)
    output_bf, state_bf = layer_bf(x.transpose(0, 1))
    assert output_bf.shape == (B, T, H)
    torch.testing.assert_close(output_bf.transpose(0, 1), output)
    torch.testing.assert_close(state_bf.h, h_n)
    # unbatched (T, I) with hx (1, H)
    hx = torch.randn(1, B, H)
    output_hx, _ = layer(x, hx)
    single, state_single = layer(x[:, 1], hx[:, 1])
    assert single.shape == (T, H) and state_single.h.shape == (1, H) and state_single.step == T
    torch.testing.assert_close(single, output_hx[:, 1])
    with pytest.raises(ValueError, match=r"hx must have shape \(1, 3, 16\)"):
        layer(x, torch.zeros(2, B, H))
    for bad_step in (-1, torch.zeros(B + 1, dtype=torch.long), torch.zeros(B)):  # an int >= 0 or one per stream
        with pytest.raises(ValueError, match=r"ClockworkRNN state.step must be an int >= 0 or a \(3,\) int64 tensor"):
            layer(x, ClockworkState(hx, bad_step))
    with pytest.raises(ValueError, match="expects input of shape"):
        layer(torch.randn(T, B, I + 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("time_origin", [0, 1])
def test_inactive_modules_keep_their_state_bit_for_bit(backend, time_origin):
    layer = make_layer(backend, time_origin=time_origin)
    hx = torch.randn(1, B, H)
    output, _ = layer(torch.randn(T, B, I), hx)
    previous = torch.cat([hx, output[:-1]])
    updated = set()
    for t in range(T):
        active = active_modules(layer.periods, t + time_origin)
        for module in range(G):
            same = torch.equal(output[t, :, units(module)], previous[t, :, units(module)])
            assert same == (module not in active), (t, module)  # active ones do move (weights are large)
            if module in active:
                updated.add(module)
    assert updated == set(range(G))
    assert active_modules(layer.periods, time_origin) == ([0, 1, 2, 3] if time_origin == 0 else [0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("time_origin", [0, 1])
def test_fast_modules_never_reach_slow_ones(backend, time_origin):
    layer = make_layer(backend, time_origin=time_origin)
    x, hx = torch.randn(T, B, I), torch.randn(1, B, H)
    base, _ = layer(x, hx)
    # A different initial state of module 0 (period 1) leaves modules 1..3 exactly unchanged.
    hx_perturbed = hx.clone()
    hx_perturbed[..., units(0)] += 1.0
    perturbed, _ = layer(x, hx_perturbed)
    assert not torch.equal(perturbed[:, :, units(0)], base[:, :, units(0)])
    assert torch.equal(perturbed[:, :, H // G:], base[:, :, H // G:])
    # A different input at a step where only modules 0..k-1 run never reaches modules k..G-1.
    for k in (1, 2, 3):
        step = next(t for t in range(T) if len(active_modules(layer.periods, t + time_origin)) == k)
        x_perturbed = x.clone()
        x_perturbed[step] += 1.0
        perturbed, _ = layer(x_perturbed, hx)
        assert torch.equal(perturbed[:step], base[:step])
        assert not torch.equal(perturbed[step, :, : k * H // G], base[step, :, : k * H // G])
        assert torch.equal(perturbed[:, :, k * H // G:], base[:, :, k * H // G:]), k


def run_with_grads(layer, x, hx, grad_output):
    x, hx = x.clone().requires_grad_(), hx.clone().requires_grad_()
    output, (h_n, step) = layer(x, hx)
    (output * grad_output).sum().backward()
    grads = [x.grad, hx.grad] + [p.grad for p in (layer.weight_ih, layer.weight_hh, layer.bias)]
    return [output.detach(), h_n.detach(), torch.tensor(step)] + grads


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("periods", [None, (1, 3, 5, 7)])  # powers of two: prefixes; 1, 3, 5, 7: any subset
@pytest.mark.parametrize("time_origin", [0, 1])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "identity"])
def test_fused_matches_dense_reference(dtype, tolerance, periods, time_origin, nonlinearity):
    settings = dict(dtype=dtype, periods=periods, time_origin=time_origin, nonlinearity=nonlinearity)
    fused, reference = make_layer("fused", **settings), make_layer("reference", **settings)
    if nonlinearity == "identity":  # keep the linear recurrence from blowing up over T steps
        for layer in (fused, reference):
            with torch.no_grad():
                layer.weight_hh.mul_(0.1)
    x, hx, grad_output = (torch.randn(*shape, dtype=dtype) for shape in ((T, B, I), (1, B, H), (T, B, H)))
    names = ["output", "h_n", "step", "input", "hx", "weight_ih", "weight_hh", "bias"]
    for name, a, b in zip(names, run_with_grads(fused, x, hx, grad_output),
                          run_with_grads(reference, x, hx, grad_output)):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, hx)[0], reference(x, hx)[0], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("time_origin", [0, 1])
@pytest.mark.parametrize("periods, bias", [((1, 2, 4), True), ((1, 2, 3), True), ((2, 3, 4), False)])
def test_gradcheck_float64(time_origin, periods, bias):
    layer = ClockworkRNN(2, 6, num_modules=3, periods=periods, bias=bias, time_origin=time_origin,
                         dtype=torch.float64)
    names = ["weight_ih", "weight_hh"] + (["bias"] if bias else [])

    def run(x, hx, *params):
        return functional_call(layer, dict(zip(names, params)), (x, hx))[0]

    torch.manual_seed(0)
    inputs = (torch.randn(9, 2, 2, dtype=torch.float64, requires_grad=True),
              torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True),
              *(getattr(layer, name).detach().clone().requires_grad_() for name in names))
    assert torch.autograd.gradcheck(run, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_masked_blocks_get_no_gradient_and_stay_zero(backend, optimizer):
    layer = make_layer(backend)
    lower = ~layer.mask
    assert lower.sum() == H * H - H * H // G * (G + 1) // 2  # the strictly lower blocks
    assert torch.all(layer.weight_hh[lower] == 0) and torch.all(layer.weight_hh[layer.mask] != 0)
    optim = (torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1) if optimizer == "adamw"
             else torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1))
    for _ in range(3):
        optim.zero_grad()
        layer(torch.randn(T, B, I))[0].pow(2).sum().backward()
        assert torch.all(layer.weight_hh.grad[lower] == 0)
        assert torch.count_nonzero(layer.weight_hh.grad[layer.mask]) > 0
        optim.step()
        assert torch.all(layer.weight_hh[lower] == 0)
    # Even a weight written from outside is masked in the forward pass and re-zeroed by the constraint.
    with torch.no_grad():
        layer.weight_hh.fill_(0.01)
    x = torch.randn(T, B, I)
    output, _ = layer(x)
    layer.constrain_parameters_()
    assert torch.all(layer.weight_hh[lower] == 0)
    torch.testing.assert_close(layer(x)[0], output, rtol=0, atol=0)


def test_explicit_periods_and_mask():
    layer = ClockworkRNN(3, 12, num_modules=3, periods=[1, 3, 9])
    assert layer.periods == (1, 3, 9) and layer.module_size == 4
    expected = torch.tensor([[m_col >= m_row for m_col in range(3)] for m_row in range(3)])
    assert torch.equal(layer.mask, expected.repeat_interleave(4, 0).repeat_interleave(4, 1))
    assert torch.equal(clockwork_mask(12, 3), layer.mask)
    assert ClockworkRNN(3, 16).periods == (1, 2, 4, 8, 16, 32, 64, 128)
    output, _ = layer(torch.randn(10, 2, 3))
    for t in range(1, 10):  # module 2 (period 9) runs at t = 0 and 9 only
        assert torch.equal(output[t, :, 8:], output[t - 1, :, 8:]) == (t != 9)
    # The schedule: one pattern per distinct active set, each a list of unit runs.
    pattern_of_step, patterns = clockwork_schedule((1, 3, 5), 2, 16, 0)
    assert patterns[pattern_of_step[5]] == (((0, 2), (4, 6)), ((2, 4),))  # modules 0 and 2 of 3 run at t=5
    assert patterns[pattern_of_step[15]] == (((0, 6),), ())


@pytest.mark.parametrize("time_origin", [0, 1])
def test_the_state_carries_the_clock(time_origin):
    """The returned state holds the step counter: a continued sequence keeps its phase (a plain h would
    restart the clock at time_origin), and the counter runs on past lcm(periods) without changing the
    schedule."""
    layer = make_layer(time_origin=time_origin)
    x = torch.randn(T, B, I)
    whole, final = layer(x)
    first, state = layer(x[:7])
    assert state.step == time_origin + 7
    second, final_chunked = layer(x[7:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole)
    assert final_chunked.step == final.step == time_origin + T
    restarted, _ = layer(x[7:], state.h)  # h alone: the clock restarts, so the modules run at other steps
    assert not torch.allclose(restarted, second)
    later, _ = layer(x, ClockworkState(torch.zeros(1, B, H), time_origin + 8 * 1000))  # 8 = lcm(1, 2, 4, 8)
    torch.testing.assert_close(later, whole)


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=10, num_modules=4), r"hidden_size 10 is not divisible by num_modules 4: use a multiple of 4"),
    (dict(periods=[4, 2, 1, 8]), r"periods must be strictly increasing"),
    (dict(periods=[1, 2, 2, 8]), r"periods must be strictly increasing"),
    (dict(periods=[0, 1, 2, 4]), r"periods must be a non-empty list of integers >= 1"),
    (dict(periods=[1, 2.5, 4, 8]), r"periods must be a non-empty list of integers >= 1"),
    (dict(periods=[1, 2, 4]), r"periods has 3 entries but num_modules is 4"),
    (dict(num_modules=0), r"num_modules must be a positive integer"),
    (dict(nonlinearity="sigmoid"), r"unknown Clockwork nonlinearity"),
    (dict(time_origin=-1), r"time_origin must be a non-negative integer"),
    (dict(backend="cuda"), r"unknown Clockwork backend 'cuda'; choose one of \('auto', 'fused', 'cpu'"),
])
def test_bad_arguments_raise_one_line(kwargs, message):
    arguments = {"input_size": I, "hidden_size": H, "num_modules": G, **kwargs}
    with pytest.raises(ValueError, match=message) as error:
        ClockworkRNN(**arguments)
    assert "\n" not in str(error.value)


def test_functional_api_checks_shapes():
    x, w_ih, b, w_hh, h0 = torch.randn(5, 2, 3), torch.randn(8, 3), torch.randn(8), torch.randn(8, 8), torch.zeros(2, 8)
    for bias in (b, None):
        torch.testing.assert_close(clockwork_recurrence(x, w_ih, bias, w_hh, h0, (1, 2)),
                                   clockwork_reference(x, w_ih, bias, w_hh, h0, (1, 2)))
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="needs weight_ih"):
            clockwork_recurrence(x, w_ih, b, w_hh, torch.zeros(3, 8), (1, 2), backend=backend)
        with pytest.raises(ValueError, match="not divisible"):
            clockwork_recurrence(x, w_ih, b, w_hh, h0, (1, 2, 4), backend=backend)
    # One backend vocabulary (src.kernels.BACKENDS): IndRNN's kernel names are not Clockwork's.
    with pytest.raises(ValueError, match="backend 'cpu' is an IndRNN kernel; Clockwork takes one of"):
        clockwork_recurrence(x, w_ih, b, w_hh, h0, (1, 2), backend="cpu")


def test_model_config_builds_a_clockwork_network(train_cfg):
    cfg = train_cfg(["model=cwrnn"])
    network = instantiate(cfg.model)
    (layer,) = network.layers
    assert isinstance(layer, ClockworkRNN) and layer.batch_first
    assert (layer.hidden_size, layer.num_modules, layer.nonlinearity) == (128, 8, "tanh")
    x = torch.randn(2, cfg.task.seq_len, cfg.task.input_size)
    prediction, (state,) = network(x)
    assert prediction.shape == (2, cfg.task.output_size) and state.h.shape == (1, 2, 128)
    assert state.step == cfg.task.seq_len


def test_learns_to_continue_sine_waves():
    """Next-value prediction of sine waves with random frequency and phase: the MSE falls >10x in 100 steps."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    layer, head = ClockworkRNN(1, 32, num_modules=4, batch_first=True), nn.Linear(32, 1)
    optimizer = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=1e-2)

    def batch(size):
        frequency = 0.3 + 0.5 * torch.rand(size, 1, generator=generator)
        phase = 2 * math.pi * torch.rand(size, 1, generator=generator)
        wave = torch.sin(frequency * torch.arange(21) + phase).unsqueeze(-1)
        return wave[:, :-1], wave[:, 1:]

    def loss(x, y):
        return nn.functional.mse_loss(head(layer(x)[0]), y)

    x_val, y_val = batch(256)
    with torch.no_grad():
        before = loss(x_val, y_val).item()
    for _ in range(100):
        optimizer.zero_grad()
        loss(*batch(32)).backward()
        optimizer.step()
        layer.constrain_parameters_()
    with torch.no_grad():
        after = loss(x_val, y_val).item()
    assert before > 0.3 and after < before / 10, (before, after)


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") == "1", reason="CPU tensors run under the interpreter")
def test_triton_backend_off_cuda_is_a_one_line_error():
    # The persistent kernel (src/kernels/dense_triton.py) runs on CUDA; its exactness against the loop is
    # checked under Triton's interpreter (tests/test_kernels_triton_layers.py).
    layer = ClockworkRNN(3, 8, num_modules=2, backend="triton")
    with pytest.raises(ValueError, match="ClockworkRNN backend 'triton' needs the triton package and CUDA"):
        layer(torch.randn(4, 2, 3))
