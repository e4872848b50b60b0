"""Gather the runs under a folder (a sweep, or any tree of run directories) into one table.

Each run directory holds ``results.json`` (the run record, :mod:`lightning_modules.run.record`) and
``.hydra/`` (the composed config and the command-line overrides). A run whose record still says
``running`` but that no live process holds, or that died before writing results.json (it still has
``.hydra/``), is listed as ``killed`` with the last error line of its ``train.log``, as the sweep
summary lists it.

Building the report (:func:`build_report`) writes nothing; :func:`write_report` writes its files.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lightning_modules.run.lock import holder_alive
from lightning_modules.run.record import (KILLED, OK_STATUSES, RESULTS_FILE, RUNNING, UnreadableRecord, read_record,
                                          status_now)
from storage.atomic import write_text_atomically

TABLE_STEM = "results_table"   # DIR/results_table.{csv,json}: never mistaken for a run's results.json


@dataclass
class Run:
    """One run directory: its results, the overrides that made it, and the paper it targets."""

    path: Path
    name: str
    status: str
    overrides: dict[str, str]
    metrics: dict[str, float]
    params: int | None = None
    steps: int | None = None
    seconds: float | None = None
    monitor: str | None = None
    error: str | None = None
    paper: dict | None = None
    extra: dict = field(default_factory=dict)


def find_run_dirs(root: Path) -> list[Path]:
    """Every run directory under ``root`` (``root`` itself included), sorted by path."""
    root = Path(root)
    candidates = {p.parent for p in root.rglob(RESULTS_FILE)}
    candidates |= {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    # submitit's folders and anything hidden are never runs.
    runs = [p for p in candidates if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    # Natural order: job 10 after job 9.
    return sorted(runs, key=lambda p: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(p))])


def parse_overrides(items) -> dict[str, str]:
    """``["model=lstm", "+x=1", "~y"]`` -> ``{"model": "lstm", "x": "1", "y": "<deleted>"}``."""
    overrides = {}
    for item in items or []:
        item = str(item)
        if "=" in item:
            key, value = item.split("=", 1)
            overrides[key.lstrip("+~")] = value
        else:
            overrides[item.lstrip("~")] = "<deleted>"
    return overrides


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def last_error_line(log_file: Path) -> str | None:
    """The last line of a log that reports an error (for runs that died without results.json)."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if any(word in line for word in ("Error", "error", "Exception", "Killed", "Traceback")):
            return line.strip()
    return None


def load_run(run_dir: Path, root: Path) -> Run:
    """Read one run directory (results.json, .hydra/overrides.yaml, .hydra/config.yaml)."""
    run_dir = Path(run_dir)
    try:
        results = read_record(run_dir) or {}
    except (OSError, UnreadableRecord) as err:
        results = {"status": "unreadable", "error": f"{RESULTS_FILE}: {err}"}
    overrides_list = results.get("overrides")
    if overrides_list is None:
        overrides_list = _read_yaml(run_dir / ".hydra" / "overrides.yaml") or []
    config = _read_yaml(run_dir / ".hydra" / "config.yaml") or {}
    if results:
        status = status_now(results, run_dir)
    else:  # died before its first record (or is starting now)
        status = RUNNING if holder_alive(run_dir) else KILLED
    error = results.get("error")
    if status not in OK_STATUSES and status != RUNNING and not error:
        error = last_error_line(run_dir / "train.log") or ("no results.json: the process was killed before "
                                                           "recording anything" if not results else
                                                           "stopped without a final status")
    metrics = {key: float(value) for key, value in results.items()
               if key.startswith(("val/", "test/")) and isinstance(value, (int, float)) and not isinstance(value, bool)}
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    return Run(path=run_dir, name=name, status=status, overrides=parse_overrides(overrides_list), metrics=metrics,
               params=results.get("params"), steps=results.get("steps"), seconds=results.get("seconds"),
               monitor=results.get("monitor") or (config.get("task") or {}).get("monitor"), error=error,
               paper=results.get("paper", config.get("paper")))


def load_runs(root: Path) -> list[Run]:
    """Every run under ``root``; a ValueError when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dir: {root} is not a folder")
    runs = [load_run(path, root) for path in find_run_dirs(root)]
    if not runs:
        raise ValueError(f"DIR: no run directories (with {RESULTS_FILE} or .hydra/) under {root}")
    return runs


def varying_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs (the sweep's axes), in first-seen order."""
    keys: list[str] = []
    for run in runs:
        keys += [key for key in run.overrides if key not in keys]
    return [key for key in keys if len({run.overrides.get(key) for run in runs}) > 1]


def common_overrides(runs: list[Run]) -> dict[str, str]:
    """Overrides shared by every run (printed once above the table)."""
    varying = set(varying_keys(runs))
    return {key: value for key, value in runs[0].overrides.items() if key not in varying}


