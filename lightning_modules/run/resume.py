"""Resuming a run: which checkpoint ``ckpt_path`` names, which run directory the session continues
in, and every check a resume can fail, all done before anything is written anywhere.

``ckpt_path`` may be

* ``last``: the newest ``last.ckpt`` of a run under ``paths.log_dir`` whose stored config equals this
  command's apart from the resume-safe keys below; when none or several runs fit, one line lists them;
* a run directory: its ``checkpoints/last.ckpt``;
* a checkpoint file: inside a run directory (``<run>/checkpoints/x.ckpt``) the session continues that
  run; anywhere else it starts a new run directory of its own, never writing next to the file.

The checks: the file can be read, it is a checkpoint train.py wrote (``load_our_checkpoint``: weights
only, its config through the allowlist), and this command's config is compatible with the one stored
in it. Compatible means equal apart from the **resume-safe keys** (:data:`RESUME_SAFE`): how long to
train and when to stop, the Trainer, logging, callbacks, paths, testing and the paper target. Every
other key (the network, the task and its data, the objective, optimizer, scheduler, learning rule,
seed) describes the run itself: Lightning restores the optimizer and scheduler states from the
checkpoint, so a changed learning rate would be silently ignored, and a changed network cannot load
the weights. To change them, start a new run.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_modules.run.checkpoints import checkpoint_in, load_our_checkpoint
from lightning_modules.run.errors import UserError
from lightning_modules.run.record import read_record_or_empty
from lightning_modules.run.rundir import CHECKPOINT_DIR, LAST_CHECKPOINT, checkpoint_run_dir

log = logging.getLogger(__name__)

# Keys (dotted prefixes) a resume may change; every other key must equal the checkpoint's.
RESUME_SAFE = (
    "trainer", "logger", "callbacks", "paths", "hydra", "ckpt_path", "test", "paper", "choices",
    "hparams_search", "task.max_epochs", "task.stop_at", "task.datamodule.num_workers",
    "task.datamodule.pin_memory", "task.datamodule.persistent_workers", "task.datamodule.download",
    "task.datamodule.data_dir",
)


def resume_safe(key: str) -> bool:
    return any(key == safe or key.startswith(safe + ".") for safe in RESUME_SAFE)


def flatten(node, prefix: str = "") -> dict:
    """``{"model": {"hidden_size": 8}}`` -> ``{"model.hidden_size": 8}``; lists stay values."""
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: node}


def config_differences(stored: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, stored value, current value) for every key outside :data:`RESUME_SAFE` that differs.

    A key that the stored config lacks is not a difference: the run predates that setting (configs
    gain keys with defaults that keep the old behaviour). A key that the command lacks counts as None.
    """
    old, new = flatten(stored), flatten(current)
    differences = []
    for key in sorted(set(old) | set(new)):
        if resume_safe(key) or (key not in old and not any(key.startswith(f"{known}.") for known in old)):
            continue
        before, after = old.get(key), new.get(key)
        if isinstance(before, tuple):
            before = list(before)
        if isinstance(after, tuple):
            after = list(after)
        if before != after:
            differences.append((key, before, after))
    return differences


def format_differences(differences: list[tuple[str, object, object]], limit: int = 4) -> str:
    shown = ", ".join(f"{key} (checkpoint {before!r}, now {after!r})" for key, before, after in differences[:limit])
    more = f" and {len(differences) - limit} more" if len(differences) > limit else ""
    return shown + more


def is_run_directory(folder: Path) -> bool:
    """A folder train.py made: it holds results.json or .hydra/config.yaml."""
    return (folder / "results.json").is_file() or (folder / ".hydra" / "config.yaml").is_file()


def run_of_checkpoint(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint file lies in, or None when it lies outside any run."""
    folder = checkpoint_run_dir(checkpoint)
    return folder if is_run_directory(folder) else None


def stored_config(path: Path) -> dict | None:
    """The run config stored in a checkpoint, read lazily (memory-mapped, weights only); None if unreadable."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a broken or foreign file is simply not a candidate
        return None
    config = checkpoint.get("hyper_parameters", {}).get("run_config") if isinstance(checkpoint, dict) else None
    return config if isinstance(config, dict) else None


def run_checkpoints(log_dir: Path, task: str, model: str) -> list[Path]:
    """Every run's ``last.ckpt`` of ``task`` and ``model`` under ``log_dir`` (runs and sweep jobs), newest first."""
    name = re.compile(rf"^(\d\d-\d\d-\d\d|\d+)_{re.escape(task)}_{re.escape(model)}(-\d+)?$")
    found = [path for pattern in (f"*/*/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}",
                                  f"multirun/*/*/*/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}")
             for path in Path(log_dir).glob(pattern) if name.match(path.parent.parent.name)]
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)


