"""The persistent Triton kernel of the dense Python-loop layers (src/kernels/dense_triton.py) against
the float64 references: the kernel's own autograd loop, and each layer's PyTorch loop (leaky units,
Clockwork, skip-through-time; Jordan by src/kernels/jordan_triton.py), values and gradients of every
input, parameter and carried state.

The checks are functions run on CPU tensors under Triton's interpreter by
tests/test_kernels_triton.py's interpreter tests (TRITON_INTERPRET must be set before triton is
imported, hence their subprocess; a short set in the default suite, all of them in the slow one),
and on CUDA tensors here where a GPU and triton are present.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from src.kernels.dense_triton import (dense_kernel_applies, dense_recurrence_reference, dense_recurrence_triton,
                                      resolve_dense_backend)
from src.layers import ClockworkRNN, JordanRNN, LeakyRNN, SkipRNN

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_gpu = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs triton and a CUDA device")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max()
            / expected.detach().double().abs().max().clamp_min(1.0)).item()


def check_kernel(T, B, H, delays, activation, gate, dtype=torch.float64, device="cpu", seed=0) -> float:
    """The kernel on inputs rounded to ``dtype`` against the float64 autograd loop: output and the
    gradients of z (T, B, H), weights (K, H, H), past (D, B, H) and lam (T, H). ``gate``: "leak"
    (one lam per unit, expanded over time), "clock" (0/1 per step and unit, with a whole 64-unit
    block at rest) or "none" (lam = 0). Returns the largest relative error."""
    generator = torch.Generator().manual_seed(seed)
    memory = max(delays)
    z = torch.randn(T, B, H, generator=generator, dtype=torch.float64)
    weights = torch.randn(len(delays), H, H, generator=generator, dtype=torch.float64) / H ** 0.5
    past = torch.randn(memory, B, H, generator=generator, dtype=torch.float64)
    if gate == "leak":
        lam = torch.rand(H, generator=generator, dtype=torch.float64).expand(T, H)
    elif gate == "clock":
        lam = (torch.rand(T, H, generator=generator) > 0.5).double()
        lam[:, :64] = 1.0  # the first column block never updates: the kernel copies it
    else:
        lam = torch.zeros(T, H, dtype=torch.float64)
    grad = torch.randn(T, B, H, generator=generator, dtype=torch.float64)
    inputs = [t.to(dtype).double() for t in (z, weights, past, lam)]
    exact_in = [t.clone().requires_grad_() for t in inputs]
    exact_out = dense_recurrence_reference(*exact_in, delays, activation)
    expected = [exact_out, *torch.autograd.grad(exact_out, exact_in, grad)]
    kernel_in = [t.to(device=device, dtype=dtype).requires_grad_() for t in inputs]
    out = dense_recurrence_triton(*kernel_in, delays, activation)
    actual = [out, *torch.autograd.grad(out, kernel_in, grad.to(device=device, dtype=dtype))]
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    worst = 0.0
    for name, a, e in zip(("output", "z", "weights", "past", "lam"), actual, expected):
        assert a.shape == e.shape and a.dtype == dtype, name
        error = relative_error(a, e)
        assert error <= tolerance, (f"{name} (T={T} B={B} H={H} delays={delays} {activation} {gate} {dtype}): "
                                    f"error {error:.1e}")
        worst = max(worst, error)
    return worst


LAYERS = {
    "leaky": lambda i, h: LeakyRNN(i, h, alpha_mode="learned", alpha_range=(0.1, 0.9)),
    "leaky_relu": lambda i, h: LeakyRNN(i, h, nonlinearity="relu", alpha_groups=(0.0, 0.5)),
    "clockwork": lambda i, h: ClockworkRNN(i, h, num_modules=4, periods=(1, 2, 3, 5)),
    "clockwork_identity": lambda i, h: ClockworkRNN(i, h, num_modules=2, nonlinearity="identity", time_origin=1),
    "skip": lambda i, h: SkipRNN(i, h, delays=(1, 3, 4)),
    "jordan": lambda i, h: JordanRNN(i, h),
    "jordan_no_bias": lambda i, h: JordanRNN(i, h, bias=False),
    "jordan_relu_sigmoid_o5": lambda i, h: JordanRNN(i, h, output_size=5, nonlinearity="relu",
                                                     output_nonlinearity="sigmoid"),
}


def _state_tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    return [s for s in state if isinstance(s, torch.Tensor)]


def run_layer(layer, x, chunks):
    """Outputs over ``chunks`` (lengths) of x with the state carried across, and the final state."""
    outputs, state, start = [], None, 0
    for length in chunks:
        output, state = layer(x[start:start + length], state)
        outputs.append(output)
        start += length
    return torch.cat(outputs), state


def check_layer(name, T=7, B=3, I=2, H=8, device="cpu", chunks=None, seed=0) -> float:
    """Layer ``name`` of :data:`LAYERS` with backend "triton" against the same layer's PyTorch loop,
    both float64: outputs, final state and the gradients of x, every parameter and the first state,
    running T steps in ``chunks`` with the state carried (the state contract). Returns the worst error."""
    torch.manual_seed(seed)
    reference = LAYERS[name](I, H).double()
    reference.backend = "reference" if not isinstance(reference, ClockworkRNN) else "fused"
    kernel = LAYERS[name](I, H).double().to(device)
    kernel.load_state_dict(reference.state_dict())
    kernel.backend = "triton"
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, B, I, generator=generator, dtype=torch.float64)
    chunks = chunks or [T]
    results = []
    for layer, dev in ((reference, "cpu"), (kernel, device)):
        xs = x.to(dev).requires_grad_()
        output, state = run_layer(layer, xs, chunks)
        loss = (output * torch.linspace(-1, 1, output.numel(), dtype=torch.float64, device=dev).view_as(output)).sum()
        loss = loss + sum((s ** 2).sum() for s in _state_tensors(state))
        grads = torch.autograd.grad(loss, [xs, *layer.parameters()], allow_unused=True)
        results.append((output, _state_tensors(state), grads))
        steps_reached = getattr(state, "step", None)  # Clockwork's clock
    worst = 0.0
    (out_r, state_r, grads_r), (out_k, state_k, grads_k) = results
    pairs = [("output", out_k, out_r)] + [("state", a, b) for a, b in zip(state_k, state_r)] + [
        (f"grad {n}", a, b) for n, a, b in zip(["x"] + [n for n, _ in reference.named_parameters()], grads_k, grads_r)
        if b is not None]
    for what, a, e in pairs:
        error = relative_error(a, e)
        assert error <= 1e-12, f"{name} {what}: error {error:.1e}"
        worst = max(worst, error)
    assert steps_reached in (None, (getattr(reference, "time_origin", 0) + T)), steps_reached
    return worst


def check_clockwork(T=4, B=2, I=2, H=160, periods=(1, 2, 4, 8), time_origin=3, masked=False, device="cpu") -> float:
    """:func:`src.kernels.clockwork.clockwork_triton` against :func:`clockwork_reference` in float64, values
    and gradients of x, W_x, b, W_h and h0. H = 160 with 4 modules of 40 units: modules straddle the
    kernel's 64-unit blocks and whole blocks of W_h are zero, so skipping them (the default mask) is
    checked where it is hardest; ``masked`` passes the mask explicitly (no block skipping)."""
    from src.kernels.clockwork import clockwork_mask, clockwork_reference, clockwork_triton

    generator = torch.Generator().manual_seed(5)
    inputs = [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in
              ((T, B, I), (H, I), (H,), (H, H), (B, H))]
    inputs[3] = inputs[3] / H ** 0.5
    mask = clockwork_mask(H, len(periods)) if masked else None
    grad = torch.randn(T, B, H, generator=generator, dtype=torch.float64)
    exact_in = [t.clone().requires_grad_() for t in inputs]
    exact = clockwork_reference(*exact_in[:4], exact_in[4], periods, "tanh", time_origin, mask)
    expected = [exact, *torch.autograd.grad(exact, exact_in, grad)]
    kernel_in = [t.to(device).requires_grad_() for t in inputs]
    out = clockwork_triton(*kernel_in[:4], kernel_in[4], periods, "tanh", time_origin,
                           None if mask is None else mask.to(device))
    actual = [out, *torch.autograd.grad(out, kernel_in, grad.to(device))]
    worst = 0.0
    for name, a, e in zip(("output", "x", "weight_ih", "bias", "weight_hh", "h0"), actual, expected):
        error = relative_error(a, e)
        assert error <= 1e-12, f"clockwork_triton {name} (masked={masked}): error {error:.1e}"
        worst = max(worst, error)
    if not masked:  # the skipping is real: on a dense W_h it leaves out the blocks a Clockwork W_h has zero
        dense_w = inputs[3].unsqueeze(0).to(device)
        z, past = inputs[0].new_zeros(2, B, H).to(device), inputs[4][None].to(device)
        no_gate = torch.zeros(2, H, dtype=torch.float64, device=device)
        assert not torch.allclose(dense_recurrence_triton(z, dense_w, past, no_gate, (1,), "tanh", H // len(periods)),
                                  dense_recurrence_triton(z, dense_w, past, no_gate, (1,), "tanh"))
    return worst


def interpreter_checks(full: bool = False, device: str = "cpu") -> dict[str, float]:
    """The checks run under the interpreter: by default a few seconds' worth for the default suite
    (ragged blocks, a resting block, several delays, two layers with a chunked state); ``full`` adds
    float32, the other activations, Clockwork's skipped zero blocks of W_h and every layer of
    :data:`LAYERS` (the slow test).
    Returns {check: worst relative error}."""
    errors = {
        "dense_clock_relu_f64": check_kernel(4, 17, 130, (1,), "relu", "clock", device=device),
        "dense_skip_tanh_f64": check_kernel(3, 2, 24, (1, 4), "tanh", "none", device=device),  # T < max delay
    }
    names = list(LAYERS) if full else ["leaky", "clockwork", "jordan_relu_sigmoid_o5"]
    if full:
        errors["dense_leak_tanh_f64"] = check_kernel(5, 3, 20, (1,), "tanh", "leak", device=device)
        errors["dense_leak_identity_f32"] = check_kernel(6, 2, 5, (1,), "identity", "leak", torch.float32,
                                                         device=device)
        errors["dense_clock_tanh_f32"] = check_kernel(5, 4, 70, (1, 2), "tanh", "clock", torch.float32,
                                                      device=device)
        errors["clockwork_triangular_f64"] = check_clockwork(device=device)
        errors["clockwork_masked_f64"] = check_clockwork(masked=True, device=device)
    for name in names:
        errors[f"layer_{name}"] = check_layer(name, device=device, chunks=[3, 4])
    return errors


def test_backend_choices_fail_in_one_line():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_dense_backend("cuda", torch.zeros(2, 2), "LeakyRNN")
    with pytest.raises(ValueError, match="LeakyRNN backend"):
        LeakyRNN(2, 4, backend="fast")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="backend 'triton' needs"):
            LeakyRNN(2, 4, backend="triton")(torch.zeros(3, 1, 2))
        with pytest.raises(ValueError, match="JordanRNN backend 'triton' needs"):
            JordanRNN(2, 4, backend="triton")(torch.zeros(3, 1, 2))
    # "auto" keeps the PyTorch loop on CPU: the interpreter is for tests only.
    assert resolve_dense_backend("auto", torch.zeros(2, 2), "SkipRNN") == "reference"


@needs_gpu
@pytest.mark.parametrize("gate,delays,activation", [("leak", (1,), "tanh"), ("clock", (1,), "relu"),
                                                    ("none", (1, 2, 8), "tanh"), ("leak", (1,), "identity")])
@pytest.mark.parametrize("shape", [(37, 5, 130), (20, 64, 512)], ids=["ragged", "H512"])
def test_kernel_float32_on_gpu(gate, delays, activation, shape):
    check_kernel(*shape, delays, activation, gate, torch.float32, device="cuda")


@needs_gpu
@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_on_gpu_equal_their_loops(name):
    # float64 on the GPU (tl.dot in IEEE float64) against the same layer's loop on the CPU.
    if not dense_kernel_applies(torch.zeros(1, device="cuda", dtype=torch.float64)):
        pytest.skip("no float64 kernel here")
    check_layer(name, T=40, B=20, H=64, device="cuda", chunks=[13, 27])


@needs_gpu
@pytest.mark.parametrize("masked", [False, True], ids=["zero-blocks-skipped", "explicit-mask"])
def test_clockwork_kernel_on_gpu(masked):
    check_clockwork(T=30, B=20, masked=masked, device="cuda")
