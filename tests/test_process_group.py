"""Distributed workers end their gloo process group before Python shuts down
(lightning_modules/run/process_group.py).

Without it, about half of the two-process gloo runs below abort at exit on this machine (measured:
14 of 30 ``terminate called without an active exception``, SIGABRT), after their collectives have
finished; with it, none did (0 of 30). The test spawns real processes because process exit is what
it checks."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_modules.run.build import compose_config, build_trainer
from lightning_modules.run.process_group import (ProcessGroupShutdown, destroy_process_group,
                                                 destroy_process_group_at_exit)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def collectives_then_exit(rank: int, port: int) -> None:
    """One worker: join a two-process gloo group, run the collectives a DDP step and a test run use
    (all-reduce of gradients, all-gather of metrics), let the callback do its part, return (exit)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ProcessGroupShutdown().setup(None, None, "fit")
    for _ in range(20):
        dist.all_reduce(torch.randn(1000))
    gathered = [torch.empty(1) for _ in range(2)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    assert [float(g) for g in gathered] == [0.0, 1.0]


@pytest.mark.slow  # 8 x 2 spawned processes, 40-50 s on 2 cores
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_spawned_gloo_workers_exit_cleanly():
    for _ in range(8):  # each run aborted with probability ~0.47 before; 8 clean runs: p ~ 0.006 by chance
        mp.start_processes(collectives_then_exit, args=(free_port(),), nprocs=2, start_method="spawn")


class FakeAtexit:
    """atexit's two calls over a visible list: ``unregister`` removes every occurrence, as atexit's does."""

    def __init__(self) -> None:
        self.handlers: list = []

    def register(self, handler) -> None:
        self.handlers.append(handler)

    def unregister(self, handler) -> None:
        self.handlers = [h for h in self.handlers if h is not handler]


def test_registers_once_and_only_inside_a_group(monkeypatch):
    fake = FakeAtexit()
    monkeypatch.setattr("lightning_modules.run.process_group.atexit", fake)
    assert not destroy_process_group_at_exit() and fake.handlers == []  # not in a process group: nothing to do
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    assert destroy_process_group_at_exit() and destroy_process_group_at_exit()
    assert fake.handlers == [destroy_process_group]  # two calls (fit, then test), one handler


def test_every_trainer_has_it(tmp_path):
    cfg = compose_config(["trainer=ddp_cpu"], tmp_path)
    trainer = build_trainer(cfg, [], [])
    assert sum(isinstance(cb, ProcessGroupShutdown) for cb in trainer.callbacks) == 1