def last_matching_checkpoint(log_dir: Path, task: str, model: str, current: dict) -> Path:
    """``ckpt_path=last``: the one run whose stored config fits ``current``; else a one-line UserError
    listing the candidates."""
    candidates = run_checkpoints(log_dir, task, model)
    if not candidates:
        raise UserError(f"ckpt_path=last: no run of task={task} model={model} with {CHECKPOINT_DIR}/{LAST_CHECKPOINT} "
                        f"under {log_dir}; pass a run directory or a checkpoint file instead")
    fitting, others = [], []
    for checkpoint in candidates:
        stored = stored_config(checkpoint)
        differences = config_differences(stored, current) if stored is not None else None
        if differences == []:
            fitting.append(checkpoint)
        else:
            why = "unreadable" if differences is None else f"differs in {format_differences(differences, 2)}"
            others.append(f"{checkpoint.parent.parent} ({why})")
    if len(fitting) == 1:
        return fitting[0]
    if not fitting:
        raise UserError(f"ckpt_path=last: no run of task={task} model={model} under {log_dir} has this command's "
                        f"config (apart from resume-safe keys); candidates: {'; '.join(others[:5])}"
                        f"{' ...' if len(others) > 5 else ''}; pass ckpt_path=<run directory> to choose one")
    raise UserError(f"ckpt_path=last: {len(fitting)} runs have this command's config: "
                    f"{', '.join(str(path.parent.parent) for path in fitting[:5])}; pass ckpt_path=<run directory> "
                    f"to choose one")


def requested_checkpoint(requested, log_dir: Path, task: str, model: str, current: dict) -> Path:
    """The checkpoint file ``ckpt_path`` names (see the module), or a one-line UserError."""
    if str(requested) == "last":
        return last_matching_checkpoint(log_dir, task, model, current)
    return checkpoint_in(requested, "resume")


@dataclass
class ResumePlan:
    """A resume that passed every check: the checkpoint, its step, the run it came from (None when
    the file lies outside any run) and that run's record."""

    checkpoint: Path
    step: int
    source_run: Path | None
    previous: dict


# Checkpoints already loaded by this process (the Hydra callback, then the driver): (path, mtime, size) ->
# (stored run config, step). The config is compared at every check.
_LOADED: dict[tuple, tuple[dict, int]] = {}


def check_resume(checkpoint: Path, current: dict, requested, choices: dict | None = None) -> ResumePlan:
    """Every check of a resume from ``checkpoint`` with this command's plain config ``current`` (and
    its config choices, e.g. ``{"task": "adding", "model": "lstm"}``); reads only. A one-line
    UserError on any failure."""
    try:
        with open(checkpoint, "rb") as stream:
            stream.read(1)
        stat = os.stat(checkpoint)
    except OSError as err:
        raise UserError(f"ckpt_path={requested}: cannot read {checkpoint} ({err.strerror or type(err).__name__}); "
                        f"check its permissions") from err
    key = (str(checkpoint), stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        loaded = load_our_checkpoint(checkpoint)
        _LOADED.clear()  # one checkpoint per run: keep no weights' configs around
        _LOADED[key] = (loaded["hyper_parameters"]["run_config"], int(loaded.get("global_step", 0)))
    stored, step = _LOADED[key]
    stored_choices = stored.get("choices") or {}
    changed = [group for group in ("task", "model") if choices and stored_choices.get(group)
               and choices.get(group) not in (None, "*", stored_choices[group])]
    if changed:
        asked = " ".join(f"{group}={choices[group]}" for group in changed)
        raise UserError(f"ckpt_path={requested}: the checkpoint is a task={stored_choices.get('task')} "
                        f"model={stored_choices.get('model')} run and this command asks for {asked}: a resume "
                        f"continues the same network and task; start a new run (without ckpt_path) instead")
    differences = config_differences(stored, current)
    if differences:
        raise UserError(f"ckpt_path={requested}: this command's config differs from the checkpoint's in "
                        f"{format_differences(differences)}; a resume may change only trainer.*, logger, "
                        f"callbacks, paths, task.max_epochs, task.stop_at and the other resume-safe keys "
                        f"(conf/train.yaml); start a new run to change the others")
    source = run_of_checkpoint(checkpoint)
    return ResumePlan(checkpoint, step, source, read_record_or_empty(source) if source else {})


def plan_resume(requested, log_dir: Path, task: str, model: str, current: dict) -> ResumePlan:
    """Which checkpoint ``ckpt_path`` names and whether this command may resume from it (reads only)."""
    checkpoint = requested_checkpoint(requested, Path(log_dir), task, model, current)
    return check_resume(checkpoint, current, requested, {"task": task, "model": model})
