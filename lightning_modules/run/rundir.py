"""Run directories: unique for every run, found again for a resume, held by one process at a time.

A run directory is claimed with ``os.mkdir``, which fails if the directory exists, so two runs started
in the same second never share one: the second gets a ``-2`` suffix (``-3``...). A resume
(``ckpt_path``, :mod:`.resume`) goes back into the run directory its checkpoint came from, so a run's
curves, checkpoints and results.json stay together; a checkpoint file outside any run directory
starts a new one.

:class:`RunDirectory`, a Hydra callback (conf/hydra/default.yaml), places the run before Hydra writes
anything: it runs every check of a resume, makes sure the directory can be written, takes its lock
(:mod:`.lock`) and, when the directory already holds a run, has Hydra keep this session's config in
``.hydra/resume-N/`` beside the original ``.hydra/config.yaml``. Any failure there is one line and
leaves every file of the run as it was.

The Hydra resolvers are registered by the entry points (train.py, eval.py, generate.py) with
:func:`register_resolvers`, never as an import side effect.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

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


def slurm_requeued_run(log_dir: str | os.PathLike) -> Path | None:
    """The run directory of this SLURM job's earlier attempt when SLURM requeued it, else None."""
    from lightning_modules.run.record import RESULTS_FILE, read_record_or_empty

    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    if not job or not restarts.isdigit() or int(restarts) < 1:
        return None
    root = Path(log_dir)
    for results in sorted(list(root.glob(f"*/*/{RESULTS_FILE}")) + list(root.glob(f"multirun/*/*/*/{RESULTS_FILE}")),
                          key=lambda path: path.stat().st_mtime, reverse=True):
        record = read_record_or_empty(results.parent)
        if str(record.get("slurm_job_id")) == job and record.get("status") != "finished":
            return results.parent
    return None


def run_dir(log_dir: str, task: str, model: str, *unused) -> str:
    """Resolver behind ``hydra.run.dir``: the run directory of this SLURM job's earlier attempt when
    SLURM requeued it, else the name of a new one, ``<log_dir>/<date>/<time>_<task>_<model>``; it
    creates nothing (resolving the config has no side effects). :class:`RunDirectory` claims the
    directory (``-2``, ``-3``... when taken) or, for a resume, places the run, before Hydra writes."""
    key = ("run", f"{log_dir}|{task}|{model}")
    if key not in _CLAIMED:  # one name per process: Hydra may resolve hydra.run.dir on copies of the config
        requeued = slurm_requeued_run(log_dir)
        if requeued is not None:
            _CLAIMED[key] = str(requeued)
        else:
            day, time = _stamp()
            _CLAIMED[key] = str(Path(log_dir) / day / f"{time}_{task}_{model}")
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


def unwritable(folder: Path, error: OSError, what: str) -> str:
    """The one line for a place a run cannot write."""
    from lightning_modules.run.record import storage_reason

    where = Path(error.filename) if error.filename else folder
    return (f"cannot write {what} {where} ({storage_reason(error)}): choose a writable place with "
            f"paths.log_dir=DIR (or hydra.run.dir=DIR)")


def check_writable(folder: Path, what: str = "the run directory") -> None:
    """Create ``folder`` if needed and prove a file can be made in it (nothing is left behind); a
    one-line UserError naming the folder otherwise."""
    import tempfile

    from lightning_modules.run.errors import UserError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise UserError(unwritable(folder, err, what)) from err


def resumed_sessions(run_dir: Path) -> int:
    """How many ``.hydra/resume-N/`` folders a run directory holds (the highest N)."""
    numbers = [int(path.name.split("-", 1)[1]) for path in (run_dir / ".hydra").glob("resume-*")
               if path.name.split("-", 1)[1].isdigit()]
    return max(numbers, default=0)


def _explicit_run_dir(config: DictConfig) -> str | None:
    for item in config.hydra.overrides.hydra or []:
        if str(item).startswith("hydra.run.dir="):
            return str(OmegaConf.select(config, "hydra.run.dir"))
    return None


def command_config(config: DictConfig) -> dict:
    """This command's config as plain types for the resume check: the keys a resume must keep, resolved
    (the resume-safe ones, e.g. paths.output_dir that Hydra has not set yet, are left out)."""
    from lightning_modules.run.resume import resume_safe

    plain = {}
    for key in config:
        if key == "hydra" or resume_safe(str(key)):
            continue
        node = config[key]
        plain[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return plain


class RunDirectory(Callback):
    """Hydra callback: choose, check and hold the run directory of ``python train.py`` before Hydra
    writes anything into it (its ``.hydra/`` and train.log); one line and exit status 1 otherwise."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from lightning_modules.run.errors import UserError

        try:
            self.place(config)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(1)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from lightning_modules.run.errors import UserError

        try:
            sweep = Path(self._resolve(config, "hydra.sweep.dir", Path(str(config.paths.log_dir)) / "multirun",
                                       "the sweep directory"))
            check_writable(sweep, "the sweep directory")
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(1)

    @staticmethod
    def _resolve(config: DictConfig, key: str, folder: Path, what: str = "the run directory") -> str:
        """``config[key]`` resolved; a folder that cannot be created is a one-line UserError."""
        from lightning_modules.run.errors import UserError

        try:
            return str(OmegaConf.select(config, key))
        except Exception as err:  # OmegaConf wraps the resolver's OSError
            cause = err
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise UserError(unwritable(folder, cause, what)) from err

    @staticmethod
    def _claim(name: Path, log_dir: Path) -> Path:
        """The new run directory ``name`` (or ``name-2``, ...), created now: a requeued SLURM job's
        existing directory is its own; a folder that cannot be created is a one-line UserError."""
        from lightning_modules.run.errors import UserError

        if name.is_dir() and slurm_requeued_run(log_dir) == name:
            return name
        try:
            return claim_dir(name)
        except OSError as err:
            raise UserError(unwritable(log_dir, err, "the run directory")) from err

    def place(self, config: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from lightning_modules.run.lock import acquire, rank_zero
        from lightning_modules.run.resume import plan_resume

        HydraConfig.instance().set_config(config)  # ${hydra:...} in the config resolves from here on
        log_dir = Path(str(config.paths.log_dir))
        explicit = _explicit_run_dir(config)
        requested = OmegaConf.select(config, "ckpt_path", default=None)
        if requested not in (None, ""):
            choices = config.hydra.runtime.choices
            plan = plan_resume(requested, log_dir, str(choices.get("task")), str(choices.get("model")),
                               command_config(config))
            if explicit:
                target = Path(explicit)
            elif plan.source_run is not None:
                target = plan.source_run
            else:
                target = self._claim(Path(self._resolve(config, "hydra.run.dir", log_dir)), log_dir)
                print(f"ckpt_path={requested} lies outside any run directory: continuing in a new run directory "
                      f"{target}", file=sys.stderr, flush=True)
        elif explicit:
            target = Path(explicit)
        else:
            target = self._claim(Path(self._resolve(config, "hydra.run.dir", log_dir)), log_dir)
        check_writable(target)
        if rank_zero():
            acquire(target)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = str(target)
            earlier = (target / ".hydra").is_dir()
            if earlier and config.hydra.output_subdir is not None:
                # The original .hydra/config.yaml describes the run; this session's goes beside it.
                config.hydra.output_subdir = f".hydra/resume-{resumed_sessions(target) + 1}"
