"""The run driver behind train.py: read top to bottom, it is the flow of a run
(ARCHITECTURE.md): resume? -> datamodule -> network -> objective -> callbacks -> loggers -> trainer
-> fit -> test the best checkpoint -> results.json and TensorBoard HParams.

Whatever happens, the run directory ends with a results.json (:mod:`.record`) whose ``status`` says
so: ``finished``, ``diverged``, ``interrupted`` (SIGINT/SIGTERM, with ``last.ckpt`` written), ``failed``
(with its one-line error, a full disk included), or ``running`` left behind by a run killed without
warning, which every reader shows as ``killed``.

A record that an earlier session left (a resume into its run, a requeued SLURM job) is replaced only
once this session's training has started: a command that fails before (a refused resume, missing
data, a busy directory) leaves the run as it was. The run directory is held (:mod:`.lock`) for the
whole session.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import socket
import time
import traceback
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from datamodules.download import DataError, DownloadError
from lightning_modules.nonfinite import NonFiniteLossError
from lightning_modules.callbacks import BestValidation
from lightning_modules.run.hparams import log_hparams
from lightning_modules.run.build import (build_callbacks, build_datamodule, build_loggers, build_network,
                                         build_objective, build_trainer, choice, count_parameters,
                                         plain_config)
from lightning_modules.run.errors import UserError, one_line
from lightning_modules.run.lock import RunDirectoryBusy, held
from lightning_modules.run.record import (DIVERGED, FAILED, FINISHED, FITTED, INTERRUPTED, KILLED, RESULTS_FILE,
                                          RUNNING, describe_storage_error, read_record_or_empty,
                                          storage_error, write_record)
from lightning_modules.run.recorder import RunRecorder
from lightning_modules.run.resume import check_resume, plan_resume
from lightning_modules.run.rundir import CHECKPOINT_DIR, LAST_CHECKPOINT
from lightning_modules.run.signals import GracefulStop

log = logging.getLogger(__name__)


class RunInterrupted(Exception):
    """Training stopped on a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def route_lightning_logs() -> None:
    """Send Lightning's messages through the root handlers that Hydra set up (console and train.log).

    Lightning installs its own console handler at import when the root logger has none yet (always
    the case before Hydra starts), which would print every message twice and keep it out of train.log.
    """
    for name in ("pytorch_lightning", "lightning_fabric"):
        lightning_logger = logging.getLogger(name)
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)
        lightning_logger.propagate = True


def is_multirun() -> bool:
    return HydraConfig.initialized() and getattr(HydraConfig.get().mode, "name", None) == "MULTIRUN"


def read_results(output_dir: Path) -> dict:
    """The run record of ``output_dir`` ({} when missing or unreadable); kept for eval.py."""
    return read_record_or_empty(output_dir)


