"""The Triton IndRNN kernel against the float64 reference loop: values and gradients of z, u, h0.

GPU tests skip unless triton and CUDA are both present. One test runs the same checks on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess because the variable must be set
before triton is imported); it skips only when triton is not installed.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.kernels.indrnn_triton import IndRNNRecurrenceTriton, triton_available
from src.kernels.reference import ACTIVATIONS, indrnn_recurrence_reference

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_gpu = pytest.mark.skipif(not triton_available(), reason="needs triton and a CUDA device")

# Largest error allowed, relative to the largest reference magnitude (at least 1), per input dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def compare(T, B, H, activation, dtype=torch.float32, device="cuda", tol=None, param_dtype=None, seed=0,
            grad_clip=None):
    """Run the kernel on inputs rounded to ``dtype`` (u and h0 to ``param_dtype``, default ``dtype``)
    and check outputs and gradients of z (T, B, H), u (H,), h0 (B, H) against the float64 reference
    evaluated on the same rounded values, both with per-step clipping ``grad_clip``; with clipping,
    also check that it clipped something (grad_z differs from the unclipped one). Returns the largest
    error (relative to the largest reference magnitude, at least 1) over the four results."""
    param_dtype = param_dtype or dtype
    generator = torch.Generator().manual_seed(seed)
    dtypes = (dtype, param_dtype, param_dtype)
    raw = (torch.randn(T, B, H, generator=generator), torch.rand(H, generator=generator) * 2 - 1,
           torch.randn(B, H, generator=generator))
    rounded = [x.to(d).double() for x, d in zip(raw, dtypes)]
    grad = torch.randn(T, B, H, generator=generator).to(dtype)

    exact_in = [x.clone().requires_grad_() for x in rounded]
    exact_out = indrnn_recurrence_reference(*exact_in, activation, grad_clip)
    expected = (exact_out, *torch.autograd.grad(exact_out, exact_in, grad.double()))

    kernel_in = [x.to(device=device, dtype=d).requires_grad_() for x, d in zip(rounded, dtypes)]
    out = IndRNNRecurrenceTriton.apply(*kernel_in, activation, grad_clip)
    actual = (out, *torch.autograd.grad(out, kernel_in, grad.to(device)))
    if grad_clip is not None:
        unclipped = indrnn_recurrence_reference(*exact_in, activation)
        assert not torch.allclose(torch.autograd.grad(unclipped, exact_in[0], grad.double())[0], expected[1]), \
            "grad_clip clipped nothing in this case"

    tol = tol if tol is not None else TOLERANCE[dtype]
    worst = 0.0
    for name, a, e, d in zip(("output", "grad_z", "grad_u", "grad_h0"), actual, expected, (dtype, *dtypes)):
        assert a.dtype == d and a.shape == e.shape and a.device.type == torch.device(device).type, name
        error = ((a.detach().double().cpu() - e).abs().max() / e.abs().max().clamp_min(1.0)).item()
        assert error <= tol, f"{name} ({activation}, {dtype}, T={T} B={B} H={H}): error {error:.2e} > {tol}"
        worst = max(worst, error)
    return worst


@needs_gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 2, 3), (37, 3, 50), (37, 5, 300), (16, 70, 1000)],
                         ids=["T1", "T37-one-block", "T37-ragged", "wide"])
def test_float32_matches_float64_reference(activation, shape):
    # B*H = 6, 150, 1500, 70000 (128-column programs): none a multiple of BLOCK; T = 37, 16: partial and
    # whole tiles.
    compare(*shape, activation)


@needs_gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(activation, dtype):
    compare(37, 3, 50, activation, dtype)


@needs_gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mixed_dtypes_return_each_inputs_dtype(activation):
    # As under autocast: z in bfloat16, float32 parameters and state.
    compare(20, 4, 33, activation, torch.bfloat16, param_dtype=torch.float32)


@needs_gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_long_sequence(activation):
    compare(2000, 2, 3, activation, tol=1e-3)


@needs_gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_step_gradient_clipping(activation, dtype):
    compare(37, 3, 50, activation, dtype, grad_clip=0.5)
    compare(300, 4, 70, activation, dtype, grad_clip=0.5, tol=1e-3 if dtype == torch.float32 else None)


@needs_gpu
@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("block_t", [1, 4, 16, 32])
def test_every_time_tile_height(block, block_t, monkeypatch):
    # gpu_check sweeps BLOCK_T and BLOCK; every choice must stay exact (T = 37: partial last tiles).
    from src.kernels import indrnn_triton

    monkeypatch.setattr(indrnn_triton, "BLOCK_T", block_t)
    monkeypatch.setattr(indrnn_triton, "BLOCK", block)
    for activation in ACTIVATIONS:
        compare(37, 5, 300, activation)
        compare(37, 3, 50, activation, grad_clip=0.5)


@needs_gpu
def test_non_contiguous_input_and_matches_reference_on_gpu():
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(4, 9, 5, generator=generator).cuda().transpose(0, 1)  # (T=9, B=4, H=5) view
    u, h0 = torch.rand(5, generator=generator).cuda(), torch.randn(4, 5, generator=generator).cuda()
    torch.testing.assert_close(IndRNNRecurrenceTriton.apply(z, u, h0, "tanh"),
                               indrnn_recurrence_reference(z, u, h0, "tanh"), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="CPU tensors are valid under the interpreter")
def test_cpu_tensors_are_rejected_with_a_clear_error():
    # Runs everywhere (no GPU needed): without triton a RuntimeError, with it a ValueError naming CUDA.
    z, u, h0 = torch.zeros(2, 1, 3), torch.zeros(3), torch.zeros(1, 3)
    with pytest.raises(RuntimeError if not HAS_TRITON else ValueError, match="triton|CUDA"):
        IndRNNRecurrenceTriton.apply(z, u, h0, "relu")


INTERPRETER_SCRIPT = """
FULL = {full}
import torch
from src.kernels.reference import ACTIVATIONS
from tests.test_kernels_triton import compare
for activation in ACTIVATIONS:
    compare(1, 2, 3, activation, torch.float32, device="cpu")  # one step
    compare(17, 2, 9, activation, torch.float32, device="cpu")  # two full 8-step tiles and a partial one
    # B*H = 150: five 32-column programs, the last ragged; per-step clipping active
    compare(9, 3, 50, activation, torch.float32, device="cpu", grad_clip=0.5)
