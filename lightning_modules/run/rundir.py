"""Run directories: unique for every run, found again for a resume.

A run directory is claimed with ``os.mkdir``, which fails if the directory exists, so two runs started
in the same second never share one: the second gets a ``-2`` suffix (``-3``...). Resuming
(``ckpt_path=last``, ``ckpt_path=<run dir>`` or ``ckpt_path=<a checkpoint file>``) goes back into the
run directory the checkpoint came from, so a run's curves, checkpoints and results.json stay together.

The Hydra resolvers are registered by the entry points (train.py, eval.py, generate.py) with
:func:`register_resolvers`, never as an import side effect.
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"

# One claim per (kind, base) and process: Hydra may resolve hydra.run.dir on copies of the config.
_CLAIMED: dict[tuple[str, str], str] = {}


def claim_dir(base: str | os.PathLike) -> Path:
    """Create and return ``base``, or ``base-2``, ``base-3``, ... if taken: a directory no other run has."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for index in range(1, 10_000):
        candidate = base if index == 1 else base.with_name(f"{base.name}-{index}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RuntimeError(f"cannot claim a run directory next to {base}: 10,000 already exist")


def _stamp() -> tuple[str, str]:
    now = datetime.now()
    return now.strftime("%Y-%m-%d"), now.strftime("%H-%M-%S")


def checkpoint_run_dir(checkpoint: Path) -> Path:
    """The run directory of a checkpoint file: <run>/checkpoints/x.ckpt -> <run>."""
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else checkpoint.parent


def latest_run_checkpoint(log_dir: str | os.PathLike, task: str, model: str) -> Path | None:
    """The most recent ``last.ckpt`` of a run of ``task`` and ``model`` under ``log_dir`` (runs and sweeps)."""
    root = Path(log_dir)
    # <day>/<HH-MM-SS>_<task>_<model>[-N] for runs, multirun/<day>/<time>[-N]/<job>_<task>_<model> for sweeps.
    name = re.compile(rf"^(\d\d-\d\d-\d\d|\d+)_{re.escape(task)}_{re.escape(model)}(-\d+)?$")
    candidates = [path for pattern in (f"*/*/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}",
                                       f"multirun/*/*/*/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}")
                  for path in root.glob(pattern) if name.match(path.parent.parent.name)]
    return max(candidates, key=lambda path: path.stat().st_mtime, default=None)


def resolve_checkpoint(ckpt_path: str | os.PathLike | None, log_dir: str | os.PathLike, task: str,
                       model: str) -> Path | None:
    """The checkpoint file that ``ckpt_path`` names, or None when it names none that exists.

    ``last``: the latest ``last.ckpt`` of this task and model; a directory: its ``checkpoints/last.ckpt``
    (or the directory's own ``last.ckpt``); a file: itself.
    """
    if ckpt_path in (None, ""):
        return None
    if str(ckpt_path) == "last":
        return latest_run_checkpoint(log_dir, task, model)
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        for candidate in (path / CHECKPOINT_DIR / LAST_CHECKPOINT, path / LAST_CHECKPOINT):
            if candidate.is_file():
                return candidate.resolve()
        return None
    return path.resolve() if path.is_file() else None


def slurm_requeued_run(log_dir: str | os.PathLike) -> Path | None:
    """The run directory of this SLURM job's earlier attempt when SLURM requeued it, else None."""
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    if not job or not restarts.isdigit() or int(restarts) < 1:
        return None
    root = Path(log_dir)
    for results in sorted(list(root.glob("*/*/results.json")) + list(root.glob("multirun/*/*/*/results.json")),
                          key=lambda path: path.stat().st_mtime, reverse=True):
        try:
            record = json.loads(results.read_text())
        except (OSError, ValueError):
            continue
        if str(record.get("slurm_job_id")) == job and record.get("status") != "finished":
            return results.parent
    return None


def run_dir(log_dir: str, task: str, model: str, ckpt_path: str | None = None) -> str:
    """Resolver behind ``hydra.run.dir``: the resumed run's directory, or a new unique one."""
    key = ("run", f"{log_dir}|{task}|{model}|{ckpt_path}")
    if key not in _CLAIMED:
        checkpoint = resolve_checkpoint(ckpt_path, log_dir, task, model)
        if checkpoint is not None:
            _CLAIMED[key] = str(checkpoint_run_dir(checkpoint))
        else:
            requeued = slurm_requeued_run(log_dir)
            if requeued is not None:
                _CLAIMED[key] = str(requeued)
            else:
                day, time = _stamp()
                _CLAIMED[key] = str(claim_dir(Path(log_dir) / day / f"{time}_{task}_{model}"))
    return _CLAIMED[key]


def _claim_dated(kind: str, folder: Path) -> str:
    """Claim ``folder/<date>/<time>`` once per process and kind (a cached resolver may run again)."""
    key = (kind, str(folder))
    if key not in _CLAIMED:
        day, time = _stamp()
        _CLAIMED[key] = str(claim_dir(folder / day / time))
    return _CLAIMED[key]


def sweep_dir(log_dir: str) -> str:
    """Resolver behind ``hydra.sweep.dir``: a new unique folder for the sweep's job directories."""
    return _claim_dated("sweep", Path(log_dir) / "multirun")


def eval_dir(log_dir: str) -> str:
    """Resolver behind eval.py's ``hydra.run.dir``: a new unique folder under ``<log_dir>/eval``."""
    return _claim_dated("eval", Path(log_dir) / "eval")


def register_resolvers() -> None:
    """Register the project's OmegaConf resolvers; called by the entry points before Hydra composes.

    ``add``: arithmetic that OmegaConf lacks (``${add:${task.seq_len},20}``). ``run_dir``, ``sweep_dir``
    and ``eval_dir``: the directories above. The directory resolvers cache their value, as Hydra's
    ``now`` does, so every job of a sweep (even on another machine) sees the same folder.
    """
    OmegaConf.register_new_resolver("add", lambda *terms: sum(terms), replace=True)
    OmegaConf.register_new_resolver("run_dir", run_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("sweep_dir", sweep_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("eval_dir", eval_dir, use_cache=True, replace=True)
