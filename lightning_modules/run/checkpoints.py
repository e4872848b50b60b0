"""Reading checkpoints that train.py wrote: which file a ``ckpt_path`` names for evaluation, and
loading one as data (``weights_only=True``, and a stored config that names only the project's own
building blocks: :mod:`.allowlist`), with a one-line UserError for anything else."""
from __future__ import annotations

from pathlib import Path

import torch

from lightning_modules.run.allowlist import check_checkpoint_config
from lightning_modules.run.errors import UserError
from lightning_modules.run.rundir import CHECKPOINT_DIR, LAST_CHECKPOINT


def load_our_checkpoint(path: Path, what: str = "ckpt_path") -> dict:
    """``torch.load`` (weights only) of a checkpoint written by train.py, or a one-line UserError; its
    stored run config is checked against the allowlist here, so every reader (eval.py, generate.py,
    dynamic evaluation, resume) gets a config that names no code outside the project's configs."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, garbage, or a pickle with foreign classes: one message for all
        reason = type(err).__name__
        raise UserError(f"{what}={path} is not a checkpoint that train.py wrote (torch could not read it: "
                        f"{reason}); pass a .ckpt file from <run>/checkpoints/") from err
    run_config = checkpoint.get("hyper_parameters", {}).get("run_config") if isinstance(checkpoint, dict) else None
    if not isinstance(run_config, dict):
        raise UserError(f"{what}={path} is a PyTorch file but not a checkpoint of this project (it holds no run "
                        f"config); pass a .ckpt file from <run>/checkpoints/")
    check_checkpoint_config(run_config, f"{what}={path}")
    return checkpoint


BEST_CHECKPOINT = "best.ckpt"
# What a run directory given as ckpt_path stands for: resume continues from its latest state, eval.py
# tests its best checkpoint (its latest where none was kept, e.g. a run stopped before validating).
RUN_CHECKPOINTS = {"resume": (LAST_CHECKPOINT,), "eval": (BEST_CHECKPOINT, LAST_CHECKPOINT)}


def checkpoint_in(requested, purpose: str) -> Path:
    """The checkpoint file ``requested`` names for ``purpose`` ("resume" or "eval"): a file, or a run
    directory's ``checkpoints/<name>`` (or ``<name>`` beside it) for the names of RUN_CHECKPOINTS; a
    one-line UserError when there is none."""
    names = RUN_CHECKPOINTS[purpose]
    path = Path(str(requested)).expanduser()
    if path.is_dir():
        for name in names:
            for candidate in (path / CHECKPOINT_DIR / name, path / name):
                if candidate.is_file():
                    return candidate.resolve()
        wanted = " or ".join(f"{CHECKPOINT_DIR}/{name}" for name in names)
        raise UserError(f"ckpt_path={requested}: the directory holds no {wanted} (pass a .ckpt file or a run "
                        f"directory holding {wanted})")
    if not path.is_file():
        raise UserError(f"ckpt_path={requested}: no such checkpoint (pass a .ckpt file, e.g. "
                        f"outputs/<run>/{CHECKPOINT_DIR}/{names[0]}, or a run directory)")
    return path.resolve()


def evaluation_checkpoint(requested) -> Path:
    """The checkpoint eval.py tests: a file, or a run directory's best.ckpt (else its last.ckpt)."""
    if requested in (None, ""):
        raise UserError("eval.py needs ckpt_path=PATH: a .ckpt file or a run directory (outputs/<day>/<run>)")
    return checkpoint_in(requested, "eval")
