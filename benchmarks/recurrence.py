"""Speed and memory of one recurrent layer, side by side: the fused IndRNN against torch's RNNs.

    python benchmarks/recurrence.py                       # CPU, the default shapes, every layer
    python benchmarks/recurrence.py --device cuda --json bench.json
    python benchmarks/recurrence.py --shapes T100_B32_I8_H64 --impls indrnn lstm --repeats 20
    python benchmarks/recurrence.py --shape-set stream    # one stream (B=1, H=128), T = 1e4, 1e5, 1e6

Each run times ONE layer (``batch_first=True``) on a batch-first input x of shape (B, T, I) that
does not require grad; the layer's parameters do. For every shape and implementation it reports:

* ``fwd_bwd_ms``: a training step of the layer: forward, then ``output.backward(g)`` with a fixed
  random gradient g, a contiguous (B, T, H) tensor as a downstream layer would pass (parameter
  gradients are reset to None before each pass, as ``optimizer.zero_grad()`` does, so they are
  allocated anew every time).
* ``fwd_ms``: inference cost, the forward pass under ``torch.no_grad()`` (no graph is recorded,
  nothing is saved for backward).
* ``peak_mem_mb``: peak memory of the fwd+bwd pass in MiB (2**20 bytes), counted *above* what was
  already allocated before it (input, parameters and g are excluded; the output, the activations
  saved for backward, temporaries and the new gradients are included), measured in one extra,
  untimed pass:

  - CUDA: ``torch.cuda.max_memory_allocated()`` (peak stats reset just before the pass) minus
    ``torch.cuda.memory_allocated()`` at its start.
  - CPU: torch has no allocator statistics on CPU, so the pass runs under
    ``torch.profiler.profile(profile_memory=True)``, which records every allocation and free of
    torch's CPU allocator (+bytes / -bytes, with a timestamp); the peak of their running sum is
    the most memory the pass held at once, i.e. what the activations kept for backward really
    cost. The fused IndRNN kernel allocates its buffers with numpy, which torch does not see: the
    peak that tracemalloc records during the pass (numpy's buffers and Python objects) is added,
    an upper bound on the true peak. Memory neither sees is left out, e.g. whatever oneDNN (torch's
    CPU LSTM) keeps internally; its workspace saved for backward is a torch tensor and is counted.

Times are medians over ``--repeats`` timed passes after ``--warmup`` untimed ones (the warm-up also
triggers numba compilation / loading from its disk cache). Slow implementations stop early: once a
measurement has at least 3 timed passes (or ``--repeats`` if fewer) and has spent half of
``--budget-s`` (default 10 s per implementation and shape) in timed passes, its median is taken;
likewise the warm-up stops after the first pass that fills that half budget.
On CUDA, ``torch.cuda.synchronize()`` brackets every timed pass. Threads are torch's default for
the machine; on CPU freed host memory is kept for reuse, as CPU training runs do (``trainer.keep_freed_memory``,
:mod:`lightning_modules.run.host_memory`; ``--glibc-malloc-defaults``: not, so every pass maps fresh pages
for its tensors over 32 MiB); nothing else is tuned (no flush-to-zero, no pinning). The speed-up columns of the
table divide the ``fwd_bwd_ms`` of lstm (resp. indrnn_reference) by that of the row's
implementation.

Implementations live in :data:`benchmarks.layers.IMPLS`, a registry ``name -> factory(input_size,
hidden_size, device) -> nn.Module``; a new layer is one line there (the module must follow
torch.nn.RNN's contract with ``batch_first=True``: ``forward(x) -> (output, state)``). Without
``--impls`` every layer that runs on the device is timed (``*_triton``/``*_graphs`` rows: CUDA only).

Shapes are named ``T{T}_B{B}_I{I}_H{H}``; any such name is accepted by ``--shapes``. ``--shape-set``
picks a named set of :data:`SHAPE_SETS`: ``default`` (the shapes above) or ``stream`` (one long
sequence, B=1 H=128, T = 10^4, 10^5, 10^6: where the sequential IndRNN kernel uses one core and the
scan uses them all), each with its default implementations (``stream``: the IndRNN kernels only, as
an autograd loop or LSTM of 10^6 steps would take minutes). The IndRNN rows: ``indrnn`` (backend
"auto"), ``indrnn_fused`` (the sequential fused kernel, never the scan), ``indrnn_scan`` (the
clamp-affine scan, parallel over time) and ``indrnn_reference`` (the autograd loop).
``--precision`` applies to every implementation alike: ``fp32`` (default: full float32 matmuls and
convolutions, TF32 off), ``tf32`` (``torch.backends.cuda.matmul.allow_tf32`` and cuDNN's
``allow_tf32`` on, float32 matmul precision "high"; a no-op on CPU) or ``bf16`` (every pass under
``torch.autocast`` with bfloat16, on either device; torch's CPU LSTM/GRU need a CPU with
bfloat16 instructions for it, oneDNN refuses them otherwise).
``--json FILE`` writes ``{shape: {impl: {"fwd_bwd_ms": ..., "fwd_ms": ..., "peak_mem_mb": ...}}}``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tracemalloc
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `src` importable without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.layers import IMPLS, Factory, impls_for  # noqa: E402
from lightning_modules.run.host_memory import freed_memory_kept, glibc_malloc, keep_freed_memory  # noqa: E402
from src.kernels import numba_available, resolve_backend  # noqa: E402

# The speed-up columns of the table are relative to these (when they are part of the run).
BASELINES = ("lstm", "indrnn_reference")
METRICS = ("fwd_bwd_ms", "fwd_ms", "peak_mem_mb")


class Shape(NamedTuple):
    T: int
    B: int
    I: int  # noqa: E741 - the paper's name for the input size
    H: int

    @property
    def name(self) -> str:
        return f"T{self.T}_B{self.B}_I{self.I}_H{self.H}"


SHAPE_PATTERN = re.compile(r"T(\d+)_B(\d+)_I(\d+)_H(\d+)")

DEFAULT_SHAPES = {
    "cpu": ["T784_B64_I1_H128",     # sequential MNIST
            "T1000_B50_I2_H128",    # adding problem, T=1000
            "T100_B128_I512_H512",   # a wide layer on short sequences
            "T784_B64_I1_H512"],     # sequential MNIST with a wide layer (Clockwork vs nn.RNN)
}
DEFAULT_SHAPES["cuda"] = DEFAULT_SHAPES["cpu"] + ["T1024_B128_I512_H512"]
STREAM_SHAPES = ["T10000_B1_I1_H128", "T100000_B1_I1_H128", "T1000000_B1_I1_H128"]
# Named shape sets: shapes per device and the implementations run when --impls is not given.
SHAPE_SETS = {
    "default": {"shapes": DEFAULT_SHAPES, "impls": None},  # None: every layer that runs on the device
    "stream": {"shapes": {"cpu": STREAM_SHAPES, "cuda": STREAM_SHAPES + ["T16384_B4_I1_H256"]},
               "impls": ["indrnn", "indrnn_fused", "indrnn_scan"]},
}


def parse_shape(name: str) -> Shape:
    """``"T784_B64_I1_H128"`` -> Shape(784, 64, 1, 128); a one-line ValueError for anything else."""
    match = SHAPE_PATTERN.fullmatch(name)
    if match is None or any(int(v) < 1 for v in match.groups()):
        raise ValueError(f"bad shape {name!r}: expected T{{T}}_B{{B}}_I{{I}}_H{{H}} with positive integers, "
                         f"e.g. T784_B64_I1_H128")
    return Shape(*(int(v) for v in match.groups()))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int, budget_s: float) -> float:
    """Median wall time of ``fn`` in ms over up to ``repeats`` passes (early stop, see module doc)."""
    spent = 0.0
    for _ in range(warmup):  # slow passes: one warm-up is enough once they fill the budget
        if spent >= budget_s:
            break
        start = time.perf_counter()
        fn()
        _synchronize(device)
        spent += time.perf_counter() - start
    least = min(3, repeats)
    times: list[float] = []
    while len(times) < repeats:
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
        if len(times) >= least and sum(times) >= budget_s:
            break
    return statistics.median(times) * 1e3


@contextlib.contextmanager
def _without_profiler_banner() -> Iterator[None]:
    """Drop the "USDT:"/"STAGE:" lines Kineto writes to fd 2 around each profiled pass; keep the rest."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if not re.match(r"(USDT|STAGE):", line):
                    print(line, file=sys.stderr)


