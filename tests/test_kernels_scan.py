"""The clamp-affine scan (backend "scan") against the sequential kernels: values and every gradient
to 1e-12 relative in float64, with and without per-step clipping, relu and identity, u of both signs
and u = 0, h0 given or zero, T from 1 to 100,000; gradcheck; the Triton chunk kernel under Triton's
CPU interpreter (one case here, every case in a slow test); the state contract, RTRL = BPTT, and
"auto"'s choice with the scan backend.

The CPU scan's schedule (how many pieces, who composes what) depends on its task count, normally
numba's thread count; tests set it with ``tasks`` (monkeypatching ``parallel_threads``) so that the
multi-piece paths run on any machine, even a one-core one.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import src.kernels.indrnn_scan.chunk_cpu as scan_module
from src.kernels import (SCAN_MAX_COLUMNS, SCAN_MIN_STEPS, SCAN_MIN_THREADS, indrnn_recurrence, numba_available,
                         prefer_scan)
from src.kernels.indrnn_cpu import IndRNNRecurrenceCPU
from src.kernels.indrnn_linear_cpu import IndRNNLinearRecurrenceCPU
from src.kernels.indrnn_scan import IndRNNLinearScanCPU, IndRNNScanCPU, IndRNNScanTorch, compose
from src.kernels.reference import indrnn_recurrence_reference
from src.layers import IndRNN
from tests.test_state_contract import CHUNKS, T as CONTRACT_T, assert_same_state, run_chunks

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not numba_available(), reason="the sequential and scan CPU kernels need numba")

DOUBLE = torch.float64
TOLERANCE = 1e-12  # largest |scan - sequential| relative to the largest |sequential|, per tensor


def recurrence_inputs(T, B=2, H=6, seed=0, with_h0=True, u_scale=1.1, dtype=DOUBLE):
    """z (T, B, H), u (H,) with both signs and a 0, h0 (B, H) (zeros unless ``with_h0``), upstream grad."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(T, B, H, dtype=dtype, generator=generator) + 0.2
    u = (torch.rand(H, dtype=dtype, generator=generator) * 2 - 1) * u_scale
    u[0], u[1] = 0.0, -abs(u[1])  # u = 0 and a negative u in every case
    h0 = torch.randn(B, H, dtype=dtype, generator=generator).abs() if with_h0 else torch.zeros(B, H, dtype=dtype)
    grad = torch.randn(T, B, H, dtype=dtype, generator=generator)
    return [t.requires_grad_() for t in (z, u, h0)], grad


def outputs_and_gradients(function, tensors, grad):
    output = function(*tensors)
    return (output, *torch.autograd.grad(output, tensors, grad))