def metric_columns(runs: list[Run], requested: list[str] | None = None) -> list[str]:
    """The metrics to show: ``requested``, or every test/* and the best val/* of the runs."""
    if requested:
        return list(requested)
    names = sorted({name for run in runs for name in run.metrics})
    best = {name for name in names if name.endswith("_best")}
    shown = [n for n in names if n.startswith("test/")]
    # val/x_best is the best validation; val/x without _best is the last one (hidden when a best exists).
    shown += [n for n in names if n.startswith("val/") and (n in best or f"{n}_best" not in best)]
    return shown


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def format_mean_std(values: list[float]) -> str:
    if not values:
        return ""
    mean, std = mean_std(values)
    return f"{mean:.4g} ± {std:.2g}" if std is not None else f"{mean:.4g}"


def run_rows(runs: list[Run], metrics: list[str]) -> tuple[list[str], list[dict]]:
    """One row per run: its varying overrides, status, metrics, paper comparison, params, steps, time."""
    keys = varying_keys(runs)
    with_paper = any(run.paper for run in runs)
    header = ["run", *keys, "status", *metrics]
    header += ["paper", "paper metric", "diff"] if with_paper else []
    header += ["params", "steps", "seconds"]
    rows = []
    for run in runs:
        row = {"run": run.name, **{key: run.overrides.get(key, "") for key in keys}, "status": run.status}
        row.update({name: run.metrics.get(name) for name in metrics})
        if with_paper:
            row.update(_paper_cells([run]))
        row.update(params=run.params, steps=run.steps, seconds=run.seconds)
        rows.append(row)
    return header, rows


def _paper_cells(runs: list[Run]) -> dict:
    papers = [run.paper for run in runs if run.paper and run.paper.get("value") is not None]  # null: curves only
    if not papers:
        return {"paper": None, "paper metric": None, "diff": None}
    paper = papers[0]
    values = [run.metrics[paper["metric"]] for run in runs
              if run.paper and paper["metric"] in run.metrics and run.status in OK_STATUSES]
    diff = statistics.fmean(values) - float(paper["value"]) if values else None
    return {"paper": float(paper["value"]), "paper metric": paper["metric"], "diff": diff,
            "source": paper.get("source")}


def group_rows(runs: list[Run], metrics: list[str], group_by: list[str] | None) -> tuple[list[str], list[dict]]:
    """Runs grouped by the values of ``group_by`` (default: every varying override but the seed),
    with the mean ± sample std of each metric over the finished runs of each group."""
    keys = group_by if group_by else [key for key in varying_keys(runs) if key != "seed"]
    unknown = [key for key in keys if all(key not in run.overrides for run in runs)]
    if group_by and unknown:
        allowed = ", ".join(varying_keys(runs) + list(common_overrides(runs))) or "none"
        raise ValueError(f"group_by: no run sets {', '.join(unknown)} (overrides found: {allowed})")
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.overrides.get(key, "") for key in keys), []).append(run)
    with_paper = any(run.paper for run in runs)
    header = [*keys, "runs", "finished", *metrics]
    header += ["paper", "paper metric", "diff"] if with_paper else []
    rows = []
    for values, members in groups.items():
        good = [run for run in members if run.status in OK_STATUSES]
        row = dict(zip(keys, values), runs=len(members), finished=len(good))
        for name in metrics:
            samples = [run.metrics[name] for run in good if name in run.metrics]
            row[name] = format_mean_std(samples)
            row[f"{name} values"] = samples
        if with_paper:
            row.update(_paper_cells(members))
        rows.append(row)
    return header, rows


def failures(runs: list[Run]) -> list[Run]:
    return [run for run in runs if run.status not in OK_STATUSES]


