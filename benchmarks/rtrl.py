"""Time and peak memory of one training sequence: RTRL against BPTT, one IndRNN layer.

    python benchmarks/rtrl.py                                  # CPU, H=128, T = 1k, 10k, 100k
    python benchmarks/rtrl.py --steps 1000 10000 --batch 8 --json rtrl.json
    python benchmarks/rtrl.py --device cuda

The network is a one-layer IndRNN (relu, ``projection="linear"``, fused recurrence ``backend="auto"``)
with a linear readout, on the adding problem's shape (I = 2, one loss at the last step). A
training sequence is:

* ``bptt``: forward over all T steps, MSE at the last step, ``backward()`` (autograd keeps the
  layer's (T, B, H) outputs and projections for the backward pass: memory grows with T);
* ``rtrl``: :class:`src.learning.RTRL` (exact mode) over the sequence in chunks of ``--chunk``
  steps, the loss at the last step turned into gradients at once (memory bounded by the chunk).

Both end with the parameters' ``.grad`` filled (set to None before each pass). Reported per T and
method: ``ms`` (median wall time of ``--repeats`` passes after one warm-up pass, which also compiles
numba's loops or loads them from the disk cache) and ``peak_mem_mb`` (the peak memory a pass held
above what was allocated before it, the input excluded; measured as in benchmarks/recurrence.py:
torch's profiler plus tracemalloc on CPU, ``max_memory_allocated`` on CUDA). ``--json FILE`` writes
``{T: {method: {"ms": ..., "peak_mem_mb": ...}}}``.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `src` importable without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.recurrence import _cpu_peak_bytes, _cuda_peak_bytes, _synchronize, report  # noqa: E402
from src.layers import IndRNN  # noqa: E402
from src.learning import RTRL  # noqa: E402
from src.networks import RecurrentNetwork  # noqa: E402

METHODS = ("bptt", "rtrl")


def make_net(hidden: int, device: torch.device) -> RecurrentNetwork:
    torch.manual_seed(0)
    layer = functools.partial(IndRNN, u_bound=1.0, backend="auto")
    return RecurrentNetwork(layer, input_size=2, output_size=1, hidden_size=hidden, num_layers=1,
                            readout="last").to(device)


def training_pass(method: str, net: RecurrentNetwork, inputs: torch.Tensor, targets: torch.Tensor,
                  chunk: int) -> Callable[[], None]:
    """One training sequence by ``method``: afterwards every parameter's ``.grad`` holds its gradient."""
    parameters = list(net.parameters())
    rtrl = RTRL(net, mode="exact") if method == "rtrl" else None

    def run() -> None:
        for p in parameters:
            p.grad = None
        if rtrl is None:
            predictions, _ = net(inputs)
            torch.nn.functional.mse_loss(predictions, targets).backward()
            return
        rtrl.reset(inputs.shape[0])
        steps = inputs.shape[1]
        for start in range(0, steps, chunk):
            last = start + chunk >= steps
            rtrl.accumulate(inputs[:, start:start + chunk],
                            lambda p, last=last: torch.nn.functional.mse_loss(p[:, -1], targets) if last else None)
    return run


def measure(method: str, steps: int, batch: int, hidden: int, chunk: int, repeats: int,
            device: torch.device) -> dict[str, float]:
    net = make_net(hidden, device)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.rand(batch, steps, 2, generator=generator).to(device)
    targets = torch.rand(batch, 1, generator=generator).to(device)
    run = training_pass(method, net, inputs, targets, chunk)
    run()  # warm-up
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    for p in net.parameters():
        p.grad = None
    peak = _cuda_peak_bytes(run, device) if device.type == "cuda" else _cpu_peak_bytes(run)
    return {"ms": statistics.median(times) * 1e3, "peak_mem_mb": peak / 2**20}


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    header = ["T", "method", "ms", "peak_mem_mb", "ms_vs_bptt", "mem_vs_bptt"]
    rows = []
    for steps, by_method in results.items():
        for method, row in by_method.items():
            base = by_method.get("bptt")
            ratios = [f"{row[k] / base[k]:.2f}x" if base and base[k] > 0 else "-" for k in ("ms", "peak_mem_mb")]
            rows.append([steps, method, f"{row['ms']:.1f}", f"{row['peak_mem_mb']:.2f}", *ratios])
    widths = [max(len(line[col]) for line in [header] + rows) for col in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmarks/rtrl.py", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, nargs="+", default=[1_000, 10_000, 100_000], help="sequence lengths T")
    parser.add_argument("--batch", type=int, default=16, help="sequences per training pass, B (default 16)")
    parser.add_argument("--hidden", type=int, default=128, help="units H (default 128)")
    parser.add_argument("--chunk", type=int, default=1_000, help="RTRL steps per chunk (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes, median (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--json", metavar="FILE", help="write {T: {method: {ms, peak_mem_mb}}} to FILE")
    args = parser.parse_args(argv)
    for name in ("batch", "hidden", "chunk", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(t < 1 for t in args.steps):
        parser.error(f"--steps must be positive, got {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but CUDA is not available here; use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.device} ({torch.get_num_threads()} threads), one IndRNN layer "
          f"H={args.hidden}, I=2, B={args.batch}, RTRL chunk {args.chunk}, median of {args.repeats}", flush=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for steps in args.steps:
        results[str(steps)] = {}
        for method in args.methods:
            row = measure(method, steps, args.batch, args.hidden, args.chunk, args.repeats, device)
            results[str(steps)][method] = row
            print(f"  T={steps} {method}: {row['ms']:.1f} ms, peak {row['peak_mem_mb']:.2f} MiB",
                  file=sys.stderr, flush=True)
    return report(results, format_table(results), args.json)


if __name__ == "__main__":
    main()