def assert_equal(actual, expected, what=""):
    for name, a, e in zip(("output", "grad_z", "grad_u", "grad_h0"), actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, (what, name)
        assert torch.isfinite(a).all(), (what, name)
        error = ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item() if e.numel() else 0.0
        assert error <= TOLERANCE, f"{what} {name}: relative error {error:.2e}"


def sequential(activation, grad_clip):
    return lambda z, u, h0: IndRNNRecurrenceCPU.apply(z, u, h0, activation, True, grad_clip)


@pytest.fixture
def tasks(monkeypatch):
    """Set the CPU scan's task count (its schedule) whatever the machine's threads."""
    def set_tasks(count: int) -> None:
        monkeypatch.setattr(scan_module, "parallel_threads", lambda steps: count if steps >= count else 1)
    return set_tasks


@pytest.mark.parametrize("count", [2, 3, 4])
def test_schedule_covers_every_step_once_each_way(count, tasks):
    """Forward pieces run up from step 0, backward pieces down from the last step; each direction's first
    piece (run from the initial state while the other threads compose) gets its own balance ratio."""
    tasks(count)
    steps = 10_000
    _, forward = scan_module.schedule(steps, backward=False)
    _, backward = scan_module.schedule(steps, backward=True)
    for pieces, descending in ((forward, False), (backward, True)):
        ordered = sorted(pieces, reverse=descending)
        assert pieces == ordered and len(pieces) == count * (count - 1) + 1
        assert [start for start, _ in sorted(pieces)][1:] == [stop for _, stop in sorted(pieces)][:-1]
        assert min(start for start, _ in pieces) == 0 and max(stop for _, stop in pieces) == steps
    first_forward, first_backward = forward[0][1] - forward[0][0], backward[0][1] - backward[0][0]
    rest = steps - first_forward  # the balance: first piece = ratio * rest / (count - 1)
    assert first_forward == pytest.approx(scan_module.COMPOSE_COST_RATIO * rest / (count - 1), abs=1)
    rest = steps - first_backward
    assert first_backward == pytest.approx(scan_module.BACKWARD_COMPOSE_COST_RATIO * rest / (count - 1), abs=1)


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("grad_clip", [None, 0.5])
@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_scans_equal_the_sequential_kernel(activation, grad_clip, steps, tasks):
    for with_h0 in (True, False):
        tensors, grad = recurrence_inputs(steps, seed=steps, with_h0=with_h0)
        expected = outputs_and_gradients(sequential(activation, grad_clip), tensors, grad)
        torch_scan = outputs_and_gradients(lambda *a: IndRNNScanTorch.apply(*a, activation, grad_clip), tensors, grad)
        assert_equal(torch_scan, expected, f"torch scan h0={with_h0}")
        for count in (1, 2, 3, 4):  # 1: step by step; 2, 3, 4 tasks: 2, 6, 12 pieces
            tasks(count)
            cpu_scan = outputs_and_gradients(lambda *a: IndRNNScanCPU.apply(*a, activation, grad_clip), tensors, grad)
            assert_equal(cpu_scan, expected, f"cpu scan, {count} tasks, h0={with_h0}")


def test_clipping_clips_in_the_scan():
    tensors, grad = recurrence_inputs(300, seed=3)
    clipped = outputs_and_gradients(lambda *a: indrnn_recurrence(*a, "relu", "scan", 0.5), tensors, grad)
    plain = outputs_and_gradients(lambda *a: indrnn_recurrence(*a, "relu", "scan"), tensors, grad)
    assert clipped[1].abs().max() == 0.5 and plain[1].abs().max() > 0.5
    assert not torch.allclose(clipped[2], plain[2])


@pytest.mark.slow  # B=1, H=8: about 2 s each (4-6 s on the loaded VM); T = 1000 and below run by default
@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_100000_steps(activation, tasks):
    for grad_clip in (None, 0.5):
        tensors, grad = recurrence_inputs(100_000, B=1, H=8, seed=7, u_scale=1.0)
        expected = outputs_and_gradients(sequential(activation, grad_clip), tensors, grad)
        torch_scan = outputs_and_gradients(lambda *a: IndRNNScanTorch.apply(*a, activation, grad_clip), tensors, grad)
        assert_equal(torch_scan, expected, "torch scan")
        for count in (2, 3):
            tasks(count)
            cpu_scan = outputs_and_gradients(lambda *a: IndRNNScanCPU.apply(*a, activation, grad_clip), tensors, grad)
            assert_equal(cpu_scan, expected, f"cpu scan, {count} tasks")


@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_gradcheck(activation, tasks):
    tasks(2)
    tensors, _ = recurrence_inputs(9, B=2, H=3, seed=11)
    assert torch.autograd.gradcheck(lambda *a: IndRNNScanCPU.apply(*a, activation), tensors)
    assert torch.autograd.gradcheck(lambda *a: IndRNNScanTorch.apply(*a, activation), tensors)


def test_overflowing_slope_is_carried_step_by_step(tasks):
    # u = 1.5 over pieces of ~2,000 steps: the composed slope 1.5^2000 and offset overflow. With
    # z = -1 the state stays 0; a piece whose map is not finite is carried step by step, not NaN.
    tasks(2)
    z = torch.full((5000, 1, 3), -1.0, dtype=DOUBLE, requires_grad=True)
    u = torch.tensor([1.5, -1.5, 0.5], dtype=DOUBLE, requires_grad=True)
    h0 = torch.zeros(1, 3, dtype=DOUBLE, requires_grad=True)
    grad = torch.ones_like(z)
    expected = outputs_and_gradients(sequential("relu", None), (z, u, h0), grad)
    assert_equal(outputs_and_gradients(lambda *a: IndRNNScanCPU.apply(*a, "relu"), (z, u, h0), grad), expected)


def test_compose_edge_cases():
    """0 * inf (a = 0 after an infinite bound), disjoint intervals (a constant map), a2 < 0 (swapped bounds)."""
    t = lambda *v: tuple(torch.tensor(float(x), dtype=DOUBLE) for x in v)  # noqa: E731
    relu_step = lambda u, z: t(u, z, 0, float("inf"))  # noqa: E731
    # u = 0 forgets everything, even the infinite upper bound: the constant relu(z2).
    assert [x.item() for x in compose(relu_step(2, -1), relu_step(0, 3))] == [0, 3, 3, 3]
    # a2 < 0: [0, inf] maps to [-inf, 1] (swapped), clamped into [0, inf]: [0, 1].
    assert [x.item() for x in compose(relu_step(1, 0), relu_step(-1, 1))] == [-1, 1, 0, 1]
    # Disjoint: the first map outputs [5, 6], the second clamps to [0, 1]: the constant 1.
    mapped = compose(t(1, 0, 5, 6), t(1, 0, 0, 1))
    assert mapped[2].item() == mapped[3].item() == 1.0


@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_state_contract_with_the_scan_backend(activation, grad_clip, tasks):
    """As tests/test_state_contract.py: chunks of 1, 7 and T/2 with the carried state equal one call."""
    tasks(2)
    torch.manual_seed(0)
    layer = IndRNN(4, 8, nonlinearity=activation, u_bound=1.2, batch_first=True, backend="scan",
                   grad_clip=grad_clip).double()
    with torch.no_grad():
        layer.recurrence.weight_hh.uniform_(-1.2, 1.2)
        layer.projection.bias.uniform_(-0.3, 0.3)
    x = torch.randn(2, CONTRACT_T, 4, dtype=DOUBLE, requires_grad=True)
    weights = torch.randn(2, CONTRACT_T, 8, dtype=DOUBLE)
    whole, final = layer(x)
    reference = IndRNN(4, 8, nonlinearity=activation, u_bound=1.2, batch_first=True, backend="reference",
                       grad_clip=grad_clip).double()
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(whole, reference(x)[0], rtol=1e-12, atol=1e-14)
    parameters = list(layer.parameters())
    expected = torch.autograd.grad((whole * weights).sum(), [x, *parameters])
    for size in CHUNKS:
        chunked, state = run_chunks(layer, x, size)
        torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-12, msg=f"chunks of {size}")
        assert_same_state(state, final)
        for got, want in zip(torch.autograd.grad((chunked * weights).sum(), [x, *parameters]), expected):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=f"gradient, chunks of {size}")


