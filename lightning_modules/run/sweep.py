"""The end of a sweep: one table of every job's status and metric, and a non-zero exit if any failed.

Each job of a multirun records its own outcome in its results.json (failed jobs included: the
driver never lets one job's exception end the sweep). This Hydra callback, configured in
conf/hydra/default.yaml, reads them once the launcher has run every job.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lightning_modules.run.record import FAILED, FINISHED, KILLED, UnreadableRecord, read_record, status_now

log = logging.getLogger(__name__)


def job_records(sweep_dir: Path) -> list[dict]:
    """One dict per job directory (any folder holding .hydra/) of a sweep, read from its results.json;
    a job still ``running`` that no live process holds was killed (:func:`~.record.status_now`)."""
    records = []
    for job_dir in sorted((path for path in sweep_dir.iterdir() if (path / ".hydra").is_dir()),
                          key=lambda path: (len(path.name), path.name)):
        try:
            record = read_record(job_dir)
        except (UnreadableRecord, OSError) as err:
            record = {"status": FAILED, "error": f"unreadable results.json: {err}"}
        if record is None:
            record = {"status": KILLED, "error": "no results.json: the job died before recording anything"}
        status = status_now(record, job_dir)
        if status == KILLED and record.get("status") != KILLED:
            record = {**record, "status": KILLED, "error": record.get("error") or "stopped without a final status"}
        records.append({"job": job_dir.name, **record})
    return records


def format_table(records: list[dict]) -> str:
    """A markdown table: job, status, monitored metric (best), test metric, error."""
    lines = ["| job | status | monitor | best | test | error |", "| --- | --- | --- | --- | --- | --- |"]
    for record in records:
        monitor = record.get("monitor") or ""
        best = record.get(f"{monitor}_best", record.get(monitor))
        test_key = monitor.replace("val/", "test/", 1) if monitor else ""
        test = record.get(test_key)
        shown = [f"{value:.4g}" if isinstance(value, (int, float)) else "" for value in (best, test)]
        error = (record.get("error") or "").replace("|", "/")
        lines.append(f"| {record['job']} | {record.get('status', '?')} | {monitor} | {shown[0]} | {shown[1]} | "
                     f"{error[:160]} |")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Hydra callback: print the sweep's table at the end; exit with status 1 if any job did not finish."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        records = job_records(sweep_dir)
        if not records:
            return
        failed = [record for record in records if record.get("status") != FINISHED]
        print(f"\nsweep {sweep_dir}: {len(records) - len(failed)} of {len(records)} jobs finished\n"
              f"{format_table(records)}", flush=True)
        if failed:
            print(f"error: {len(failed)} job(s) did not finish: "
                  + ", ".join(f"{record['job']} ({record.get('status')})" for record in failed), file=sys.stderr,
                  flush=True)
            sys.exit(1)
