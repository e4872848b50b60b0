"""The distributed process group ends while Python is still alive.

Lightning destroys the default process group at exit only for NCCL. With gloo (``trainer=ddp_cpu``,
or ``ddp`` on CPU nodes) the group is left to the interpreter's finalization: gloo's C++ worker
threads may then still hold finished work (tensors with Python references) and release it after the
interpreter has begun to tear down; the thread that asks for the GIL is ended by CPython and the
process aborts with ``terminate called without an active exception`` (SIGABRT), after training and
testing have finished. Under ``ddp_spawn`` every ``fit`` and ``test`` starts new workers, so a sweep
meets this race several times per job; one abort fails the job (seen in CI: a worker of the second
job of a two-job DDP sweep, after its ``fit`` had ended). Destroying the group from an ``atexit`` handler, as
PyTorch's shutdown notes ask every trainer process to do, joins those threads first.

:class:`ProcessGroupShutdown` registers that handler in each process that trains or tests (its
``setup`` runs after the strategy has joined the group). :func:`build_trainer
<lightning_modules.run.build.build_trainer>` adds it to every Trainer, so ``train.py`` and
``eval.py`` get it whatever the callbacks config says.
"""
from __future__ import annotations

import atexit
import logging

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


def in_process_group() -> bool:
    """Whether this process belongs to an initialised default process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def destroy_process_group() -> None:
    """Destroy the default process group if this process is in one (idempotent; no collective)."""
    if in_process_group():
        torch.distributed.destroy_process_group()
        log.debug("process group destroyed before interpreter shutdown")


def destroy_process_group_at_exit() -> bool:
    """Have ``atexit`` call :func:`destroy_process_group` exactly once in this process when it is in a
    process group (a repeated call, or one in a forked child that inherited the handler, replaces it
    rather than adding a second); returns whether it is registered."""
    if not in_process_group():
        return False
    atexit.unregister(destroy_process_group)
    atexit.register(destroy_process_group)
    return True


class ProcessGroupShutdown(pl.Callback):
    """Makes each process of a distributed run destroy its process group before Python shuts down
    (see the module docstring); nothing happens in a single-process run."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        destroy_process_group_at_exit()
