"""coRNN, UnICORNN and LEM: each layer against a float64 numpy loop written from the papers'
equations; UnICORNN's fused kernels (numba CPU, Triton under the interpreter) against the float64
reference loop, values and gradients (gradcheck); backend and argument errors in one line.
(The state contract of all three is checked with every layer in tests/test_state_contract.py.)"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from src.kernels import numba_available
from src.kernels.unicornn_cpu import UnICORNNRecurrenceCPU, unicornn_recurrence, unicornn_recurrence_reference
from src.layers import LEM, CoRNN, UnICORNN

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_numba = pytest.mark.skipif(not numba_available(), reason="numba is not installed")
T, B, I, H = 11, 3, 4, 5


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def numpy_of(tensor):
    return tensor.detach().double().numpy()


def test_cornn_layer_is_the_papers_discretisation():
    torch.manual_seed(0)
    layer = CoRNN(I, H, dt=0.3, gamma=0.7, epsilon=1.5).double()
    u = torch.randn(T, B, I, dtype=torch.float64)
    out, (y_n, z_n) = layer(u)
    V, W, Wz, b = (numpy_of(p) for p in (layer.weight_ih, layer.weight_hy, layer.weight_hz, layer.bias))
    y, z = np.zeros((B, H)), np.zeros((B, H))
    for t in range(T):
        z = z + 0.3 * (np.tanh(y @ W.T + z @ Wz.T + u[t].numpy() @ V.T + b) - 0.7 * y - 1.5 * z)
        y = y + 0.3 * z
        np.testing.assert_allclose(out[t].detach().numpy(), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(numpy_of(y_n[0]), y, rtol=1e-12)
    np.testing.assert_allclose(numpy_of(z_n[0]), z, rtol=1e-12)


def test_lem_layer_is_the_papers_multiscale_update():
    torch.manual_seed(1)
    layer = LEM(I, H, dt=0.6).double()
    u = torch.randn(T, B, I, dtype=torch.float64)
    out, (y_n, z_n) = layer(u)
    Wi, bi = numpy_of(layer.input_map.weight), numpy_of(layer.input_map.bias)
    Vh, bh = numpy_of(layer.hidden_map.weight), numpy_of(layer.hidden_map.bias)
    Vz, bz = numpy_of(layer.transform_z.weight), numpy_of(layer.transform_z.bias)
    W1, W2, Wy, Wz = np.split(Wi, 4)
    b1, b2, by, bz_in = np.split(bi, 4)
    V1, V2, Vzy = np.split(Vh, 3)
    c1, c2, cz = np.split(bh, 3)
    y, z = np.zeros((B, H)), np.zeros((B, H))
    for t in range(T):
        x = u[t].numpy()
        step_bar = 0.6 * sigmoid(x @ W1.T + b1 + y @ V1.T + c1)
        step = 0.6 * sigmoid(x @ W2.T + b2 + y @ V2.T + c2)
        z = (1 - step) * z + step * np.tanh(x @ Wz.T + bz_in + y @ Vzy.T + cz)
        y = (1 - step_bar) * y + step_bar * np.tanh(x @ Wy.T + by + z @ Vz.T + bz)
        np.testing.assert_allclose(out[t].detach().numpy(), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(numpy_of(z_n[0]), z, rtol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "auto"] + (["cpu"] if numba_available() else []))
def test_unicornn_layer_is_the_papers_oscillators(backend):
    torch.manual_seed(2)
    layer = UnICORNN(I, H, dt=0.8, alpha=0.4, backend=backend).double()
    u = torch.randn(T, B, I, dtype=torch.float64)
    out, (y_n, z_n) = layer(u)
    V, b = numpy_of(layer.projection.weight), numpy_of(layer.projection.bias)
    w, s = numpy_of(layer.weight_hh), 0.8 * sigmoid(numpy_of(layer.step_logit))
    assert np.all((0 < s) & (s < 0.8))
    y, z = np.zeros((B, H)), np.zeros((B, H))
    for t in range(T):
        z = z - s * (np.tanh(w * y + u[t].numpy() @ V.T + b) + 0.4 * y)
        y = y + s * z
        np.testing.assert_allclose(out[t].detach().numpy(), y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(numpy_of(y_n[0]), y, rtol=1e-12)
    np.testing.assert_allclose(numpy_of(z_n[0]), z, rtol=1e-12)


def kernel_inputs(steps, batch, hidden, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = (torch.randn(steps, batch, hidden, generator=generator), torch.rand(hidden, generator=generator) * 2 - 1,
               torch.randn(hidden, generator=generator), torch.randn(batch, hidden, generator=generator),
               torch.randn(batch, hidden, generator=generator))
    return [t.to(dtype).requires_grad_() for t in tensors]


@pytest.mark.slow  # 3-7 s (loaded): make test-slow, which CI runs too
@needs_numba
def test_unicornn_cpu_kernel_gradcheck_float64():
    inputs = kernel_inputs(7, 2, 3)
    assert torch.autograd.gradcheck(lambda *a: UnICORNNRecurrenceCPU.apply(*a, 0.9, 0.5), inputs)


@needs_numba
@pytest.mark.parametrize("steps, dt, alpha", [(1, 0.5, 0.0), (40, 0.9, 0.5), (2000, 0.05, 2.0)])
def test_unicornn_cpu_kernel_matches_the_reference_values_and_gradients(steps, dt, alpha):
    """float32 kernel vs the float64 reference loop, with gradients arriving at every y and at z_{T-1}
    (as from a later chunk through the carried state)."""
    exact = kernel_inputs(steps, 3, 6)
    y_ref, z_ref = unicornn_recurrence_reference(*exact, dt, alpha)
    generator = torch.Generator().manual_seed(9)
    grad_y, grad_z = torch.randn(y_ref.shape, generator=generator), torch.randn(z_ref.shape, generator=generator)
    expected = (y_ref, z_ref, *torch.autograd.grad((y_ref * grad_y).sum() + (z_ref * grad_z).sum(), exact))
    inputs = [t.detach().float().requires_grad_() for t in exact]
    y, z = unicornn_recurrence(*inputs, dt, alpha, backend="cpu")
    actual = (y, z, *torch.autograd.grad((y * grad_y).sum() + (z * grad_z).sum(), inputs))
    for name, got, want in zip(("y", "z", "x", "w", "c", "y0", "z0"), actual, expected):
        assert got.dtype == torch.float32
        error = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1.0)).item()
        assert error < 1e-4, f"{name}: relative error {error:.2e}"


@needs_numba
def test_unicornn_kernel_reads_batch_first_gradients_in_place():
    layer = UnICORNN(I, H, dt=0.5, batch_first=True, backend="cpu").double()
    reference = UnICORNN(I, H, dt=0.5, batch_first=True, backend="reference").double()
    reference.load_state_dict(layer.state_dict())
    u = torch.randn(B, T, I, dtype=torch.float64)
    weights = torch.randn(B, T, H, dtype=torch.float64)
    grads = [torch.autograd.grad((m(u)[0] * weights).sum(), list(m.parameters())) for m in (layer, reference)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make, message", [
    (lambda: unicornn_recurrence(*kernel_inputs(3, 1, 2, torch.float32), 0.1, 0.0, backend="triton"),
     "UnICORNN backend 'triton' needs CUDA tensors"),
    (lambda: unicornn_recurrence(*kernel_inputs(3, 1, 2, torch.float16), 0.1, 0.0, backend="fused"),
     "no fused UnICORNN kernel for cpu torch.float16"),
    (lambda: UnICORNN(2, 3, backend="numba"), "unknown UnICORNN backend .numba.; choose one of"),
    (lambda: UnICORNN(2, 3, dt=0.0), "UnICORNN dt must be a number > 0, got 0.0"),
    (lambda: UnICORNN(2, 3, alpha=-1.0), "UnICORNN alpha must be a number >= 0"),
    (lambda: CoRNN(2, 3, epsilon=-0.5), "coRNN epsilon must be a number >= 0"),
    (lambda: LEM(2, 3, dt=float("nan")), "LEM dt must be a number > 0"),
    (lambda: UnICORNN(2, 3)(torch.randn(4, 1, 2), torch.zeros(1, 1, 3)), r"UnICORNN state must be a tuple \(y, z\)"),
    (lambda: CoRNN(2, 3)(torch.randn(4, 1, 2), (torch.zeros(1, 1, 3), torch.zeros(1, 2, 3))),
     r"coRNN state z must have shape \(1, 1, 3\), got \(1, 2, 3\)"),
])
def test_bad_arguments_fail_in_one_line(make, message):
    with pytest.raises(ValueError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


def test_unicornn_auto_falls_back_to_the_reference_where_no_kernel_fits():
    inputs = kernel_inputs(5, 2, 3, torch.bfloat16)
    y, z = unicornn_recurrence(*inputs, 0.5, 0.1, backend="auto")  # bfloat16 on CPU: no fused kernel
    y_ref, z_ref = unicornn_recurrence_reference(*inputs, 0.5, 0.1)
    assert torch.equal(y, y_ref) and torch.equal(z, z_ref)


INTERPRETER_SCRIPT = """
import torch
from src.kernels.unicornn_cpu import unicornn_recurrence_reference
from src.kernels.unicornn_triton import UnICORNNRecurrenceTriton
for steps, batch, hidden, dt, alpha in [(1, 2, 3, 0.5, 0.0), (9, 3, 50, 0.7, 0.4), (6, 2, 70, 0.2, 2.0)]:
    generator = torch.Generator().manual_seed(steps)
    raw = [torch.randn(steps, batch, hidden, generator=generator), torch.rand(hidden, generator=generator),
           torch.randn(hidden, generator=generator), torch.randn(batch, hidden, generator=generator),
           torch.randn(batch, hidden, generator=generator)]
    grads = torch.randn(steps, batch, hidden, generator=generator), torch.randn(batch, hidden, generator=generator)
    exact = [t.double().requires_grad_() for t in raw]
    expected = unicornn_recurrence_reference(*exact, dt, alpha)
    expected = (*expected, *torch.autograd.grad(sum((o * g.double()).sum() for o, g in zip(expected, grads)), exact))
    inputs = [t.clone().requires_grad_() for t in raw]
    actual = UnICORNNRecurrenceTriton.apply(*inputs, dt, alpha)
    actual = (*actual, *torch.autograd.grad(sum((o * g).sum() for o, g in zip(actual, grads)), inputs))
    for name, got, want in zip(("y", "z", "x", "w", "c", "y0", "z0"), actual, expected):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        error = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1.0)).item()
        assert error < 1e-5, f"{name} (T={steps} B={batch} H={hidden}): error {error:.2e}"
print("interpreter checks passed")
"""


@pytest.mark.slow  # 3-7 s (loaded): make test-slow, which CI runs too
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_unicornn_triton_kernel_under_the_cpu_interpreter():
    # TRITON_INTERPRET must be set before triton is imported, hence a fresh interpreter process.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    result = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "interpreter checks passed" in result.stdout


def test_long_series_benchmark_times_the_oscillators_beside_indrnn(tmp_path):
    """benchmarks/long_series.py on a tiny shape (a smoke test: no assertion on timings)."""
    from benchmarks import long_series

    path = tmp_path / "long.json"
    results = long_series.main(["--shapes", "T6_B2_I3_H4", "--repeats", "1", "--warmup", "0", "--json", str(path)])
    assert list(results["T6_B2_I3_H4"]) == long_series.DEFAULT_IMPLS
    for row in results["T6_B2_I3_H4"].values():
        assert all(value > 0 for value in row.values())
    assert json.loads(path.read_text()) == results
