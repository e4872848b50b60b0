"""Fused IndRNN recurrences against the reference loop: values, gradients, float64 gradcheck."""
import pytest
import torch

from src.kernels import indrnn_recurrence, numba_available, resolve_backend, triton_available

FUSED = ["cpu", "cpu_torch"]


def inputs(T=9, B=4, H=6, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(T, B, H, dtype=dtype, generator=generator, requires_grad=True)
    u = (torch.rand(H, dtype=dtype, generator=generator) * 2 - 1).requires_grad_()
    h0 = torch.randn(B, H, dtype=dtype, generator=generator, requires_grad=True)
    return z, u, h0


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("activation", ["relu", "tanh", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_matches_reference(backend, activation, dtype):
    z, u, h0 = inputs(dtype=dtype)
    grad = torch.randn(z.shape, dtype=dtype)
    results = []
    for chosen in ("reference", backend):
        output = indrnn_recurrence(z, u, h0, activation, chosen)
        gradients = torch.autograd.grad(output, (z, u, h0), grad)
        results.append((output, *gradients))
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("activation", ["relu", "tanh", "identity"])
def test_fused_gradcheck(backend, activation):
    z, u, h0 = inputs(T=5, B=2, H=3, seed=1)
    assert torch.autograd.gradcheck(lambda *a: indrnn_recurrence(*a, activation, backend), (z, u, h0))


def test_non_contiguous_inputs():
    z, u, h0 = inputs(dtype=torch.float32)
    z_t = z.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (T,B,H) view, odd strides
    torch.testing.assert_close(indrnn_recurrence(z_t, u, h0, "relu", "cpu"),
                               indrnn_recurrence(z, u, h0, "relu", "reference"))


def test_auto_selects_the_fused_cpu_kernel_and_rejects_bad_choices():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    expected_cuda = "triton" if triton_available() else "reference"
    assert resolve_backend("auto", torch.device("cuda")) == expected_cuda
    assert resolve_backend("auto", torch.device("cuda"), torch.float64) == "reference"  # no float64 Triton kernel
    with pytest.raises(ValueError, match="CPU tensors only"):
        resolve_backend("cpu", torch.device("cuda"))
    if not triton_available():
        with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors"):
            resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown recurrence backend"):
        resolve_backend("fast", torch.device("cpu"))


def test_numba_is_installed():
    # It is a declared dependency; without it the slower PyTorch loops would run silently.
    assert numba_available()


def test_half_precision_falls_back_to_the_torch_loop():
    z, u, h0 = inputs(dtype=torch.bfloat16)
    exact = indrnn_recurrence(z.double(), u.double(), h0.double(), "relu", "reference")
    # addcmul rounds once where z + u * h rounds twice: compare both at bf16 precision.
    fused = indrnn_recurrence(z, u, h0, "relu", "cpu")
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.double(), exact, atol=2e-2, rtol=2e-2)
