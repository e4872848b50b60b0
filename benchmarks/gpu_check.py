"""Every GPU target of the project in one command, within a time budget: ``make gpu-check``.

    python benchmarks/gpu_check.py                          # CUDA, <= 8 minutes, JSON in outputs/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --quick     # tiny sizes on the CPU (what CI runs)

Sections, in this order (the cheap, decisive ones first), each timed against ``--budget-s``
(default 480 s): a measurement that would not fit in what is left is skipped and named in the
output, so one call on a fresh machine always finishes and reports what it measured.

1. ``kernels``: every Triton kernel against its float64 reference on the device (max relative
   error, values and gradients): IndRNN (fp32, bf16, per-step clipping), RTRL's sensitivity
   update, the dense kernel of the leaky / Clockwork / skip layers and those layers end to end.
   On the CPU they run under Triton's interpreter when this script sets ``TRITON_INTERPRET=1``
   (it does with ``--device cpu`` when triton is not imported yet), else they are skipped.
2. ``graphs``: CUDA-graph training steps (forward, backward and the optimizer step replayed) against
   eager ones, 10 steps each with SGD and Adam: the largest weight and loss differences (CUDA only).
3. ``indrnn_bandwidth``: the IndRNN recurrence alone (forward, backward) at T784_B64_H128 and
   T1024_B128_H512 for several time-tile heights ``BLOCK_T`` and program widths ``BLOCK``, as achieved GB/s:
   bytes = (2 + 3) * T * B * H * itemsize (forward reads z and writes h; backward reads g and h
   and writes dz; u, h0 and the (B, H) partials are negligible), GB/s = bytes / time. The device's
   copy bandwidth (``dst.copy_(src)`` of 1 GiB, read + write) is measured as the ceiling it is
   compared with.
4. ``train_step``: benchmarks/train_step.py's ``measure`` (pipeline, bare, GPU busy, each with and
   without CUDA graphs; the pipeline's graphs include the optimizer step) for indrnn_pmnist_6layer,
   lstm_pmnist, indrnn_adding_t1000, cwrnn_smnist.
5. ``recurrence``: (its target rows first, as ``recurrence_targets`` before ``train_step``)
   benchmarks/recurrence.py's table (fwd+bwd, fwd, peak memory) for every layer at
   T784_B64_I1_H128, T784_B64_I1_H512 and T1024_B128_I512_H512, at fp32, tf32 and bf16: every row of
   benchmarks/layers.py, the loop layers (leaky, skip, Jordan, NARX, TDNN) with their Triton versions
   (``*_triton``: leaky, skip, Clockwork, Jordan) and CUDA-graph-captured versions (``*_graphs``:
   :class:`lightning_modules.cuda_graph.GraphedForward` on the layer) included; and the IndRNN scan
   against the sequential kernel (``indrnn_scan``, ``indrnn_fused``) at SCAN_SHAPES.

Sections 1 to 3 live in benchmarks/gpu_kernel_checks.py; this file runs every section and the targets.

Then the issue's targets with the measured value and pass/fail (``targets``), printed as a table;
``--json FILE`` (default outputs/gpu_check.json) holds everything.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project importable without installing
    sys.path.insert(0, str(ROOT))


def _cpu_requested(argv: list[str]) -> bool:
    return any(a == "cpu" and i > 0 and argv[i - 1] == "--device" for i, a in enumerate(argv)) or "--device=cpu" in argv


if __name__ == "__main__" and _cpu_requested(sys.argv) and "triton" not in sys.modules:
    # The Triton kernels can run on CPU tensors only under the interpreter, set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks import recurrence  # noqa: E402
from benchmarks.gpu_kernel_checks import (Budget, failure, kernels_can_run, run_bandwidth, run_graph_equality,  # noqa: E402
                                          run_kernels, say)

SHAPES = ["T784_B64_I1_H128", "T784_B64_I1_H512", "T1024_B128_I512_H512"]
QUICK_SHAPES = ["T12_B4_I2_H16"]
# issue 22: the scan against the sequential Triton kernel, one long stream per column block (CUDA, fp32).
SCAN_SHAPES = ["T16384_B4_I1_H256", "T784_B64_I1_H128"]
SCAN_IMPLS = ("indrnn_fused", "indrnn_scan")
PRECISIONS = ["fp32", "tf32", "bf16"]
EXPERIMENTS = ["indrnn_pmnist_6layer", "lstm_pmnist", "indrnn_adding_t1000", "cwrnn_smnist"]


# --- 4. train_step -----------------------------------------------------------------------------------

def run_train_step(device: torch.device, quick: bool, budget: Budget) -> dict:
    try:
        from benchmarks import train_step
    except ImportError as error:  # the training stack (Lightning, Hydra) is not installed here
        say(f"train_step: skipped ({error})")
        return {"skipped": str(error)}
    import logging
    import warnings

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    for noisy in ("pytorch_lightning", "lightning_fabric", "lightning_modules"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    experiments = EXPERIMENTS[2:3] if quick else EXPERIMENTS
    extra = ["model.hidden_size=8", "task.seq_len=10", "task.datamodule.batch_size=4"] if quick else []
    steps, warmup = (2, 1) if quick else (30, 5)
    results: dict = {}
    estimate = 5.0 if quick else 45.0
    for name in experiments:
        if not budget.fits(estimate):
            results[name] = "skipped (time budget)"
            say(f"  train_step {name}: skipped (time budget)")
            continue
        started = time.perf_counter()
        try:
            row = train_step.measure(name, train_step.EXPERIMENTS[name], device, steps, warmup, steps, extra,
                                     graphs=True)
            results[name] = row
            say(f"  train_step {name}: {row} ({time.perf_counter() - started:.0f} s)")
        except Exception as error:
            results[name] = failure(error)
            say(f"  train_step {name}: {results[name]}")
            traceback.print_exc()
        estimate = max(estimate, 1.2 * (time.perf_counter() - started))
    valid = {k: v for k, v in results.items() if isinstance(v, dict)}
    if valid:
        say(train_step.format_table(valid))
    return results


# --- 5. the recurrence table -----------------------------------------------------------------------

def recurrence_jobs(quick: bool, impls: list[str], targets_only: bool = False) -> list[tuple[str, str, str]]:
    """(precision, shape, impl) in table order; ``targets_only``: the rows the issue's targets read
    (every layer at T784_B64_I1_H512 fp32; lstm, indrnn and rnn_tanh at T1024_B128_I512_H512 tf32/bf16;
    indrnn_fused and indrnn_scan at SCAN_SHAPES fp32, not with ``quick``)."""
    shapes = QUICK_SHAPES if quick else SHAPES
    precisions = ["fp32"] if quick else PRECISIONS
    jobs = []
    for precision in precisions:
        # Under bf16 autocast a graphed layer runs eagerly (cuda_graph.py): its row would repeat the plain one.
        chosen = [name for name in impls if not (precision == "bf16" and name.endswith("_graphs"))]
        for shape in shapes:
            for impl in chosen:
                if targets_only and not (
                        (precision == "fp32" and shape == (shapes[0] if quick else "T784_B64_I1_H512")) or
                        (shape == "T1024_B128_I512_H512" and impl in ("lstm", "indrnn", "rnn_tanh"))):
                    continue
                jobs.append((precision, shape, impl))
    if not quick:  # the scan's targets (T784_B64_I1_H128 is in SHAPES already, but not in targets_only)
        jobs += [("fp32", shape, impl) for shape in SCAN_SHAPES for impl in SCAN_IMPLS
                 if impl in impls and ("fp32", shape, impl) not in jobs]
    return jobs


def run_recurrence(device: torch.device, quick: bool, budget: Budget, only: list[str] | None = None,
                   targets_only: bool = False, previous: dict | None = None) -> dict:
    """``{precision: {shape: {impl: row or reason}}}``; rows already in ``previous`` are kept, not re-measured.
    ``targets_only`` measures the targets' rows first (a section of their own, before train_step)."""
    impls = list(recurrence.IMPLS)
    if only:
        unknown = sorted(set(only) - set(impls))
        if unknown:
            raise ValueError(f"unknown --impls {unknown}; choose from {impls}")
        impls = [name for name in impls if name in only]
    if device.type != "cuda" or kernels_can_run(device) is not None:  # the Triton layers need CUDA
        impls = [name for name in impls if not name.endswith("_triton")]
    per_measurement = 0.2 if quick else 0.6  # recurrence.py's --budget-s: half fwd+bwd, half fwd
    results: dict = {p: {s: dict(rows) for s, rows in t.items()} for p, t in (previous or {}).items()}
    estimate = 2.0
    for precision, shape, impl in recurrence_jobs(quick, impls, targets_only):
        table = results.setdefault(precision, {}).setdefault(shape, {})
        if isinstance(table.get(impl), dict):
            continue
        if not budget.fits(estimate):
            table[impl] = "skipped (time budget)"
            continue
        started = time.perf_counter()
        try:
            table[impl] = recurrence.run([shape], [impl], device.type, warmup=1, repeats=3 if quick else 5,
                                         budget_s=per_measurement, precision=precision)[shape][impl]
            say(f"  recurrence {precision} {shape} {impl}: fwd+bwd {table[impl]['fwd_bwd_ms']:.2f} ms")
        except Exception as error:
            table[impl] = failure(error)
            say(f"  recurrence {precision} {shape} {impl}: {table[impl]}")
        estimate = max(2.0, min(30.0, 1.5 * (time.perf_counter() - started)))
    recurrence.set_precision("fp32")
    if not targets_only:
        for precision, table in results.items():
            measured = {s: {i: r for i, r in rows.items() if isinstance(r, dict)} for s, rows in table.items()}
            say(f"recurrence, {precision}:")
            say(recurrence.format_table({s: rows for s, rows in measured.items() if rows}))
            for s, rows in table.items():
                for i, r in rows.items():
                    if not isinstance(r, dict):
                        say(f"  {s} {i}: {r}")
    return results


