"""Freed host memory is kept for reuse (lightning_modules/run/host_memory.py) and the run driver
applies the trainer group's process settings (lightning_modules/run/build.py).

The page-fault test runs in a new interpreter: malloc's settings are process-wide and never undone,
and this pytest process has them already once any test has built a Trainer."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from lightning_modules.run import build, host_memory
from lightning_modules.run.build import build_trainer, compose_config, split_process_settings
from tests.conftest import ROOT

glibc_only = pytest.mark.skipif(not host_memory.glibc_malloc(), reason="glibc's malloc only (Linux with glibc)")

# A 64 MiB tensor written eight times over, before and after keep_freed_memory(): minor page faults of
# each time. 64 MiB is above glibc's largest adaptive mmap threshold (32 MiB), so by default every
# allocation maps fresh pages.
FAULTS_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from lightning_modules.run.host_memory import keep_freed_memory

    def faults():
        counts = []
        for _ in range(8):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            tensor = torch.ones(16 * 2**20)
            del tensor
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return counts

    default = faults()
    applied = keep_freed_memory()
    print(json.dumps({"default": default, "applied": applied, "kept": faults()}))
""")


@glibc_only
def test_a_large_tensor_reuses_its_pages_once_freed_memory_is_kept():
    result = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    pages = 64 * 2**20 // 4096
    assert counts["applied"] is True
    # The first allocations grow the heap (in 1 of 12 runs here a small block took the front of the freed
    # one and the second pass grew it again); from then on the block is reused: no fresh pages.
    assert max(counts["kept"][-5:]) < pages // 100, counts
    assert min(counts["default"][1:]) > max(counts["kept"][-5:]), counts


def test_keep_freed_memory_does_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory, "glibc_malloc", lambda: False)
    monkeypatch.setattr(host_memory, "_mallopt", lambda: pytest.fail("mallopt called without glibc"))
    assert host_memory.keep_freed_memory() is False


class FakeMallopt:
    """glibc's mallopt that refuses the parameters in ``refuses`` (returns 0), recording its calls."""

    def __init__(self, refuses=()) -> None:
        self.refuses, self.calls = set(refuses), []

    def __call__(self, parameter, value):
        self.calls.append((parameter, value))
        return 0 if parameter in self.refuses else 1


@pytest.fixture
def fake_glibc(monkeypatch):
    """A fresh process state on a (fake) glibc: returns a function that installs a FakeMallopt."""
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory, "_refused", False)
    monkeypatch.setattr(host_memory, "glibc_malloc", lambda: True)

    def install(refuses=()):
        mallopt = FakeMallopt(refuses)
        monkeypatch.setattr(host_memory, "_mallopt", lambda: mallopt)
        return mallopt
    return install


def test_the_mmap_threshold_is_set_first_then_the_trim_threshold_once(fake_glibc):
    mallopt = fake_glibc()
    assert host_memory.keep_freed_memory() is True and host_memory.keep_freed_memory() is True
    assert mallopt.calls == [(host_memory.M_MMAP_THRESHOLD, host_memory.INT_MAX),
                             (host_memory.M_TRIM_THRESHOLD, host_memory.INT_MAX)]
    assert host_memory.freed_memory_kept()


def test_a_refused_mmap_threshold_changes_nothing_and_warns_once(fake_glibc, caplog):
    # glibc before 2.35 refuses thresholds over 32 MiB; the trim threshold alone would freeze the adaptive
    # mmap threshold, so it is not set either.
    mallopt = fake_glibc(refuses={host_memory.M_MMAP_THRESHOLD})
    with caplog.at_level(logging.WARNING, logger=host_memory.__name__):
        assert host_memory.keep_freed_memory() is False
        assert host_memory.keep_freed_memory() is False
    assert mallopt.calls == [(host_memory.M_MMAP_THRESHOLD, host_memory.INT_MAX)]
    [record] = caplog.records
    assert "M_MMAP_THRESHOLD" in record.getMessage() and "2.35 or later" in record.getMessage()
    assert "\n" not in record.getMessage()
    assert not host_memory.freed_memory_kept()


@pytest.mark.parametrize("keep", [True, False])
def test_build_trainer_applies_the_process_settings_and_passes_on_the_rest(keep, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(build, "keep_freed_memory", lambda: calls.append("keep") or True)
    precision = torch.get_float32_matmul_precision()
    cfg = compose_config(["trainer=cpu", "trainer.float32_matmul_precision=medium", "trainer.max_epochs=3",
                          f"trainer.keep_freed_memory={str(keep).lower()}"], tmp_path)
    try:
        trainer = build_trainer(cfg, [], [])
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(precision)
    assert calls == (["keep"] if keep else [])
    assert trainer.max_epochs == 3 and trainer.default_root_dir == str(tmp_path)


def test_the_process_settings_are_not_trainer_arguments(tmp_path):
    cfg = compose_config(["trainer=cpu", "trainer.float32_matmul_precision=medium"], tmp_path)
    arguments, settings = split_process_settings(cfg.trainer)
    assert settings == {"float32_matmul_precision": "medium", "keep_freed_memory": True}
    # Everything else reaches the Trainer, resolved (the copy has no root to resolve against).
    assert OmegaConf.to_container(cfg.trainer, resolve=True) == {**OmegaConf.to_container(arguments), **settings}
    assert arguments.default_root_dir == str(tmp_path)


def test_a_gpu_trainer_leaves_host_memory_alone(monkeypatch, tmp_path):
    # No GPU here: the CPU trainer stands in for one whose accelerator is not the CPU's.
    calls = []
    monkeypatch.setattr(build, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(build, "CPUAccelerator", type("OtherAccelerator", (), {}))
    build_trainer(compose_config(["trainer=cpu"], tmp_path), [], [])
    assert calls == []


def test_the_default_trainer_keeps_freed_memory(tmp_path):
    assert compose_config([], tmp_path).trainer.keep_freed_memory is True
