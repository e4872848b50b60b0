"""How much a second (third, ...) CPU thread gives the fused IndRNN loops on this machine.

    python benchmarks/thread_scaling.py                                  # 2 threads, the stream shapes
    python benchmarks/thread_scaling.py --threads 4 --shapes T100000_B1_I1_H128 --json scaling.json

Why: the chunked CPU scan (``model.layer.backend=scan``) splits one sequence over threads, so it can at
best run in 1 / scaling of the sequential kernel's time, where scaling is how much more work N threads
do than one. A machine whose cores share one physical core's vector units, or one memory channel, gives
less than N; this script measures that bound, without any scan.

For each shape (``T{T}_B{B}_I{I}_H{H}``, the layer of benchmarks/recurrence.py: projection inside the
loop, relu, float32) and each pass (``fwd``: ``linear_forward_steps``; ``bwd``: ``linear_backward_steps``),
it times one copy of the loop alone (``one_ms``), then N copies side by side on N threads, each on its
own arrays (``side_by_side_ms``, the time until the last one ends); ``scaling`` = N * one_ms /
side_by_side_ms (N for perfect scaling) and ``best_scan_ratio`` = 1 / scaling. Each figure is the
fastest of ``--repeats`` runs after ``--warmup`` untimed ones. ``--json FILE`` writes
``{shape: {pass: {"one_ms", "side_by_side_ms", "scaling", "best_scan_ratio"}}}``.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `src` and `benchmarks` importable without installing
    sys.path.insert(0, str(ROOT))

from benchmarks.recurrence import STREAM_SHAPES, Shape, parse_shape, report  # noqa: E402
from src.kernels.indrnn_cpu import numba_available  # noqa: E402

PASSES = ("fwd", "bwd")


def loop_copy(shape: Shape, seed: int) -> dict[str, Callable[[], None]]:
    """One copy of the layer's arrays and its two loops (``{"fwd": ..., "bwd": ...}``), each a thunk."""
    import numpy as np

    from src.kernels.indrnn_linear_cpu import linear_backward_steps, linear_forward_steps

    rng = np.random.default_rng(seed)
    steps, batch, inputs, hidden = shape
    x = rng.standard_normal((steps, batch, inputs), dtype=np.float32)
    weight_t = rng.standard_normal((inputs, hidden), dtype=np.float32)
    bias = np.zeros(hidden, dtype=np.float32)
    u = rng.uniform(0, 1, hidden).astype(np.float32)
    h0 = np.zeros((batch, hidden), dtype=np.float32)
    out = np.empty((steps, batch, hidden), dtype=np.float32)
    grad = rng.standard_normal((steps, batch, hidden), dtype=np.float32)
    grad_x, partial_w = np.empty_like(x), np.zeros((batch, inputs, hidden), dtype=np.float32)
    rows = [np.zeros((batch, hidden), dtype=np.float32) for _ in range(4)]

    def forward() -> None:
        linear_forward_steps(x, weight_t, bias, u, h0, 0, 0, steps, out)

    def backward() -> None:
        partial_b, partial_u, delta_next, delta_first = rows
        linear_backward_steps(grad, False, out, x, weight_t, u, h0, 0, 0.0, 0, steps, delta_next, grad_x, partial_w,
                              partial_b, partial_u, delta_first)

    forward()  # compiles (or loads) the kernels and fills `out` for the backward pass
    return {"fwd": forward, "bwd": backward}


def _fastest_ms(run: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def measure(shape: Shape, threads: int, warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """``{pass: {"one_ms", "side_by_side_ms", "scaling", "best_scan_ratio"}}`` for one shape."""
    copies = [loop_copy(shape, seed) for seed in range(threads)]
    results = {}
    with ThreadPoolExecutor(threads - 1) as pool:  # the kernels are compiled nogil: the threads run at once
        for name in PASSES:
            def side_by_side(name=name) -> None:
                futures = [pool.submit(copy[name]) for copy in copies[1:]]
                copies[0][name]()
                for future in futures:
                    future.result()

            one = _fastest_ms(copies[0][name], warmup, repeats)
            together = _fastest_ms(side_by_side, warmup, repeats)
            scaling = threads * one / together
            results[name] = {"one_ms": one, "side_by_side_ms": together, "scaling": scaling,
                             "best_scan_ratio": 1.0 / scaling}
    return results


def format_table(results: dict[str, dict[str, dict[str, float]]], threads: int) -> str:
    header = ["shape", "pass", "one_ms", f"{threads}_side_by_side_ms", "scaling", "best_scan_ratio"]
    lines = [header]
    for shape, passes in results.items():
        for name, row in passes.items():
            lines.append([shape, name, f"{row['one_ms']:.2f}", f"{row['side_by_side_ms']:.2f}",
                          f"{row['scaling']:.2f}x", f"{row['best_scan_ratio']:.2f}"])
    widths = [max(len(line[k]) for line in lines) for k in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=STREAM_SHAPES[:2], help="T{T}_B{B}_I{I}_H{H} (default: "
                        "the first two stream shapes)")
    parser.add_argument("--threads", type=int, default=2, help="copies run side by side (default 2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 2:
        parser.error(f"--threads {args.threads}: side by side needs at least 2")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    if not numba_available():
        parser.error("numba is not installed: the fused CPU loops this script times need it (pip install numba)")
    try:
        shapes = [parse_shape(name) for name in args.shapes]
    except ValueError as error:
        parser.error(str(error))
    results = {shape.name: measure(shape, args.threads, args.warmup, args.repeats) for shape in shapes}
    return report(results, format_table(results, args.threads), args.json)


if __name__ == "__main__":
    main()