@pytest.mark.parametrize("steps", [1, 7, 500])
@pytest.mark.parametrize("nonlinearity", ["relu", "identity"])
def test_exact_rtrl_equals_bptt_with_the_scan_backend(nonlinearity, steps, tasks):
    # tests/test_rtrl.py's problem and helpers (imported here: only this test needs that module).
    from tests.test_rtrl import bptt_gradients, indrnn, make_net, problem, relative_error, rtrl_gradients

    tasks(2)
    net = make_net(indrnn(nonlinearity, "scan"), 2)
    inputs, targets, initial, weights = problem(steps, 2)
    expected = bptt_gradients(make_net(indrnn(nonlinearity), 2), inputs, targets, initial, weights)  # reference loop
    assert relative_error(bptt_gradients(net, inputs, targets, initial, weights), expected) < 1e-12
    got = rtrl_gradients(net, inputs, targets, initial, weights, chunk=128 if steps > 100 else 3)
    assert relative_error(got, expected) < 1e-10


@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("bias", [True, False])
def test_projection_inside_the_scan_for_few_inputs(activation, bias, tasks):
    """IndRNNLinearScanCPU (I <= 8): the fused sequential kernel's values and every gradient (x, W, b,
    u, h0) to 1e-12, with and without clipping; gradcheck; the layer's scan path takes it."""
    generator = torch.Generator().manual_seed(2)
    make = lambda *shape: torch.randn(*shape, dtype=DOUBLE, generator=generator).requires_grad_()  # noqa: E731
    x, weight, b, h0 = make(300, 3, 2), make(5, 2), make(5) if bias else None, make(3, 5)
    u = (torch.rand(5, dtype=DOUBLE, generator=generator) * 2.2 - 1.1).detach()
    u[0] = 0.0
    u.requires_grad_()
    tensors = [t for t in (x, weight, b, u, h0) if t is not None]
    grad = torch.randn(300, 3, 5, dtype=DOUBLE, generator=generator)
    for grad_clip in (None, 0.5):
        expected = outputs_and_gradients(
            lambda *a: IndRNNLinearRecurrenceCPU.apply(x, weight, b, u, h0, activation, grad_clip), tensors, grad)
        for count in (1, 2, 3):
            tasks(count)
            actual = outputs_and_gradients(
                lambda *a: IndRNNLinearScanCPU.apply(x, weight, b, u, h0, activation, grad_clip), tensors, grad)
            for k, (a, e) in enumerate(zip(actual, expected)):
                error = ((a - e).abs().max() / e.abs().max()).item()
                assert error <= TOLERANCE, f"tensor {k}, clip {grad_clip}, {count} tasks: {error:.2e}"
    tasks(2)
    small = [t.detach()[:9].clone().requires_grad_() if t is x else t for t in (x, weight, b, u, h0)]
    small[4] = h0.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, u, h: IndRNNLinearScanCPU.apply(x, w, b, u, h, activation),
                                    (small[0], weight, u, small[4]))
    layer = IndRNN(2, 5, nonlinearity=activation, u_bound=1.0, batch_first=True, backend="scan", bias=bias).double()
    reference = IndRNN(2, 5, nonlinearity=activation, u_bound=1.0, batch_first=True, backend="reference",
                       bias=bias).double()
    reference.load_state_dict(layer.state_dict())
    inputs = torch.randn(3, 300, 2, dtype=DOUBLE, generator=generator)
    output = layer(inputs)[0]
    assert "IndRNNLinearScanCPUBackward" in autograd_nodes(output)
    torch.testing.assert_close(output, reference(inputs)[0], rtol=1e-12, atol=1e-13)