def markdown_table(header: list[str], rows: list[dict]) -> str:
    """A GitHub-style markdown table."""
    cells = [[_format(row.get(col)).replace("|", "\\|") for col in header] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def csv_text(header: list[str], rows: list[dict]) -> str:
    stream = io.StringIO(newline="")
    writer = csv.DictWriter(stream, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({col: _format(row.get(col)) for col in header} for row in rows)
    return stream.getvalue()


class ReportNotWritten(OSError):
    """The report's files could not be written (the table was built; :attr:`folder` is where)."""

    def __init__(self, folder: Path, error: OSError) -> None:
        super().__init__(error.errno, error.strerror, error.filename)
        self.folder = folder


def write_report(files: dict[Path, str]) -> list[Path]:
    """Write the report's files; a folder that cannot be written raises :class:`ReportNotWritten`."""
    written = []
    for path, text in files.items():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, text)  # the text as built: the CSV's \r\n line ends kept
        except OSError as err:
            raise ReportNotWritten(path.parent, err) from err
        written.append(path)
    return written


def build_report(root: Path, group_by: list[str] | None = None, metrics: list[str] | None = None,
                 out_dir: Path | None = None) -> tuple[str, dict[Path, str]]:
    """The markdown report of every run under ``root`` and the files it goes with
    (``results_table.{csv,json}``, in ``out_dir``, default ``root``); writes nothing."""
    root = Path(root)
    runs = load_runs(root)
    out_dir = Path(out_dir) if out_dir else root
    files: dict[Path, str] = {}
    columns = metric_columns(runs, metrics)
    header, rows = run_rows(runs, columns)
    text = [f"# {len(runs)} runs under {root}"]
    common = common_overrides(runs)
    if common:
        text.append("common overrides: " + " ".join(f"{k}={v}" for k, v in common.items()))
    text += ["", markdown_table(header, rows)]
    files[out_dir / f"{TABLE_STEM}.csv"] = csv_text(header, rows)
    grouped_header, grouped = group_rows(runs, columns, group_by)
    if group_by or any(row["runs"] > 1 for row in grouped):
        title = ", ".join(group_by) if group_by else "all overrides but the seed"
        text += ["", f"## Mean ± std over seeds, grouped by {title}", "", markdown_table(grouped_header, grouped)]
        files[out_dir / f"{TABLE_STEM}_grouped.csv"] = csv_text(grouped_header, grouped)
    sources = sorted({run.paper["source"] for run in runs if run.paper and run.paper.get("source")})
    if sources:
        text += ["", "paper: " + "; ".join(sources)]
    failed = failures(runs)
    if failed:
        text += ["", f"## {len(failed)} of {len(runs)} runs did not finish", ""]
        text += [f"- {run.name}: {run.status}: {run.error or 'no error recorded'}" for run in failed]
    document = {
        "root": str(root),
        "common_overrides": common,
        "runs": [{"run": run.name, "path": str(run.path), "status": run.status, "overrides": run.overrides,
                  "metrics": run.metrics, "params": run.params, "steps": run.steps, "seconds": run.seconds,
                  "monitor": run.monitor, "error": run.error, "paper": run.paper} for run in runs],
        "groups": grouped,
    }
    files[out_dir / f"{TABLE_STEM}.json"] = json.dumps(document, indent=2, default=str)
    return "\n".join(text), files


def report(root: Path, group_by: list[str] | None = None, metrics: list[str] | None = None,
           out_dir: Path | None = None) -> str:
    """:func:`build_report`, its files written; returns the text printed to the terminal."""
    text, files = build_report(root, group_by, metrics, out_dir)
    write_report(files)
    return text


def read_scalars(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar tag from the TensorBoard event files of a run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[int, float] = {}
    for events_dir in sorted({p.parent for p in Path(run_dir).rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(events_dir), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            steps.update({event.step: event.value for event in accumulator.Scalars(tag)})
    ordered = sorted(steps)
    return ordered, [steps[step] for step in ordered]


def scalar_tags(run_dirs: list[Path]) -> set[str]:
    """Every scalar tag logged to TensorBoard by any of the runs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for run_dir in run_dirs:
        for events_dir in {p.parent for p in Path(run_dir).rglob("events.out.tfevents.*")}:
            accumulator = EventAccumulator(str(events_dir), size_guidance={"scalars": 1})
            accumulator.Reload()
            tags.update(accumulator.Tags().get("scalars", []))
    return tags


def plot_curves(root: Path, tags: list[str], out_dir: Path | None = None) -> list[Path]:
    """One PNG per tag (``curves_<tag>.png``) with a curve per run; returns the files written.

    A tag that no run logged is a ValueError listing the tags that exist (checked before drawing);
    a folder that cannot be written raises :class:`ReportNotWritten`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    runs = load_runs(root)
    existing = scalar_tags([run.path for run in runs])
    missing = [tag for tag in tags if tag not in existing]
    if missing:
        raise ValueError(f"plot: no run under {root} logged {', '.join(missing)}; tags found: "
                         f"{', '.join(sorted(existing)) or 'none (no TensorBoard events)'}")
    keys = varying_keys(runs)
    out_dir = Path(out_dir) if out_dir else root
    written = []
    for tag in tags:
        figure, axes = plt.subplots(figsize=(8, 5))
        drawn = 0
        for run in runs:
            steps, values = read_scalars(run.path, tag)
            if steps:
                label = " ".join(f"{k}={run.overrides.get(k, '')}" for k in keys) or run.name
                axes.plot(steps, values, label=label, linewidth=1.2)
                drawn += 1
        axes.set_xlabel("step")
        axes.set_ylabel(tag)
        if tag.endswith(("loss", "mse", "bpc", "ppl")) and all(v > 0 for line in axes.lines for v in line.get_ydata()):
            axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7, loc="best")
        axes.set_title(f"{tag}: {drawn} runs under {root.name}")
        path = out_dir / f"curves_{tag.replace('/', '_')}.png"
        figure.tight_layout()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            figure.savefig(path, dpi=110)
        except OSError as err:
            raise ReportNotWritten(out_dir, err) from err
        finally:
            plt.close(figure)
        written.append(path)
    return written