class Resume:
    """Where a resumed run starts: its checkpoint, the step in it, and the earlier sessions' record."""

    def __init__(self, checkpoint: Path, step: int, previous: dict, source_run: Path | None = None) -> None:
        self.checkpoint, self.step, self.previous, self.source_run = checkpoint, step, previous, source_run

    @staticmethod
    def find(cfg: DictConfig, output_dir: Path) -> "Resume | None":
        """The checkpoint named by ``ckpt_path`` (``last``, a run directory or a file: :mod:`.resume`),
        or, when none is named, the run directory's own ``last.ckpt`` if its run never finished (a
        requeued SLURM job). Every check runs here, reading only; a one-line UserError otherwise."""
        requested = cfg.get("ckpt_path")
        current = plain_config(cfg)
        if requested not in (None, ""):
            plan = plan_resume(requested, Path(cfg.paths.log_dir), choice("task") or "*", choice("model") or "*",
                               current)
        else:
            checkpoint = output_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
            if not checkpoint.is_file() or read_results(output_dir).get("status") == FINISHED:
                return None
            plan = check_resume(checkpoint.resolve(), current, str(output_dir), current.get("choices"))
        if plan.source_run is None:
            log.warning("ckpt_path=%s lies outside any run directory: continuing in a new run directory %s",
                        plan.checkpoint, output_dir)
        elif plan.source_run != output_dir.resolve():
            log.warning("resuming from %s into %s, not into the run it came from", plan.checkpoint, output_dir)
        return Resume(plan.checkpoint, plan.step, plan.previous, plan.source_run)

    def history(self) -> list[dict]:
        """The earlier sessions: how each ended (a run left ``running`` was killed without warning),
        with its metrics, so a resumed session that fails loses nothing of the earlier ones."""
        previous = self.previous
        status = previous.get("status", "unknown")
        entry = {"status": KILLED if status == RUNNING else status, "steps": previous.get("steps"),
                 "seconds": previous.get("seconds"), "resumed_from_step": self.step,
                 "resumed_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        if previous.get("error"):
            entry["error"] = previous["error"]
        monitor = previous.get("monitor")
        entry.update({key: value for key, value in previous.items()
                      if key.startswith("test/") or key in (f"{monitor}_best", "best_step")})
        return list(previous.get("resume_history", [])) + [entry]


def run_record(cfg: DictConfig, output_dir: Path, resume: Resume | None) -> dict:
    """results.json's fields known before training."""
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    record = {
        "status": "running",
        "task": choice("task"), "model": choice("model"), "experiment": choice("experiment"),
        "overrides": list(hydra.overrides.task) if hydra else [],
        "output_dir": str(output_dir.resolve()), "monitor": cfg.task.monitor,
        "host": socket.gethostname(), "pid": os.getpid(), "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if os.environ.get("SLURM_JOB_ID"):
        record["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    if resume is not None:
        history = resume.history()
        record.update(resumes=len(history), resume_history=history, resumed_from=str(resume.checkpoint))
    return record


def hardware(trainer: pl.Trainer) -> str:
    """What trained the run, e.g. ``1 x NVIDIA H100 80GB HBM3`` or ``CPU: AMD EPYC (16 threads)``."""
    device = trainer.strategy.root_device
    count = trainer.num_devices * trainer.num_nodes
    if device.type == "cuda":
        return f"{count} x {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    processes = f"{count} processes, " if count > 1 else ""
    return f"CPU: {model} ({processes}{torch.get_num_threads()} threads)"


def run_callbacks(cfg: DictConfig) -> tuple[list[pl.Callback], BestValidation]:
    """The configured callbacks with the run's one :class:`BestValidation` first (the configured
    plateau schedule when there is one: it is a BestValidation; else a new one of ``task.monitor``),
    and that BestValidation. The driver appends the :class:`RunRecorder`, whose ``on_validation_end``
    (saving ``last.ckpt``) so runs after the schedule has acted."""
    callbacks = build_callbacks(cfg)
    bests = [cb for cb in callbacks if isinstance(cb, BestValidation)]
    if len(bests) > 1:
        raise UserError(f"{len(bests)} callbacks keep a best validation ({', '.join(type(b).__name__ for b in bests)}): "
                        "a run has one; keep one plateau schedule in cfg.callbacks")
    best = bests[0] if bests else BestValidation(cfg.task.monitor, cfg.task.monitor_mode)
    if (best.monitor, best.mode) != (cfg.task.monitor, cfg.task.monitor_mode):
        raise UserError(f"callbacks: {type(best).__name__} watches {best.monitor} ({best.mode}) but task.monitor is "
                        f"{cfg.task.monitor} ({cfg.task.monitor_mode}): the run has one best value; set task.monitor "
                        "and task.monitor_mode instead")
    others = [cb for cb in callbacks if cb is not best]
    return [best, *others], best


def best_validation(best: BestValidation, output_dir: Path) -> dict | None:
    """The best validation's metrics; from results.json when training ran in spawned processes."""
    return best.best or read_results(output_dir).get("best")


def summary_metrics(best: dict | None, monitor: str) -> dict:
    """results.json's validation fields: ``val/*`` at the best validation, ``{monitor}_best``, its step."""
    if not best:
        return {}
    fields = {key: value for key, value in best.items() if key.startswith("val/")}
    if monitor in best:
        fields[f"{monitor}_best"] = best[monitor]
    fields.update(best_step=best.get("step"), best_epoch=best.get("epoch"))
    return fields


def existing(path: str | None) -> str | None:
    return path if path and Path(path).exists() else None


def print_summary(output_dir: Path, record: dict) -> None:
    metrics = {k: v for k, v in record.items() if k.startswith(("val/", "test/")) and isinstance(v, float)}
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    print(f"run directory: {output_dir}\nfinal metrics: {shown} ({record.get('steps')} steps, "
          f"{record.get('seconds')} s)", flush=True)


class Session:
    """Whether this session may write the run record: at once in a new run directory; where an
    earlier session left a record, only once this session's training has started (the recorder says
    so), so a command that fails before never replaces a finished run's record."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.protected = (output_dir / RESULTS_FILE).exists()
        self.recorder: RunRecorder | None = None
        self.trainer: pl.Trainer | None = None
        self.fitted = False  # fit returned (training ran, possibly in spawned processes)

    @property
    def may_write(self) -> bool:
        return not self.protected or self.fitted or (self.recorder is not None and self.recorder.training_started)

    def write(self, record: dict) -> bool:
        """Write the record if allowed; False when it was not written (not allowed, or the disk refused)."""
        if not self.may_write:
            return False
        try:
            write_record(self.output_dir, record)
        except OSError as err:
            log.error("results.json could not be written: %s", one_line(err))
            return False
        return True


def train(cfg: DictConfig) -> float | None:
    """Fit, test the best checkpoint, write results.json; return the best monitored value.

    Raises UserError (one line) for bad configs, data, checkpoints and a full disk, and RunInterrupted
    on a signal; in a sweep every failure is recorded in the job's results.json and NaN is returned
    instead, so the sweep goes on to its next job.
    """
    started = time.time()
    route_lightning_logs()
    output_dir = Path(cfg.paths.output_dir)
    session = Session(output_dir)
    record: dict = {"status": RUNNING, "task": choice("task"), "model": choice("model"),
                    "output_dir": str(output_dir.resolve())}
    hold = held(output_dir)  # released after the final record is written, whatever happens
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        resume = Resume.find(cfg, output_dir)
        hold.__enter__()
        return _train(cfg, output_dir, session, resume, record, started)
    except RunDirectoryBusy:
        raise  # another process's run: nothing of it is touched
    except NonFiniteLossError as err:
        trainer = session.trainer
        # The step whose loss was first non-finite (checked without a per-step sync, so training may be a few ahead).
        step = err.step if getattr(err, "step", None) is not None else getattr(trainer, "global_step", 0)
        record.update(status=DIVERGED, error=one_line(err), steps=step,
                      **{f"{name}_checkpoint": existing(str(output_dir / CHECKPOINT_DIR / f"{name}.ckpt"))
                         for name in ("best", "last")})
        saved = [Path(record[key]).name for key in ("best_checkpoint", "last_checkpoint") if record[key]]
        where = (f"results.json and the last good checkpoints ({', '.join(saved)}) are in {output_dir}" if saved
                 else f"no checkpoint was saved before it; results.json is in {output_dir}")
        return _fail(record, session, started, UserError(f"{one_line(err)} ({where})"), err)
    except RunInterrupted:
        _write_final(record, session, started)
        raise
    except (UserError, DownloadError, DataError) as err:
        record.update(status=FAILED, error=one_line(err))
        return _fail(record, session, started, err if isinstance(err, UserError) else UserError(one_line(err)), err)
    except (KeyboardInterrupt, SystemExit) as err:  # a second Ctrl-C, or Lightning's own exit on one
        trainer = session.trainer
        record.update(status=INTERRUPTED, error=f"{type(err).__name__} at step {getattr(trainer, 'global_step', 0)}")
        _write_final(record, session, started)
        raise RunInterrupted(f"interrupted: results.json is in {output_dir}", 130) from err
    except Exception as err:
        disk = storage_error(err)
        if disk is not None:  # a full disk (or one that turned read-only): one line, what is intact and where
            if not str(disk.filename or "").startswith(str(output_dir.resolve())):
                disk = OSError(disk.errno, disk.strerror, str(output_dir))  # e.g. a library's file in /tmp
            record.update(status=FAILED, error=describe_storage_error(disk))
            written = _write_final(record, session, started)
            last = session.recorder.saved_step if session.recorder else None
            kept = (f"the last good last.ckpt (step {last}) is in {output_dir / CHECKPOINT_DIR}" if last is not None
                    else "no checkpoint was saved before it")
            status = ("results.json says so" if written
                      else "results.json could not be updated (it keeps the last progress written)")
            return _fail(record, session, started, UserError(
                f"{describe_storage_error(disk)}: {kept}; {status}; free space and resume with "
                f"ckpt_path={output_dir}"), err, written=True)
        record.update(status=FAILED, error=f"{type(err).__name__}: {one_line(err)}")
        _write_final(record, session, started)
        if is_multirun():
            log.error("job failed: %s\n%s", record["error"], traceback.format_exc())
            return math.nan
        raise
    finally:
        hold.__exit__(None, None, None)


def _train(cfg: DictConfig, output_dir: Path, session: Session, resume: Resume | None, record: dict,
           started: float) -> float | None:
    """The run itself, once the resume has passed its checks and the directory is held."""
    record.clear()
    record.update(run_record(cfg, output_dir, resume))
    seconds_before = float(resume.previous.get("seconds") or 0.0) if resume else 0.0
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    network = build_network(cfg)
    objective = build_objective(cfg, network, plain_config(cfg))
    record["params"] = count_parameters(objective)
    callbacks, best = run_callbacks(cfg)
    recorder = session.recorder = RunRecorder(output_dir, best, record, seconds_before)
    loggers = build_loggers(cfg, purge_step=resume.step if resume else None)
    trainer = build_trainer(cfg, loggers, [*callbacks, recorder])
    session.trainer = trainer
    record["hardware"] = hardware(trainer)
    if trainer.is_global_zero:
        session.write(record)  # a new run's record at once; an earlier session's only once training starts

    with GracefulStop(trainer, recorder) as stop:
        recorder.signal_guard = stop
        trainer.fit(objective, datamodule=datamodule, ckpt_path=str(resume.checkpoint) if resume else None,
                    weights_only=True)
    session.fitted = True
    checkpoint = next((cb for cb in trainer.callbacks if isinstance(cb, pl.callbacks.ModelCheckpoint)), None)
    best_checkpoint = existing(getattr(checkpoint, "best_model_path", None))
    record.update(summary_metrics(best_validation(best, output_dir), cfg.task.monitor),
                  steps=trainer.global_step, epochs=trainer.current_epoch, best_checkpoint=best_checkpoint,
                  last_checkpoint=existing(str(recorder.last_checkpoint)), seconds=recorder.seconds())
    if stop.received is not None:
        record.update(status=INTERRUPTED, error=f"stopped by signal {stop.received} at step {trainer.global_step}")
        raise RunInterrupted(f"interrupted at step {trainer.global_step}: last.ckpt and results.json are in "
                             f"{output_dir}; resume with ckpt_path={output_dir}", stop.exit_code)
    record["status"] = FITTED
    if trainer.is_global_zero:  # a crash while testing must not lose the fit's results
        _write_or_raise(session, record)
    if cfg.get("test", True):
        # Without a best checkpoint (e.g. fast_dev_run) the current weights are tested.
        tested = trainer.test(objective, datamodule=datamodule, ckpt_path=best_checkpoint, verbose=False,
                              weights_only=True)
        record.update({key: float(value) for key, value in (tested[0] if tested else {}).items()})
    record.update(status=FINISHED, seconds=round(seconds_before + time.time() - started, 2))
    if trainer.is_global_zero:
        _write_or_raise(session, record)
        if not trainer.fast_dev_run:  # a smoke test leaves no TensorBoard run behind
            log_hparams(loggers, cfg, record)
        print_summary(output_dir, record)
    monitor = cfg.task.monitor
    best = record.get(f"{monitor}_best", record.get(monitor))
    return None if best is None else float(best)


def _write_or_raise(session: Session, record: dict) -> None:
    """Write the record; a disk fault propagates (the driver turns it into one line)."""
    if session.may_write:
        write_record(session.output_dir, record)


def _write_final(record: dict, session: Session, started: float) -> bool:
    record.setdefault("seconds", round(time.time() - started, 2))
    return session.write(record)


def _fail(record: dict, session: Session, started: float, error: UserError, cause: BaseException,
          written: bool = False) -> float:
    """Record a failed/diverged run; in a sweep log it and go on (NaN), else raise the one-line error."""
    if not written:
        _write_final(record, session, started)
    if is_multirun():
        log.error("job %s: %s", record.get("status"), one_line(error))
        return math.nan
    raise error from cause
