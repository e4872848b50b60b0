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
@pytest.mark.parametrize("block_t", [1, 4, 16])
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


@pytest.mark.slow  # 5-25 s (loaded): make test-slow, which CI runs too
@needs_triton
def test_kernels_under_the_triton_cpu_interpreter():
    # Every Triton kernel (IndRNN, RTRL, dense) against its reference, on CPU tensors; one process, one import.
    run_under_interpreter(INTERPRETER_SCRIPT.format(full=False))


@needs_triton
@pytest.mark.slow
def test_every_kernel_case_under_the_triton_cpu_interpreter():
    # As above with every dense-kernel case and layer (float32, all activations, skip delays).
    run_under_interpreter(INTERPRETER_SCRIPT.format(full=True))


def _compile_for_hopper(kernel, signature: dict, constexprs: dict, num_warps: int) -> tuple[int, int]:
    """(registers, spill bytes) of ``kernel`` compiled for sm_90 by triton and ptxas (no GPU needed)."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(compiled.asm["ptx"])
        report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(source), "-o", str(Path(folder) / "k.cubin")],
                                capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr
    return int(re.search(r"Used (\d+) registers", text).group(1)), int(re.search(r"(\d+) bytes spill stores", text).group(1))


@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the kernels, not the interpreter")
def test_every_kernel_compiles_for_sm90_without_spills():
    # The interpreter checks the kernels' arithmetic; this checks that the compiled path (runtime ifs,
    # float64 tl.dot, cache modifiers, the launch configurations actually used) builds for an H100/H200
    # and keeps everything in registers. triton ships ptxas, so no GPU is needed.
    from src.kernels import dense_triton, indrnn_triton, jordan_triton, rtrl_triton

    pointers = lambda names, dtype="fp32": {name: f"*{dtype}" for name in names}  # noqa: E731
    ints = lambda names: {name: "i32" for name in names}  # noqa: E731
    block, warps = indrnn_triton._launch_config(65536)
    for activation, clip in ((0, False), (1, True)):
        tiles = {"ACTIVATION": activation, "BLOCK": block, "BLOCK_T": indrnn_triton.BLOCK_T}
        _, spills = _compile_for_hopper(indrnn_triton._forward_kernel, {
            **pointers(["z_ptr", "u_ptr", "h0_ptr", "out_ptr"]), **ints(["T", "n_tiles", "BH", "H"])}, tiles, warps)
        assert spills == 0, f"IndRNN forward {tiles}: {spills} bytes spilled"
        _, spills = _compile_for_hopper(indrnn_triton._backward_kernel, {
            **pointers(["grad_ptr", "out_ptr", "u_ptr", "h0_ptr", "grad_z_ptr", "grad_u_ptr", "grad_h0_ptr"]),
            **ints(["T", "n_tiles", "BH", "H"]), "last_tile_offset": "i64", "last_tile_start": "i32", "clip": "fp32"},
            {**tiles, "CLIP": clip}, warps)
        assert spills == 0, f"IndRNN backward {tiles}: {spills} bytes spilled"
    block_b, block_n, block_k, warps = dense_triton._blocks(512)
    for dtype, precision in (("fp32", "ieee"), ("fp32", "tf32"), ("fp64", "ieee")):
        blocks = {"PRECISION": precision, "BLOCK_B": block_b, "BLOCK_N": block_n, "BLOCK_K": block_k}
        _, spills = _compile_for_hopper(dense_triton._forward_kernel, {
            **pointers(["z_ptr", "w_ptr", "lam_ptr", "states_ptr"], dtype), "delay_ptr": "*i32",
            **ints(["T", "n_delays", "n_col_blocks", "n_k_blocks", "B", "H", "D", "lam_stride", "module"])},
            {"ACTIVATION": 1, **blocks}, warps)
        assert spills == 0, f"dense forward {dtype} {precision}: {spills} bytes spilled"
        _, spills = _compile_for_hopper(dense_triton._backward_kernel, {
            **pointers(["g_ptr", "gain_ptr", "w_ptr", "lam_ptr", "e_ptr", "da_ptr"], dtype), "delay_ptr": "*i32",
            **ints(["n_steps", "T", "n_delays", "n_col_blocks", "n_k_blocks", "B", "H", "lam_stride", "module"])},
            blocks, warps)
        assert spills == 0, f"dense backward {dtype} {precision}: {spills} bytes spilled"
        block_b, block_n, block_k, warps = jordan_triton._blocks(512)
        blocks = {"PRECISION": precision, "BLOCK_B": block_b, "BLOCK_N": block_n, "BLOCK_K": block_k}
        sizes = ["B", "H", "O", "n_h_blocks", "n_o_blocks", "n_hk_blocks", "n_ok_blocks"]
        _, spills = _compile_for_hopper(jordan_triton._forward_kernel, {
            **pointers(["z_ptr", "v_ptr", "u_ptr", "c_ptr", "hs_ptr", "ys_ptr"], dtype), **ints(["T", *sizes])},
            {"ACT_H": 1, "ACT_Y": 3, **blocks}, warps)
        assert spills == 0, f"Jordan forward {dtype} {precision}: {spills} bytes spilled"
        _, spills = _compile_for_hopper(jordan_triton._backward_kernel, {
            **pointers(["gy_ptr", "gslope_ptr", "fslope_ptr", "v_ptr", "u_ptr", "do_ptr", "da_ptr"], dtype),
            **ints(["n_steps", "T", *sizes])}, blocks, warps)
        assert spills == 0, f"Jordan backward {dtype} {precision}: {spills} bytes spilled"
        block_b, block_n, block_k, warps = dense_triton._blocks(512)
    _, spills = _compile_for_hopper(rtrl_triton._chunk_kernel, {
        **pointers(["carry_ptr", "gain_ptr", "x_ptr", "direct_ptr", "grad_ptr", "s_diag_ptr", "s_weight_ptr",
                    "part_diag_ptr", "part_weight_ptr"]), **ints(["K", "B", "H", "I"])},
        {"N_DIAG": 3, "HAS_GRAD": True, "BLOCK_H": 32, "BLOCK_I": 32}, 4)
    assert spills == 0, f"RTRL chunk kernel: {spills} bytes spilled"
