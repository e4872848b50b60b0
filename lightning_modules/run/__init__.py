"""The run driver: what train.py and eval.py do, built from a composed Hydra config.

Not a LightningModule: it builds the datamodule, the network and the objective, drives Lightning's
Trainer and keeps the run's record (run directory, checkpoints, results.json). Modules:

* :mod:`.driver`: ``train(cfg)``, read top to bottom.
* :mod:`.evaluate`: ``evaluate(cfg)``, eval.py's run.
* :mod:`.checkpoints`: which checkpoint a ``ckpt_path`` names, and loading one as data.
* :mod:`.build`: instantiating each piece from its config group, with one-line errors.
* :mod:`.rundir`: unique run directories, the Hydra resolvers, the ``RunDirectory`` callback.
* :mod:`.resume`: which checkpoint a resume starts from, and the checks it must pass first.
* :mod:`.record`: results.json, its one home (statuses, fields, schema, atomic write).
* :mod:`.lock`: one process per run directory.
* :mod:`.allowlist`: which ``_target_``s a config read from a checkpoint may name (a checkpoint is data).
* :mod:`.recorder`: ``last.ckpt`` always current, the best validation, random states, progress.
* :mod:`.signals`: stopping on SIGINT/SIGTERM with everything saved.
* :mod:`.sweep`: the table at the end of a sweep, and its exit status.
* :mod:`.errors`: UserError and the translation of library errors into one line.
"""
from __future__ import annotations

import sys
from typing import Callable

from lightning_modules.run.driver import RunInterrupted, train
from lightning_modules.run.errors import UserError
from lightning_modules.run.evaluate import evaluate
from lightning_modules.run.rundir import register_resolvers


def run_entry(function: Callable, cfg) -> object:
    """Call ``function(cfg)`` for an entry point: a UserError ends the process with its one line
    (status 1), an interrupted run with its message and 128 + the signal number."""
    try:
        return function(cfg)
    except UserError as err:
        sys.exit(f"error: {err}")
    except RunInterrupted as err:
        print(str(err), file=sys.stderr, flush=True)
        sys.exit(err.exit_code)


__all__ = ["RunInterrupted", "UserError", "evaluate", "register_resolvers", "run_entry", "train"]
