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


def evaluation_checkpoint(requested) -> Path:
    """The checkpoint eval.py tests: a file, or a run directory's best.ckpt (else its last.ckpt)."""
    if requested in (None, ""):
        raise UserError("eval.py needs ckpt_path=PATH: a .ckpt file or a run directory (outputs/<day>/<run>)")
    path = Path(str(requested)).expanduser()
    if path.is_dir():
        for name in ("best.ckpt", LAST_CHECKPOINT):
            for candidate in (path / CHECKPOINT_DIR / name, path / name):
                if candidate.is_file():
                    return candidate.resolve()
        raise UserError(f"ckpt_path={requested}: the directory holds no {CHECKPOINT_DIR}/best.ckpt or "
                        f"{LAST_CHECKPOINT}")
    if not path.is_file():
        raise UserError(f"ckpt_path={requested}: no such file (pass outputs/<run>/checkpoints/best.ckpt or a run "
                        f"directory)")
    return path.resolve()