compare(4, 3, 5, "tanh", torch.bfloat16, device="cpu", param_dtype=torch.float32)
if FULL:
    for activation in ACTIVATIONS:
        for shape in [(7, 3, 50), (5, 2, 70)]:
            compare(*shape, activation, torch.float32, device="cpu")
        compare(4, 3, 5, activation, torch.bfloat16, device="cpu", param_dtype=torch.float32)
if FULL:  # other time-tile heights and program widths (gpu_check sweeps them), partial last tiles
    import src.kernels.indrnn_triton as indrnn_kernel
    for block, block_t in ((32, 1), (128, 4), (128, 16), (32, 16)):
        indrnn_kernel.BLOCK, indrnn_kernel.BLOCK_T = block, block_t
        compare(17, 2, 9, "tanh", torch.float32, device="cpu")
        compare(9, 3, 50, "relu", torch.float32, device="cpu", grad_clip=0.5)  # B*H = 150: ragged blocks
    indrnn_kernel.BLOCK, indrnn_kernel.BLOCK_T = None, 8
# RTRL's sensitivity kernel: tests/test_rtrl.py's comparison with the plain loop, on CPU tensors.
from tests.test_rtrl import test_triton_sensitivity_kernel_equals_plain_loop as rtrl_check
rtrl_check(0, (19, 3, 5, 4))  # (K, B, H, I): one tile
rtrl_check(3, (6, 2, 70, 40))  # ragged 64 x 32 tiles, three diagonal sensitivities
# The dense kernel of the leaky / Clockwork / skip layers (tests/test_kernels_triton_layers.py).
from tests.test_kernels_triton_layers import interpreter_checks
interpreter_checks(full=FULL)
print("interpreter checks passed")
"""


def run_under_interpreter(script: str, timeout: int = 600) -> None:
    """Run ``script`` (Python source that prints "checks passed" at its end) in a fresh interpreter with
    TRITON_INTERPRET=1: the variable must be set before triton is imported, hence the new process."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checks passed" in result.stdout, result.stdout + result.stderr


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[dev]')")


@needs_triton
def test_kernels_under_the_triton_cpu_interpreter():
    # Every Triton kernel (IndRNN, RTRL, dense) against its reference, on CPU tensors; one process, one import.
    run_under_interpreter(INTERPRETER_SCRIPT.format(full=False))


@needs_triton
@pytest.mark.slow
def test_every_kernel_case_under_the_triton_cpu_interpreter():
    # As above with every dense-kernel case and layer (float32, all activations, skip delays).
    run_under_interpreter(INTERPRETER_SCRIPT.format(full=True))