def test_tanh_warns_once_and_runs_the_sequential_kernel():
    tensors, grad = recurrence_inputs(20)
    with pytest.warns(UserWarning, match="backend 'scan': tanh is not clamp-affine"):
        actual = outputs_and_gradients(lambda *a: indrnn_recurrence(*a, "tanh", "scan"), tensors, grad)
    expected = outputs_and_gradients(lambda *a: indrnn_recurrence_reference(*a, "tanh"), tensors, grad)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def autograd_nodes(output):
    names, pending = set(), [output.grad_fn]
    while pending:
        node = pending.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            pending.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_auto_takes_the_scan_for_long_single_streams_on_enough_threads(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("src.kernels.parallel_threads", lambda steps: SCAN_MIN_THREADS)
    assert prefer_scan(SCAN_MIN_STEPS, 128, cpu, "relu")
    assert not prefer_scan(SCAN_MIN_STEPS - 1, 128, cpu, "relu")
    assert not prefer_scan(SCAN_MIN_STEPS, SCAN_MAX_COLUMNS + 1, cpu, "relu")
    assert not prefer_scan(SCAN_MIN_STEPS, 128, cpu, "tanh")
    assert not prefer_scan(SCAN_MIN_STEPS, 128, torch.device("cuda"), "relu")
    layer = IndRNN(1, 4, u_bound=1.0, batch_first=True)  # backend "auto"
    long_output = layer(torch.randn(1, SCAN_MIN_STEPS, 1))[0]
    assert "IndRNNLinearScanCPUBackward" in autograd_nodes(long_output)  # one input: projection inside
    short_output = layer(torch.randn(1, 100, 1))[0]
    assert "IndRNNLinearRecurrenceCPUBackward" in autograd_nodes(short_output)
    monkeypatch.setattr("src.kernels.parallel_threads", lambda steps: SCAN_MIN_THREADS - 1)  # too few to gain
    assert not prefer_scan(SCAN_MIN_STEPS, 128, cpu, "relu")


INTERPRETER_SCRIPT = """
import sys
import torch
from src.kernels.indrnn_cpu import IndRNNRecurrenceCPU
from src.kernels.indrnn_scan.chunk_triton import IndRNNScanTriton
from tests.test_kernels_scan import assert_equal, outputs_and_gradients, recurrence_inputs
# (activation, grad_clip, T, B, H, with_h0). Tiles of 4 steps x 8 columns, chunks of 8 steps under the
# interpreter: T = 9 is 2 chunks and a ragged tile, B*H = 12 or 18 a ragged column block.
quick = [("relu", 0.5, 9, 2, 6, True)]  # the default suite: one case, seconds
full = [(activation, grad_clip, steps, batch, 6, with_h0)
        for activation in ("relu", "identity") for grad_clip in (None, 0.5)
        for steps, batch in ((1, 2), (7, 2), (19, 3)) for with_h0 in (True, False)]
cases = full if sys.argv[1] == "full" else quick
for activation, grad_clip, steps, batch, hidden, with_h0 in cases:
    tensors, grad = recurrence_inputs(steps, batch, hidden, seed=steps, with_h0=with_h0)
    expected = outputs_and_gradients(lambda *a: IndRNNRecurrenceCPU.apply(*a, activation, True, grad_clip),
                                     tensors, grad)
    actual = outputs_and_gradients(lambda *a: IndRNNScanTriton.apply(*a, activation, grad_clip), tensors, grad)
    assert_equal(actual, expected, f"triton scan {activation} clip={grad_clip} T={steps} h0={with_h0}")
if sys.argv[1] == "full":  # float32 arithmetic: the float64 sequential result to float32 precision
    for activation in ("relu", "identity"):
        tensors, grad = recurrence_inputs(19, 3, 6, seed=5, dtype=torch.float32)
        actual = outputs_and_gradients(lambda *a: IndRNNScanTriton.apply(*a, activation, 0.5), tensors, grad)
        exact = outputs_and_gradients(lambda *a: IndRNNRecurrenceCPU.apply(*a, activation, True, 0.5),
                                      [t.detach().double().requires_grad_() for t in tensors], grad.double())
        for a, e in zip(actual, exact):
            assert a.dtype == torch.float32 and ((a.double() - e).abs().max() / e.abs().max()) < 1e-5
print("interpreter scan checks passed")
"""


def run_interpreter(cases: str) -> None:
    # TRITON_INTERPRET must be set before triton is imported, hence a fresh interpreter process.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    # RuntimeWarnings ignored: the interpreter evaluates both sides of tl.where (0 * inf in the unused one).
    result = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-c", INTERPRETER_SCRIPT, cases],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "interpreter scan checks passed" in result.stdout


@pytest.mark.slow  # 5-25 s (loaded): make test-slow, which CI runs too
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_scan_under_the_cpu_interpreter():
    run_interpreter("quick")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_scan_under_the_cpu_interpreter_every_case():
    run_interpreter("full")


def test_benchmark_stream_shape_set_runs_the_indrnn_kernels_side_by_side():
    from benchmarks.recurrence import SHAPE_SETS, STREAM_SHAPES, main

    assert SHAPE_SETS["stream"]["shapes"]["cpu"] == STREAM_SHAPES
    assert [name.split("_")[1:] for name in STREAM_SHAPES] == [["B1", "I1", "H128"]] * 3
    results = main(["--shape-set", "stream", "--shapes", "T300_B1_I1_H8", "--repeats", "1", "--warmup", "0",
                    "--budget-s", "0.1"])
    assert list(results["T300_B1_I1_H8"]) == ["indrnn", "indrnn_fused", "indrnn_scan"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="compiles the kernels with triton (no GPU needed), not under the interpreter")
def test_triton_scan_kernels_compile_for_sm90_without_spills():
    # The interpreter checks the arithmetic; this builds the compiled path for an H100/H200 with the
    # tiles the launches use, float32 and float64, every activation/clipping branch.
    from src.kernels.indrnn_scan import chunk_triton as kernels
    from tests.test_kernels_triton import _compile_for_hopper

    pointers = lambda names, dtype: {name: f"*{dtype}" for name in names}  # noqa: E731
    sizes = {name: "i32" for name in ("T", "BH", "H", "CHUNK_T", "TILES")}
    for dtype, double in (("fp32", False), ("fp64", True)):
        for activation, clip in ((0, True), (0, False), (2, True), (2, False)):
            tiles = {"DOUBLE": double, "BLOCK_T": kernels.BLOCK_T, "BLOCK_H": kernels.BLOCK_H}
            flags = {"ACTIVATION": activation, "CLIP": clip, **tiles}
            buffers = pointers(["src_ptr", "out_ptr", "u_ptr", "maps_ptr"], dtype)
            cases = {"carry": (kernels._carry_kernel, {
                **pointers(["maps_ptr", "first_ptr", "states_ptr"], dtype), "BH": "i32", "chunks": "i32",
                "last_chunk": "i32", "CHUNK_STRIDE": "i64"}, {"REVERSE": clip, "DOUBLE": double, "BLOCK": 128})}
            for backward in (False, True):
                direction = "backward" if backward else "forward"
                cases[f"{direction} compose"] = (kernels._compose_kernel, {
                    **buffers, **sizes, "CHUNK_STRIDE": "i64", "clip": "fp32"}, {**flags, "BACKWARD": backward})
                cases[f"{direction} apply"] = (kernels._apply_kernel, {
                    **pointers(["src_ptr", "out_ptr", "u_ptr", "h0_ptr", "states_ptr", "result_ptr", "grad_u_ptr",
                                "grad_h0_ptr"], dtype), **sizes, "clip": "fp32"}, {**flags, "BACKWARD": backward})
            for name, (kernel, signature, constexprs) in cases.items():
                _, spills = _compile_for_hopper(kernel, signature, constexprs, kernels.NUM_WARPS)
                assert spills == 0, f"{name} {dtype} activation {activation} clip {clip}: {spills} bytes spilled"
