"""Per-step recurrent gradient clipping (``grad_clip``): dL/da_t, a_t = z_t + u * h_{t-1}, is clamped
to [-c, c] at every step of the backward pass, identically in the reference loop and every fused
kernel. The Triton kernel is checked on GPU here and under the interpreter in test_kernels_triton.py."""
import pytest
import torch
from torch.nn import functional as F

from src.kernels import indrnn_linear_recurrence, indrnn_recurrence, numba_available, triton_available
from src.kernels.indrnn_linear_cpu import IndRNNLinearRecurrenceCPU
from src.kernels.reference import indrnn_recurrence_reference
from src.layers import IndRNN

ACTIVATIONS = ["relu", "tanh", "identity"]
CLIP = 0.5  # with unit-normal upstream gradients and |u| near 1 many dL/da_t exceed it


def recurrence_inputs(T=12, B=3, H=5, dtype=torch.float64, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(T, B, H, dtype=dtype, generator=generator)
    u = torch.rand(H, dtype=dtype, generator=generator) * 2 - 1
    h0 = torch.randn(B, H, dtype=dtype, generator=generator)
    grad = torch.randn(T, B, H, dtype=dtype, generator=generator)
    return [t.to(device).requires_grad_() for t in (z, u, h0)], grad.to(device)


def gradients(function, tensors, grad, **kwargs):
    output = function(*tensors, **kwargs)
    return (output, *torch.autograd.grad(output, tensors, grad))


def test_reference_clips_by_hand():
    # T=2, B=H=1, identity, u=2, h0=3, upstream gradient 1 at both steps, c=1.5:
    # delta_1 = clip(1) = 1; delta_0 = clip(1 + u * delta_1) = clip(3) = 1.5.
    # dL/dz = (1.5, 1); dL/du = delta_0 * h0 + delta_1 * h_0 = 1.5 * 3 + 1 * (z_0 + 2 * 3); dL/dh0 = u * delta_0 = 3.
    z = torch.tensor([[[1.0]], [[2.0]]], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    h0 = torch.tensor([[3.0]], dtype=torch.float64, requires_grad=True)
    output = indrnn_recurrence_reference(z, u, h0, "identity", grad_clip=1.5)
    grad_z, grad_u, grad_h0 = torch.autograd.grad(output, (z, u, h0), torch.ones_like(output))
    assert grad_z.flatten().tolist() == [1.5, 1.0]
    assert grad_u.item() == 1.5 * 3 + 1.0 * 7.0
    assert grad_h0.item() == 3.0


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_clipping_bounds_every_step_and_changes_the_gradients(activation):
    tensors, grad = recurrence_inputs()
    clipped = gradients(indrnn_recurrence_reference, tensors, grad, activation=activation, grad_clip=CLIP)
    plain = gradients(indrnn_recurrence_reference, tensors, grad, activation=activation)
    torch.testing.assert_close(clipped[0], plain[0])  # the forward pass is untouched
    assert clipped[1].abs().max() <= CLIP  # dL/dz_t is the clipped dL/da_t
    assert (clipped[1].abs() == CLIP).any()
    for name, a, b in zip(("z", "u", "h0"), clipped[1:], plain[1:]):
        assert not torch.allclose(a, b), f"clipping left dL/d{name} unchanged: the case does not clip"
    # A bound above every |dL/da_t| clips nothing.
    loose = gradients(indrnn_recurrence_reference, tensors, grad, activation=activation,
                      grad_clip=float(plain[1].abs().max()) + 1)
    for a, b in zip(loose, plain):
        torch.testing.assert_close(a, b)


def fused_backends():
    return ["cpu", "cpu_torch"] + (["triton"] if triton_available() else [])


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_kernels_clip_as_the_reference(backend, activation):
    dtype, device = (torch.float32, "cuda") if backend == "triton" else (torch.float64, "cpu")
    tensors, grad = recurrence_inputs(dtype=dtype, device=device)
    expected = gradients(indrnn_recurrence, tensors, grad, activation=activation, backend="reference", grad_clip=CLIP)
    actual = gradients(indrnn_recurrence, tensors, grad, activation=activation, backend=backend, grad_clip=CLIP)
    plain = gradients(indrnn_recurrence, tensors, grad, activation=activation, backend=backend)
    assert not torch.allclose(actual[2], plain[2]), "nothing was clipped"
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.skipif(not numba_available(), reason="the fused projection kernel needs numba")
@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_projection_kernel_clips_as_the_reference(activation, bias):
    generator = torch.Generator().manual_seed(5)
    make = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_()  # noqa: E731
    x, weight, b, h0 = make(15, 4, 2), make(6, 2), make(6) if bias else None, make(4, 6)
    u = (torch.rand(6, dtype=torch.float64, generator=generator) * 2 - 1).requires_grad_()
    grad = torch.randn(15, 4, 6, dtype=torch.float64, generator=generator)
    tensors = [t for t in (x, weight, b, u, h0) if t is not None]

    def run(fused, grad_clip):
        if fused:
            output = IndRNNLinearRecurrenceCPU.apply(x, weight, b, u, h0, activation, grad_clip)
        else:
            output = indrnn_recurrence_reference(F.linear(x, weight, b), u, h0, activation, grad_clip)
        return (output, *torch.autograd.grad(output, tensors, grad))

    expected, actual, plain = run(False, CLIP), run(True, CLIP), run(True, None)
    assert not torch.allclose(actual[1], plain[1]), "nothing was clipped"
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)
    # The public entry point picks the fused kernel for 2 inputs and passes the bound on.
    through_api = indrnn_linear_recurrence(x, weight, b, u, h0, activation, "cpu", grad_clip=CLIP)
    for a, e in zip(torch.autograd.grad(through_api, tensors, grad), expected[1:]):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", ["reference", "cpu", "cpu_torch"])
def test_gradcheck_with_clipping_off(backend):
    tensors, _ = recurrence_inputs(T=5, B=2, H=3, seed=1)
    assert torch.autograd.gradcheck(lambda *a: indrnn_recurrence(*a, "relu", backend, grad_clip=None), tensors)


@pytest.mark.parametrize("backend", ["reference", "cpu", "cpu_torch"])
def test_nan_gradients_stay_nan(backend):
    # Clipping must not hide a diverging run: a NaN upstream gradient stays NaN.
    tensors, grad = recurrence_inputs(T=4, B=1, H=2)
    grad[2, 0, 0] = float("nan")
    grad_z = gradients(indrnn_recurrence, tensors, grad, activation="identity", backend=backend, grad_clip=CLIP)[1]
    assert grad_z[:3, 0, 0].isnan().all()


def test_layer_clips_in_every_path():
    # IndRNN with 2 inputs takes the fused projection kernel on "cpu"; "reference" the plain loop;
    # batch_norm="before" the projection, BN, then the recurrence kernel. Same clipped gradients.
    torch.manual_seed(0)
    x = torch.randn(3, 20, 2, dtype=torch.float64)
    grads = {}
    for batch_norm in ("none", "before"):
        for backend in ("reference", "cpu"):
            torch.manual_seed(1)
            layer = IndRNN(2, 6, batch_first=True, u_bound=1.0, batch_norm=batch_norm, backend=backend,
                           grad_clip=0.01).double()
            output, _ = layer(x)
            output.square().sum().backward()
            grads[batch_norm, backend] = [p.grad.clone() for p in layer.parameters()]
        for a, e in zip(grads[batch_norm, "cpu"], grads[batch_norm, "reference"]):
            torch.testing.assert_close(a, e)
    assert grads["none", "cpu"][2].abs().max() <= 0.01 * 3 * 20  # dL/db: a sum of B*T clipped values


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), "10", True])
def test_bad_grad_clip_is_one_line_error(value):
    with pytest.raises(ValueError, match="grad_clip must be null"):
        IndRNN(2, 4, u_bound=1.0, grad_clip=value)