# --- targets -------------------------------------------------------------------------------------

def _ms(results: dict, precision: str, shape: str, impl: str) -> float | None:
    row = results.get("recurrence", {}).get(precision, {}).get(shape, {}).get(impl)
    return row["fwd_bwd_ms"] if isinstance(row, dict) else None


def targets(results: dict) -> list[dict]:
    """The issue's targets: {target, measured, goal, status} with status pass / FAIL / not measured."""
    rows = []

    def add(target: str, measured: float | None, goal: str, ok: Callable[[float], bool]) -> None:
        status = "not measured" if measured is None else ("pass" if ok(measured) else "FAIL")
        rows.append({"target": target, "measured": None if measured is None else round(measured, 3),
                     "goal": goal, "status": status})

    steps = results.get("train_step", {})
    pmnist = steps.get("indrnn_pmnist_6layer")
    add("indrnn_pmnist_6layer ms/step through train.py, CUDA graphs",
        pmnist.get("pipeline_graphs_ms") if isinstance(pmnist, dict) else None, "<= 6 ms", lambda v: v <= 6)
    for name, row in steps.items():
        if isinstance(row, dict):
            for suffix in ("", "_graphs"):
                key = f"pipeline{suffix}_ms"
                if row.get(key) is not None:
                    add(f"{name} pipeline/bare{suffix.replace('_', ' ')}", row[key] / row[f"bare{suffix}_ms"],
                        "<= 1.25", lambda v: v <= 1.25)
    wide = "T784_B64_I1_H512"
    rnn = _ms(results, "fp32", wide, "rnn_tanh")
    for impl in ("cwrnn", "cwrnn_triton", "cwrnn_graphs", "leaky", "leaky_triton", "leaky_graphs", "skip",
                 "skip_triton", "skip_graphs", "jordan", "jordan_triton", "jordan_graphs", "narx", "narx_graphs",
                 "tdnn"):
        mine = _ms(results, "fp32", wide, impl)
        limit = 1.0 if impl.startswith("cwrnn") else 2.0
        add(f"{impl} / rnn_tanh at {wide} fp32", None if mine is None or rnn is None else mine / rnn,
            f"<= {limit}", lambda v, limit=limit: v <= limit)
    big = "T1024_B128_I512_H512"
    for precision in ("tf32", "bf16"):
        lstm, indrnn = _ms(results, precision, big, "lstm"), _ms(results, precision, big, "indrnn")
        add(f"lstm / indrnn at {big} {precision}", None if lstm is None or indrnn is None else lstm / indrnn,
            ">= 20", lambda v: v >= 20)
    for shape, goal in zip(SCAN_SHAPES, (5.0, 1.0)):
        fused, scan = (_ms(results, "fp32", shape, impl) for impl in SCAN_IMPLS)
        add(f"indrnn_fused / indrnn_scan at {shape} fp32", None if fused is None or scan is None else fused / scan,
            f">= {goal:g}", lambda v, goal=goal: v >= goal)
    rows_bw = results.get("indrnn_bandwidth", {}).get("rows", {})
    for direction in ("fwd", "bwd"):
        fractions = [r[f"{direction}_fraction_of_copy"] for k, r in rows_bw.items()
                     if k.startswith("T1024_B128_H512") and isinstance(r, dict)]
        add(f"IndRNN recurrence {direction} at T1024_B128_H512, best BLOCK/BLOCK_T, fraction of copy bandwidth",
            max(fractions) if fractions else None, ">= 0.5", lambda v: v >= 0.5)
    graphs = results.get("graphs", {})
    for name in ("sgd", "adam"):
        row = graphs.get(name)
        add(f"CUDA-graph steps (forward, backward, {name} step) vs eager: max weight difference",
            row["max_weight_diff"] if isinstance(row, dict) else None, "<= 1e-4", lambda v: v <= 1e-4)
    kernels = results.get("kernels", {})
    failed = [k for k, v in kernels.items() if isinstance(v, str) and v.startswith("FAIL")]
    checked = [k for k, v in kernels.items() if isinstance(v, dict)]
    add("Triton kernels within tolerance of float64 (failures)", float(len(failed)) if checked or failed else None,
        "0", lambda v: v == 0)
    return rows


