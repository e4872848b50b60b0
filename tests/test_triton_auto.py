"""backend="auto" and the loop layers' Triton kernels (src/kernels/triton_auto.py), on the CPU with a
CUDA-less stand-in: "auto" is made to choose the kernel for CPU parameters and the kernel launch is made
to raise. The layer then gives the PyTorch loop's values and gradients, one warning line names the layer
and the error, and that layer never tries the kernel again in the process; a strict "triton" call
raises; a backward pass whose kernel fails gets the reference's gradients."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from src.kernels import dense_triton, jordan_triton, triton_auto
from src.kernels.dense_triton import dense_recurrence_reference, dense_recurrence_triton, resolve_dense_backend
from src.layers import ClockworkRNN, JordanRNN, LeakyRNN, SkipRNN

CRASH = "PTXAS error: stand-in for a kernel that cannot be built here"


@pytest.fixture
def failing_kernels(monkeypatch):
    """"auto" takes the kernels for CPU float64 parameters, whose launches raise; returns the launch count."""
    monkeypatch.setattr(triton_auto, "FAILED", {})
    monkeypatch.setattr(dense_triton, "auto_on", lambda weight: True)
    monkeypatch.setattr(dense_triton, "dense_kernel_applies", lambda weight: True)  # Clockwork checks it too
    launches = {"dense": 0, "jordan": 0}

    def crash(kind):
        def launch(*args):
            launches[kind] += 1
            raise RuntimeError(CRASH)
        return launch

    monkeypatch.setattr(dense_triton.DenseRecurrenceTriton, "apply", crash("dense"))
    monkeypatch.setattr(jordan_triton.JordanTritonFunction, "apply", crash("jordan"))
    return launches


def values_and_gradients(layer, x):
    x = x.clone().requires_grad_()
    output, _ = layer(x)
    output.pow(2).sum().backward()
    return [output.detach(), x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("make, kind", [
    (lambda backend: LeakyRNN(3, 6, backend=backend, dtype=torch.float64), "dense"),
    (lambda backend: SkipRNN(3, 6, delays=(1, 2), backend=backend, dtype=torch.float64), "dense"),
    (lambda backend: ClockworkRNN(3, 6, num_modules=2, periods=(1, 2), backend=backend, dtype=torch.float64), "dense"),
    (lambda backend: JordanRNN(3, 6, output_size=4, backend=backend, dtype=torch.float64), "jordan")])
def test_a_kernel_that_fails_under_auto_falls_back_to_the_loop_for_good(failing_kernels, caplog, make, kind):
    torch.manual_seed(0)
    auto, loop = make("auto"), make("reference")
    loop.load_state_dict(auto.state_dict())
    name = type(auto).__name__
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="src.kernels.triton_auto"):
        first = values_and_gradients(auto, x)
        auto.zero_grad()
        second = values_and_gradients(auto, x)
    expected = values_and_gradients(loop, x)
    for got in (first, second):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert failing_kernels[kind] == 1  # the second call took the loop without trying the kernel
    assert [r.getMessage() for r in caplog.records] == [
        f"{name}: the Triton kernel failed (RuntimeError: {CRASH}); backend=auto runs the PyTorch loop from now "
        "on (backend=triton raises the error)"]
    assert resolve_dense_backend("auto", torch.zeros(6, 6, dtype=torch.float64), name) == "reference"
    # Another layer kind still tries its kernel.
    other = "SkipRNN" if name != "SkipRNN" else "LeakyRNN"
    assert resolve_dense_backend("auto", torch.zeros(6, 6, dtype=torch.float64), other) == "triton"


def test_a_strict_call_raises_and_records_nothing(failing_kernels):
    assert resolve_dense_backend("triton", torch.zeros(4, 4), "LeakyRNN") == "triton"
    z, past, lam = torch.zeros(3, 1, 4), torch.zeros(1, 1, 4), torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="PTXAS error"):
        dense_recurrence_triton(z, torch.zeros(1, 4, 4), past, lam, (1,), "tanh")
    assert triton_auto.FAILED == {}


def test_auto_is_on_for_cuda_and_keeps_the_loop_on_cpu():
    assert dense_triton.AUTO_ON_CUDA is True
    assert not dense_triton.auto_on(torch.zeros(4, 4))  # CPU parameters: the loop (faster there)
    assert resolve_dense_backend("auto", torch.zeros(4, 4), "LeakyRNN") == "reference"


def test_a_failing_backward_kernel_gives_the_references_gradients(monkeypatch, caplog):
    monkeypatch.setattr(triton_auto, "FAILED", {})
    monkeypatch.setattr(dense_triton, "_kernel_gradients", lambda ctx, grad: (_ for _ in ()).throw(RuntimeError(CRASH)))
    torch.manual_seed(1)
    steps, batch, hidden, delays = 5, 2, 4, (1, 3)
    z, weights = torch.randn(steps, batch, hidden, dtype=torch.float64), torch.randn(2, hidden, hidden) / 4
    weights = weights.double()
    past, lam = torch.randn(3, batch, hidden, dtype=torch.float64), torch.rand(steps, hidden, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (z, weights, past, lam)]
    output = dense_recurrence_reference(*leaves, delays, "tanh")
    grad = torch.randn_like(output)
    expected = torch.autograd.grad(output, leaves, grad)
    # What the forward kernel saves: z, weights, lam, the delay table and the states (past, then outputs).
    ctx = SimpleNamespace(saved_tensors=(z, weights, lam, None, torch.cat([past, output.detach()])), delays=delays,
                          activation="tanh", z_dtype=z.dtype, lam_dtype=lam.dtype, auto_layer="SkipRNN")
    with caplog.at_level(logging.WARNING, logger="src.kernels.triton_auto"):
        got = dense_triton.DenseRecurrenceTriton.backward.__wrapped__(ctx, grad)
    for a, b in zip(got[:4], expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert got[4:] == (None, None, None, None) and "SkipRNN: the Triton kernel failed" in caplog.text
    ctx.auto_layer = None  # the same failure in a strict call raises
    with pytest.raises(RuntimeError, match="PTXAS error"):
        dense_triton.DenseRecurrenceTriton.backward.__wrapped__(ctx, grad)