def _cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes held by ``fn``: torch's allocations (torch.profiler) plus tracemalloc's peak.

    The fused CPU kernel allocates its buffers with numpy (for huge pages), which torch's profiler
    does not see; numpy reports them to tracemalloc (with the Python objects ``fn`` creates). The
    two peaks are added: an upper bound on the true peak, exact when one allocator is idle.
    """
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_banner(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tracemalloc.start()
        try:
            fn()
            _, untracked_by_torch = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    events = [(event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
              if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda event: event[0])  # stable: simultaneous events keep their recorded order
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak + untracked_by_torch


def _cuda_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


PRECISIONS = ("fp32", "tf32", "bf16")


def set_precision(precision: str) -> None:
    """TF32 on for "tf32", off otherwise (matmuls and cuDNN); "bf16" is autocast, see :func:`autocast`."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def autocast(precision: str, device: torch.device):
    """bfloat16 autocast for "bf16", else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure(factory: Factory, shape: Shape, device: torch.device, warmup: int, repeats: int,
            budget_s: float, precision: str = "fp32") -> dict[str, float]:
    """fwd_bwd_ms, fwd_ms and peak_mem_mb of the layer ``factory`` builds, on one shape."""
    torch.manual_seed(0)
    layer = factory(shape.I, shape.H, device)
    x = torch.randn(shape.B, shape.T, shape.I, device=device)
    params = [p for p in layer.parameters() if p.requires_grad]
    # Contiguous (B, T, H), the layout a downstream op hands back, whatever the output's strides.
    grad_output = torch.randn(shape.B, shape.T, shape.H, device=device)

    def clear_grads() -> None:
        for p in params:
            p.grad = None

    def fwd_bwd() -> None:
        clear_grads()
        with autocast(precision, device):
            output = layer(x)[0]
        output.backward(grad_output.to(output.dtype))

    def fwd() -> None:
        with torch.no_grad(), autocast(precision, device):
            layer(x)

    fwd_bwd_ms = _median_ms(fwd_bwd, device, warmup, repeats, budget_s / 2)
    fwd_ms = _median_ms(fwd, device, warmup, repeats, budget_s / 2)
    clear_grads()  # freed before the memory pass, so it only sees its own allocations
    if device.type == "cuda":
        peak = _cuda_peak_bytes(fwd_bwd, device)
    else:
        peak = _cpu_peak_bytes(fwd_bwd)
    return {"fwd_bwd_ms": float(fwd_bwd_ms), "fwd_ms": float(fwd_ms), "peak_mem_mb": float(peak / 2**20)}


def run(shapes: list[str], impls: list[str], device: str = "cpu", warmup: int = 2, repeats: int = 10,
        budget_s: float = 10.0, progress: Callable[[str], None] | None = None,
        precision: str = "fp32") -> dict[str, dict[str, dict[str, float]]]:
    """Measure every implementation on every shape: ``{shape: {impl: {metric: value}}}``."""
    dev = torch.device(device)
    set_precision(precision)
    parsed = [parse_shape(name) for name in shapes]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for shape in parsed:
        results[shape.name] = {}
        for impl in impls:
            started = time.perf_counter()
            results[shape.name][impl] = measure(IMPLS[impl], shape, dev, warmup, repeats, budget_s, precision)
            if progress is not None:
                row = results[shape.name][impl]
                progress(f"{shape.name} {impl}: fwd+bwd {row['fwd_bwd_ms']:.2f} ms, fwd {row['fwd_ms']:.2f} ms, "
                         f"peak {row['peak_mem_mb']:.2f} MiB ({time.perf_counter() - started:.1f} s)")
    return results


def _number(value: float) -> str:
    return f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.1e}"


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Rows shape x impl; columns the three metrics and the fwd+bwd speed-up over each baseline."""
    header = ["shape", "impl", "fwd_bwd_ms", "fwd_ms", "peak_mem_mb"] + [f"x_vs_{b}" for b in BASELINES]
    rows = []
    for shape, by_impl in results.items():
        for impl, row in by_impl.items():
            speedups = []
            for base in BASELINES:
                if base in by_impl and row["fwd_bwd_ms"] > 0:
                    speedups.append(f"{by_impl[base]['fwd_bwd_ms'] / row['fwd_bwd_ms']:.2f}x")
                else:
                    speedups.append("-")
            rows.append([shape, impl, _number(row["fwd_bwd_ms"]), _number(row["fwd_ms"]),
                         _number(row["peak_mem_mb"]), *speedups])
    widths = [max(len(line[col]) for line in [header] + rows) for col in range(len(header))]
    left = 2  # shape and impl are left-aligned, numbers right-aligned

    def fmt(line: list[str]) -> str:
        return "  ".join(cell.ljust(w) if col < left else cell.rjust(w)
                         for col, (cell, w) in enumerate(zip(line, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    previous = None
    for line in rows:
        if previous is not None and line[0] != previous:
            lines.append("")
        lines.append(fmt(line))
        previous = line[0]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/recurrence.py",
        description="Time one recurrent layer (fwd+bwd, fwd under no_grad) and its peak memory, "
                    "for several implementations side by side.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="FILE", help="write {shape: {impl: {metric: value}}} to FILE")
    parser.add_argument("--shapes", nargs="+", metavar="NAME",
                        help="T{T}_B{B}_I{I}_H{H} names (default: "
                             f"{' '.join(DEFAULT_SHAPES['cpu'])}; on cuda also {DEFAULT_SHAPES['cuda'][-1]})")
    parser.add_argument("--shape-set", choices=list(SHAPE_SETS), default="default",
                        help="a named set of shapes, with its default implementations (default: default; "
                             f"stream: {' '.join(STREAM_SHAPES)}); --shapes overrides its shapes")
    parser.add_argument("--impls", nargs="+", metavar="NAME", choices=list(IMPLS),
                        help=f"implementations to run (default: every one of {', '.join(IMPLS)} that runs on the device; for --shape-set "
                             f"stream: {' '.join(SHAPE_SETS['stream']['impls'])})")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per measurement (median; default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes first (default 2)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 (default), tf32 (CUDA matmuls/cuDNN) or bf16 (autocast), for every implementation")
    parser.add_argument("--budget-s", type=float, default=10.0,
                        help="seconds of timed passes per implementation and shape, half for fwd+bwd and half "
                             "for fwd; a measurement stops there once it has 3 passes (default 10)")
    parser.add_argument("--glibc-malloc-defaults", action="store_true",
                        help="leave glibc's malloc at its defaults (fresh pages for every large tensor) instead of "
                             "keeping freed memory for reuse as training runs do (trainer.keep_freed_memory)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    shape_set = SHAPE_SETS[args.shape_set]
    shapes = args.shapes or shape_set["shapes"][args.device]
    for name in shapes:
        try:
            parse_shape(name)
        except ValueError as error:
            parser.error(str(error))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device cuda, but CUDA is not available here (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu")
    impls = list(dict.fromkeys(args.impls or shape_set["impls"] or impls_for(args.device)))  # no repeats, in order

    if args.device == "cpu" and not args.glibc_malloc_defaults:  # as a CPU training run (build_trainer)
        keep_freed_memory()
    host_memory = "kept for reuse" if freed_memory_kept() else "glibc defaults" if glibc_malloc() else "system malloc"
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, device {args.device} ({name}), indrnn backend auto -> "
          f"{resolve_backend('auto', device)} (numba {'yes' if numba_available() else 'no'}), "
          f"precision {args.precision}, warmup {args.warmup}, median of <= {args.repeats} repeats, "
          f"host memory {host_memory}", flush=True)

    def progress(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    results = run(shapes, impls, args.device, args.warmup, args.repeats, args.budget_s, progress, args.precision)
    return report(results, format_table(results), args.json)


def report(results: dict, table: str, json_path: str | os.PathLike | None) -> dict:
    """Print a benchmark's table; write its results as JSON to ``json_path`` if given (every benchmark)."""
    print(table, flush=True)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