def format_targets(rows: list[dict]) -> str:
    width = max(len(r["target"]) for r in rows)
    lines = [f"{'target':<{width}}  {'measured':>10}  {'goal':>8}  status"]
    for r in rows:
        measured = "-" if r["measured"] is None else f"{r['measured']:.3f}"
        lines.append(f"{r['target']:<{width}}  {measured:>10}  {r['goal']:>8}  {r['status']}")
    return "\n".join(lines)


# recurrence_targets measures the rows the targets read before train_step; recurrence fills in the rest.
SECTIONS = {"kernels": run_kernels, "graphs": run_graph_equality, "indrnn_bandwidth": run_bandwidth,
            "recurrence_targets": run_recurrence, "train_step": run_train_step, "recurrence": run_recurrence}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI: --device cpu --quick)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for everything (default 480)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="run only these sections (default: all, in this order)")
    parser.add_argument("--impls", nargs="+", metavar="NAME",
                        help="recurrence section: only these layers (default: every one registered)")
    parser.add_argument("--json", type=Path, default=ROOT / "outputs" / "gpu_check.json",
                        help="write every result here (default outputs/gpu_check.json)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda, but CUDA is not available (torch {torch.__version__}); "
                     "use --device cpu --quick")
    device = torch.device(args.device)
    budget = Budget(args.budget_s)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    say(f"gpu_check: torch {torch.__version__}, {args.device} ({name}), budget {args.budget_s:.0f} s"
        f"{', quick' if args.quick else ''}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    results: dict = {"device": name, "torch": torch.__version__, "quick": args.quick}
    for section in args.sections:
        started = time.perf_counter()
        say(f"== {section} ({budget.left:.0f} s left)")
        try:
            if section in ("recurrence_targets", "recurrence"):
                results["recurrence"] = run_recurrence(device, args.quick, budget, args.impls,
                                                       targets_only=section == "recurrence_targets",
                                                       previous=results.get("recurrence"))
            else:
                results[section] = SECTIONS[section](device, args.quick, budget)
        except Exception as error:  # one broken section must not cost the others' figures
            results[section] = failure(error)
            say(f"{section}: {results[section]}")
            traceback.print_exc()
        results.setdefault("seconds", {})[section] = round(time.perf_counter() - started, 1)
    results["targets"] = targets(results)
    say("== targets")
    say(format_targets(results["targets"]))
    results["total_seconds"] = round(args.budget_s - budget.left, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    say(f"wrote {args.json} ({results['total_seconds']} s)")
    return results


if __name__ == "__main__":
    main()
