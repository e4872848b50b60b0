"""REPRODUCTIONS.md, generated: every paper recipe (``conf/experiment/*.yaml`` with a ``paper:`` target),
the paper's figure, ours from the runs' results.json, and how ours was obtained (hardware, steps, time,
command, date); "not run yet" where no finished run exists. ``python results.py paper=true dir=DIR[,DIR...]``.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tools.runs_table import find_run_dirs
from lightning_modules.run.record import OK_STATUSES, UnreadableRecord, read_record

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _experiment_yaml(conf_dir: Path, name: str) -> dict:
    try:
        return yaml.safe_load((conf_dir / "experiment" / f"{name}.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def experiment_paper(conf_dir: Path, name: str, seen: tuple[str, ...] = ()) -> dict | None:
    """The ``paper:`` target of an experiment, its own or inherited from an experiment in its defaults."""
    config = _experiment_yaml(conf_dir, name)
    if isinstance(config.get("paper"), dict):
        return config["paper"]
    for entry in config.get("defaults") or []:
        if isinstance(entry, str) and entry not in ("_self_",) and entry not in seen and "/" not in entry:
            paper = experiment_paper(conf_dir, entry, (*seen, name))
            if paper:
                return paper
    return None


def experiment_papers(conf_dir: Path = CONF_DIR) -> dict[str, dict]:
    """Every experiment with a paper target, by name (sorted)."""
    papers = {}
    for path in sorted((Path(conf_dir) / "experiment").glob("*.yaml")):
        paper = experiment_paper(Path(conf_dir), path.stem)
        if paper and "metric" in paper and "value" in paper:
            papers[path.stem] = paper
    return papers


@dataclass
class Reproduction:
    """The finished runs of one experiment."""

    experiment: str
    paper: dict
    runs: list[tuple[Path, dict]]

    def values(self) -> list[float]:
        metric = self.paper["metric"]
        return [float(record[metric]) for _, record in self.runs if isinstance(record.get(metric), (int, float))]


def collect(dirs: list[Path], papers: dict[str, dict]) -> dict[str, Reproduction]:
    """The finished runs under ``dirs`` of each experiment in ``papers`` (by the record's ``experiment``)."""
    found = {name: Reproduction(name, paper, []) for name, paper in papers.items()}
    for root in dirs:
        for run_dir in find_run_dirs(Path(root)):
            try:
                record = read_record(run_dir) or {}
            except (OSError, UnreadableRecord):
                continue
            name = record.get("experiment")
            if name in found and record.get("status") in OK_STATUSES:
                found[name].runs.append((run_dir, record))
    return found


def _figure(value: float | None, metric: str) -> str:
    if value is None:  # a recipe whose paper shows curves only (its ``paper.source`` says so)
        return "no published figure"
    return f"{100 * value:.2f}%" if metric.endswith("acc") else f"{value:.4g}"


def _ours(reproduction: Reproduction) -> str:
    values, metric = reproduction.values(), reproduction.paper["metric"]
    if not values:
        return "no value"
    if len(values) == 1:
        return _figure(values[0], metric)
    spread = statistics.stdev(values)
    shown = f"{100 * spread:.2f}" if metric.endswith("acc") else f"{spread:.2g}"
    return f"{_figure(statistics.fmean(values), metric)} ± {shown} ({len(values)} runs)"


def _date(run_dir: Path, record: dict) -> str:
    if record.get("started_at"):
        return str(record["started_at"])[:10]
    try:
        return time.strftime("%Y-%m-%d", time.localtime((run_dir / "results.json").stat().st_mtime))
    except OSError:
        return ""


def _cell(text) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


NOT_RUN = "not run yet"


def measured_rows(text: str) -> dict[str, list[str]]:
    """Our cells (ours, hardware, steps, time, command, date; as written) of each row of an earlier
    REPRODUCTIONS.md that holds a figure of ours, by experiment name."""
    rows = {}
    for line in text.splitlines():
        cells = line[2:-2].split(" | ") if line.startswith("| ") and line.endswith(" |") else []
        if len(cells) == 10 and cells[4] not in (NOT_RUN, "ours", "---"):
            rows[cells[0]] = cells[4:]
    return rows


def reproductions_markdown(found: dict[str, Reproduction], dirs: list[Path],
                           kept: dict[str, list[str]] | None = None) -> str:
    """The REPRODUCTIONS.md text: one row per experiment with a paper target. An experiment with no
    finished run under ``dirs`` keeps its row from ``kept`` (an earlier table's measured rows), so
    regenerating the table from new runs never drops a figure that older runs, no longer here, gave."""
    kept = kept or {}
    lines = ["# Reproductions", "",
             "Generated by `python results.py paper=true dir=" + ",".join(str(d) for d in dirs) + "` from the runs' "
             "results.json; do not edit by hand. Ours: the mean ± sample std of the paper's metric over the "
             "finished runs of each recipe (`experiment=NAME`). A recipe with no run in those folders keeps its "
             "row from the previous table.", "",
             "| experiment | paper | metric | paper's figure | ours | hardware | steps | time (h) | command | date |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, reproduction in sorted(found.items()):
        paper = reproduction.paper
        figure = None if paper["value"] is None else float(paper["value"])
        head = [name, paper.get("source", ""), paper["metric"], _figure(figure, paper["metric"])]
        if not reproduction.runs:  # the paper's side as configured now, ours as the earlier table had it
            ours = kept.get(name) or [NOT_RUN, "", "", "", "", ""]
            lines.append("| " + " | ".join([*(_cell(c) for c in head), *ours]) + " |")
            continue
        newest_dir, newest = max(reproduction.runs, key=lambda item: _date(*item))
        hours = [float(r["seconds"]) / 3600 for _, r in reproduction.runs if isinstance(r.get("seconds"), (int, float))]
        command = "python train.py " + " ".join(str(o) for o in newest.get("overrides") or [f"experiment={name}"])
        cells = [*head, _ours(reproduction), newest.get("hardware") or newest.get("host") or "",
                 newest.get("steps"), f"{statistics.fmean(hours):.2f}" if hours else "", f"`{command}`",
                 _date(newest_dir, newest)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_reproductions(dirs: list[Path], out: Path, conf_dir: Path = CONF_DIR) -> tuple[str, Path]:
    """Build REPRODUCTIONS.md from the runs under ``dirs`` and write it to ``out``, keeping the measured
    rows of the ``out`` already there for recipes with no run under ``dirs``; (text, path)."""
    for folder in dirs:
        if not Path(folder).is_dir():
            raise ValueError(f"dir: {folder} is not a folder")
    previous = Path(out).read_text() if Path(out).is_file() else ""
    text = reproductions_markdown(collect([Path(d) for d in dirs], experiment_papers(conf_dir)), list(dirs),
                                  kept=measured_rows(previous))
    from tools.runs_table import write_report

    write_report({Path(out): text})
    return text, Path(out)
