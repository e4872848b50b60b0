"""Sections 1 to 3 of benchmarks/gpu_check.py (``make gpu-check``): the Triton kernels against float64,
CUDA-graph training steps against eager ones, and the IndRNN recurrence's bandwidth; with the helpers every section uses (:class:`Budget`, :func:`say`,
:func:`failure`).

1. ``kernels``: every Triton kernel against its float64 reference on the device (max relative error,
   values and gradients); on the CPU under Triton's interpreter (TRITON_INTERPRET=1, which
   gpu_check.py sets with ``--device cpu`` before triton is imported), else skipped.
2. ``graphs``: see :func:`run_graph_equality` (CUDA only).
3. ``indrnn_bandwidth``: the IndRNN recurrence alone (forward, backward) for several ``BLOCK_T`` and
   ``BLOCK``, as achieved GB/s against the device's copy bandwidth (see gpu_check.py's docstring).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

BLOCKS = [32, 128]  # IndRNN kernel: columns per program
BLOCK_TS = [1, 8, 16]  # IndRNN kernel: steps per tile (32 spills registers backward, ptxas sm_90)
BANDWIDTH_SHAPES = [(784, 64, 128), (1024, 128, 512)]
class Budget:
    """Seconds left of ``total``; ``fits(estimate)`` says whether a step of ``estimate`` s still fits."""

    def __init__(self, total: float) -> None:
        self.total, self.start = total, time.perf_counter()

    @property
    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)

    def fits(self, estimate: float) -> bool:
        return self.left >= estimate


def say(line: str) -> None:
    print(line, flush=True)


def failure(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"FAIL {type(error).__name__}: {text[0][:300] if text else ''}"


def kernels_can_run(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``; else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "CPU tensors need TRITON_INTERPRET=1 set before triton is imported (run this script with --device cpu)"


# --- 1. kernels against float64 ----------------------------------------------------------------------

def scan_error(shape: tuple[int, int, int], device: torch.device, grad_clip: float | None) -> float:
    """The Triton chunk scan (IndRNNScanTriton, float32) against the float64 reference loop: the largest
    error over the states and the gradients of z, u, h0, relative to the largest reference value (at least 1)."""
    from src.kernels.indrnn_scan.chunk_triton import IndRNNScanTriton
    from src.kernels.reference import indrnn_recurrence_reference

    generator = torch.Generator().manual_seed(0)
    T, B, H = shape
    raw = (torch.randn(T, B, H, generator=generator), torch.rand(H, generator=generator) * 2 - 1,
           torch.randn(B, H, generator=generator).abs())
    grad = torch.randn(T, B, H, generator=generator)

    def run(function, dtype, where):
        tensors = [t.to(where, dtype).requires_grad_() for t in raw]
        out = function(*tensors, "relu", grad_clip)
        return (out, *torch.autograd.grad(out, tensors, grad.to(where, dtype)))

    got = run(IndRNNScanTriton.apply, torch.float32, device)
    expected = run(indrnn_recurrence_reference, torch.float64, "cpu")
    worst = max(((g.double().cpu() - e).abs().max() / e.abs().max().clamp_min(1)).item() for g, e in zip(got, expected))
    assert worst <= 1e-3, f"IndRNN scan: error {worst:.1e}"
    return worst


def kernel_checks(device: torch.device, quick: bool) -> list[tuple[str, Callable[[], float]]]:
    """(name, check) pairs; each check returns the worst relative error (and raises past its tolerance)."""
    from tests.test_kernels_triton import compare
    from tests.test_kernels_triton_layers import LAYERS, check_clockwork, check_kernel, check_layer
    from tests.test_rtrl import random_chunk, run_chunk

    dev = device.type
    big = (9, 3, 50) if quick else (200, 64, 512)
    dense = (5, 3, 70) if quick else (50, 64, 512)

    def rtrl(n_diag: int, shape) -> float:
        read, state = random_chunk(*shape, n_diag, torch.float32, True)
        expected = run_chunk(read, state, "reference")
        moved = {k: (v.to(device) if v is not None else None) for k, v in read.items()}
        got = run_chunk(moved, {k: v.to(device) for k, v in state.items()}, "triton")
        worst = max(((got[k].cpu() - expected[k]).abs().max() / expected[k].abs().max().clamp_min(1)).item()
                    for k in expected)
        assert worst <= 1e-4, f"RTRL sensitivities: error {worst:.1e}"
        return worst

    checks: list[tuple[str, Callable[[], float]]] = []
    for activation in ("relu", "tanh", "identity"):
        checks.append((f"indrnn_{activation}_fp32", lambda a=activation: compare(*big, a, torch.float32, device=dev,
                                                                                  tol=1e-3)))
    checks.append(("indrnn_tanh_bf16", lambda: compare(*big, "tanh", torch.bfloat16, device=dev,
                                                       param_dtype=torch.float32)))
    checks.append(("indrnn_relu_clip_fp32", lambda: compare(*big, "relu", torch.float32, device=dev, grad_clip=0.5,
                                                            tol=1e-3)))
    # The interpreter runs the scan's many small programs slowly (45 s at 9 x 3 x 50): one tiny case when quick.
    for grad_clip in (0.5,) if quick else (None, 0.5):
        checks.append((f"indrnn_scan_relu{'_clip' if grad_clip else ''}_fp32",
                       lambda c=grad_clip: scan_error((9, 2, 6) if quick else (4096, 4, 256), device, c)))
    checks.append(("rtrl_n3", lambda: rtrl(3, (6, 2, 70, 40) if quick else (50, 16, 128, 64))))
    for gate, delays, activation in (("leak", (1,), "tanh"), ("clock", (1,), "relu"), ("none", (1, 2, 8), "tanh")):
        checks.append((f"dense_{gate}_{activation}_fp32",
                       lambda g=gate, d=delays, a=activation: check_kernel(*dense, d, a, g, torch.float32, device=dev)))
    checks.append(("dense_leak_tanh_fp64", lambda: check_kernel(*dense, (1,), "tanh", "leak", torch.float64,
                                                                device=dev)))
    checks.append(("clockwork_triangular_fp64", lambda: check_clockwork(
        T=4 if quick else 40, B=2 if quick else 64, H=160 if quick else 512, device=dev)))
    for name in LAYERS:
        checks.append((f"layer_{name}_fp64", lambda n=name: check_layer(
            n, T=7 if quick else 60, B=3 if quick else 32, H=8 if quick else 64, device=dev, chunks=None)))
    return checks


def run_kernels(device: torch.device, quick: bool, budget: Budget) -> dict:
    reason = kernels_can_run(device)
    if reason is not None:
        say(f"kernels: skipped ({reason})")
        return {"skipped": reason}
    results = {}
    for name, check in kernel_checks(device, quick):
        if not budget.fits(5.0):
            results[name] = "skipped (time budget)"
            continue
        started = time.perf_counter()
        try:
            results[name] = {"max_rel_error": check(), "seconds": round(time.perf_counter() - started, 2)}
            say(f"  kernel {name}: max error {results[name]['max_rel_error']:.1e} ({results[name]['seconds']} s)")
        except Exception as error:  # a failed check is a result: name it and go on
            results[name] = failure(error)
            say(f"  kernel {name}: {results[name]}")
    return results


# --- 3. IndRNN recurrence bandwidth --------------------------------------------------------------------

def _time_ms(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, quick: bool) -> float:
    """GB/s (1e9 bytes) of ``dst.copy_(src)``: reads and writes ``size`` bytes each."""
    size = 2 ** 20 if quick else 2 ** 30
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, 3 if quick else 10)
    return 2 * size / (ms * 1e-3) / 1e9


def run_bandwidth(device: torch.device, quick: bool, budget: Budget) -> dict:
    reason = kernels_can_run(device)
    if reason is not None:
        say(f"indrnn_bandwidth: skipped ({reason})")
        return {"skipped": reason}
    from src.kernels import indrnn_triton as kernel

    ceiling = copy_bandwidth_gbs(device, quick)
    results: dict = {"copy_gbs": round(ceiling, 1), "bytes_formula": "(2 fwd + 3 bwd) * T * B * H * itemsize",
                     "rows": {}}
    say(f"  copy bandwidth {ceiling:.0f} GB/s")
    shapes = [(9, 2, 40)] if quick else BANDWIDTH_SHAPES
    saved = kernel.BLOCK, kernel.BLOCK_T
    try:
        for T, B, H in shapes:
            z = torch.randn(T, B, H, device=device)
            u = torch.rand(H, device=device) * 2 - 1
            h0 = torch.zeros(B, H, device=device)
            grad = torch.randn(T, B, H, device=device)
            code = kernel.ACTIVATION_CODES["relu"]
            itemsize = z.element_size()
            for block, block_t in ([(32, 1), (128, 8)] if quick else [(b, t) for b in BLOCKS for t in BLOCK_TS]):
                key = f"T{T}_B{B}_H{H}_BLOCK{block}_BLOCK_T{block_t}"
                if not budget.fits(10.0):
                    results["rows"][key] = "skipped (time budget)"
                    continue
                kernel.BLOCK, kernel.BLOCK_T = block, block_t
                out = kernel._launch_forward(z, u, h0, code)
                repeats = 2 if quick else 20
                fwd_ms = _time_ms(lambda: kernel._launch_forward(z, u, h0, code), device, repeats)
                bwd_ms = _time_ms(lambda: kernel._launch_backward(grad, out, u, h0, code), device, repeats)
                n = T * B * H * itemsize
                row = {"fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "fwd_gbs": 2 * n / (fwd_ms * 1e-3) / 1e9,
                       "bwd_gbs": 3 * n / (bwd_ms * 1e-3) / 1e9}
                row["fwd_fraction_of_copy"] = row["fwd_gbs"] / ceiling
                row["bwd_fraction_of_copy"] = row["bwd_gbs"] / ceiling
                results["rows"][key] = {k: round(v, 4) for k, v in row.items()}
                say(f"  indrnn {key}: fwd {fwd_ms:.3f} ms {row['fwd_gbs']:.0f} GB/s, bwd {bwd_ms:.3f} ms "
                    f"{row['bwd_gbs']:.0f} GB/s ({row['fwd_fraction_of_copy']:.0%} / {row['bwd_fraction_of_copy']:.0%}"
                    " of copy)")
    finally:
        kernel.BLOCK, kernel.BLOCK_T = saved
    return results


# --- 2. CUDA-graph training steps against eager ones ----------------------------------------------------

def run_graph_equality(device: torch.device, quick: bool, budget: Budget) -> dict:
    """Section ``graphs``: 10 training steps of a 2-layer IndRNN (batch norm, a StepLR, a short last batch)
    with the forward, backward and optimizer update replayed from CUDA graphs, against the same steps
    run eagerly (tests/test_cuda_graph.py's loop), for SGD and Adam: the largest weight and loss
    differences and how many steps replayed. CUDA only (graphs do not exist on the CPU)."""
    if device.type != "cuda":
        say("graphs: skipped (CUDA graphs need a CUDA device)")
        return {"skipped": "CUDA graphs need a CUDA device"}
    import functools

    from tests.test_cuda_graph import make_network, random_batches, train

    results: dict = {}
    for name, make in (("sgd", functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)), ("adam", None)):
        if not budget.fits(20.0):
            results[name] = "skipped (time budget)"
            continue
        try:
            batches = random_batches(device, [16] * 10 + [5])
            eager_net, graphed_net = make_network(device), make_network(device)
            eager_losses, *_ = train(eager_net, batches, False, make)
            losses, reasons, forward, step, _ = train(graphed_net, batches, True, make)
            weights = max((a.float() - b.float()).abs().max().item()
                          for a, b in zip(graphed_net.state_dict().values(), eager_net.state_dict().values()))
            results[name] = {"max_weight_diff": weights, "max_loss_diff": (losses - eager_losses).abs().max().item(),
                             "forward_replays": forward.replays, "optimizer_replays": step.replays,
                             "eager_reasons": reasons}
        except Exception as error:
            results[name] = failure(error)
        say(f"  graphs {name}: {results[name]}")
    return results
