"""The fused projection + recurrence kernel (few inputs on CPU) against F.linear + the reference loop,
gradients read in either layout, and when the IndRNN layer chooses it."""
import pytest
import torch
from torch.nn import functional as F

from src.kernels import indrnn_linear_recurrence, indrnn_recurrence, numba_available
from src.kernels.indrnn_linear_cpu import FUSED_MAX_INPUTS, IndRNNLinearRecurrenceCPU
from src.layers import IndRNN

pytestmark = pytest.mark.skipif(not numba_available(), reason="the fused projection kernel needs numba")


def tensors(T=7, B=3, I=2, H=5, dtype=torch.float64, seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, dtype=dtype, generator=generator).requires_grad_()  # noqa: E731
    u = (torch.rand(H, dtype=dtype, generator=generator) * 2 - 1).requires_grad_()
    return make(T, B, I), make(H, I), make(H) if bias else None, u, make(B, H)


@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("inputs", [1, 3, FUSED_MAX_INPUTS])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(activation, inputs, bias):
    x, weight, b, u, h0 = tensors(I=inputs, seed=inputs, bias=bias)
    if bias:
        assert torch.autograd.gradcheck(lambda *a: IndRNNLinearRecurrenceCPU.apply(*a, activation), (x, weight, b, u, h0))
    else:
        assert torch.autograd.gradcheck(lambda x, w, u, h: IndRNNLinearRecurrenceCPU.apply(x, w, None, u, h, activation),
                                        (x, weight, u, h0))


@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("grad_layout", ["time_major", "batch_major"])
def test_matches_linear_then_reference_loop(activation, grad_layout):
    x, weight, b, u, h0 = tensors(T=40, B=6, I=2, H=16, dtype=torch.float32, seed=3)
    grad = torch.randn(40, 6, 16)
    if grad_layout == "batch_major":  # what a batch-first network hands back: (B, T, H) memory
        grad = grad.transpose(0, 1).contiguous().transpose(0, 1)
    results = []
    for fused in (False, True):
        if fused:
            output = IndRNNLinearRecurrenceCPU.apply(x, weight, b, u, h0, activation)
        else:
            output = indrnn_recurrence(F.linear(x, weight, b), u, h0, activation, "reference")
        results.append((output, *torch.autograd.grad(output, (x, weight, b, u, h0), grad)))
    for expected, actual in zip(*results):  # float32 sums over 240 terms, in another order
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_plain_kernel_reads_batch_major_gradients():
    generator = torch.Generator().manual_seed(4)
    z = torch.randn(30, 5, 8, generator=generator, requires_grad=True)
    u, h0 = torch.rand(8, generator=generator).requires_grad_(), torch.randn(5, 8, generator=generator)
    grad = torch.randn(5, 30, 8, generator=generator).transpose(0, 1)  # (T, B, H) view of (B, T, H) memory
    results = [torch.autograd.grad(indrnn_recurrence(z, u, h0, "relu", backend), (z, u), grad)
               for backend in ("reference", "cpu")]
    for expected, actual in zip(*results):
        torch.testing.assert_close(actual, expected)



@pytest.mark.parametrize("settings, fused", [
    ({}, True),
    ({"input_size": FUSED_MAX_INPUTS}, True),
    ({"input_size": FUSED_MAX_INPUTS + 1}, False),   # a BLAS projection is faster there
    ({"nonlinearity": "tanh"}, False),               # numba's tanh is scalar
    ({"batch_norm": "before"}, False),               # BN sits between projection and recurrence
    ({"backend": "cpu_torch"}, False),
    ({"backend": "reference"}, False),
    ({"projection": "conv1d"}, False),
])
def test_layer_uses_the_fused_kernel_only_where_it_applies(settings, fused):
    arguments = {"input_size": 1, "hidden_size": 8, "u_bound": 1.0, "batch_first": True, **settings}
    layer = IndRNN(**arguments)
    x = torch.randn(3, 10, arguments["input_size"])
    output = layer(x)[0]
    names = set()
    pending = [output.grad_fn]
    while pending:  # every autograd node behind the output
        node = pending.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            pending.extend(next_node for next_node, _ in node.next_functions)
    assert ("IndRNNLinearRecurrenceCPUBackward" in names) == fused, names
    reference = IndRNN(**{**arguments, "backend": "reference"})
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(output, reference(x)[0], rtol=1e-5, atol=1e-5)


def test_dispatcher_equals_linear_then_recurrence_for_every_backend():
    x, weight, b, u, h0 = tensors(I=12, seed=5)  # above FUSED_MAX_INPUTS: the split path
    for backend in ("cpu", "cpu_torch", "reference"):
        torch.testing.assert_close(indrnn_linear_recurrence(x, weight, b, u, h0, "relu", backend),
                                   indrnn_recurrence(F.linear(x, weight, b), u, h0, "relu", "reference"))
    with pytest.raises(ValueError, match="unknown IndRNN activation 'sigmoid'"):
        indrnn_linear_recurrence(x, weight, b, u, h0, "sigmoid")
