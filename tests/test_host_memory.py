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
from lightning_modules.run.build import PROCESS_SETTINGS, apply_process_settings, compose_config
from tests.conftest import ROOT

glibc_only = pytest.mark.skipif(not host_memory.glibc_malloc(), reason="glibc's malloc only (Linux with glibc)")

# A 64 MiB tensor written four times over, before and after keep_freed_memory(): minor page faults of
# each time. 64 MiB is above glibc's largest adaptive mmap threshold (32 MiB), so by default every
# allocation maps fresh pages.
FAULTS_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from lightning_modules.run.host_memory import keep_freed_memory

    def faults():
        counts = []
        for _ in range(4):
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
    # After the first allocation has grown the heap, the block is reused: no fresh pages.
    assert max(counts["kept"][1:]) < pages // 100, counts
    assert min(counts["default"][1:]) > max(counts["kept"][1:]), counts


def test_keep_freed_memory_does_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory, "glibc_malloc", lambda: False)
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda *args: pytest.fail("mallopt called without glibc"))
    assert host_memory.keep_freed_memory() is False


class RefusingLibc:
    """A libc whose mallopt refuses every setting (returns 0), recording its calls."""

    def __init__(self) -> None:
        self.calls = []

        def mallopt(parameter, value):
            self.calls.append((parameter, value))
            return 0
        self.mallopt = mallopt


def test_a_refused_setting_is_reported_in_one_warning(monkeypatch, caplog):
    libc = RefusingLibc()
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory, "glibc_malloc", lambda: True)
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda *args: libc)
    with caplog.at_level(logging.WARNING, logger=host_memory.__name__):
        assert host_memory.keep_freed_memory() is False
    assert libc.calls == [(host_memory.M_MMAP_THRESHOLD, host_memory.INT_MAX),
                          (host_memory.M_TRIM_THRESHOLD, host_memory.INT_MAX)]
    [record] = caplog.records
    assert "M_MMAP_THRESHOLD, M_TRIM_THRESHOLD" in record.getMessage()
    assert "trainer.keep_freed_memory=false" in record.getMessage()
    assert host_memory._applied is False


@pytest.mark.parametrize("keep", [True, False])
def test_the_run_driver_applies_the_process_settings_and_passes_on_the_rest(keep, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(build, "keep_freed_memory", lambda: calls.append("keep") or True)
    precision = torch.get_float32_matmul_precision()
    cfg = compose_config(["trainer=cpu", "trainer.float32_matmul_precision=medium",
                          f"trainer.keep_freed_memory={str(keep).lower()}"], tmp_path)
    try:
        trainer_cfg = apply_process_settings(cfg.trainer)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(precision)
    assert calls == (["keep"] if keep else [])
    assert not set(PROCESS_SETTINGS) & set(trainer_cfg)
    # Everything else reaches the Trainer, resolved (the copy has no root to resolve against).
    assert trainer_cfg.default_root_dir == str(tmp_path) and trainer_cfg.max_epochs == cfg.task.max_epochs
    assert OmegaConf.to_container(cfg.trainer, resolve=True) == {
        **OmegaConf.to_container(trainer_cfg), "float32_matmul_precision": "medium", "keep_freed_memory": keep}


def test_the_default_trainer_keeps_freed_memory(tmp_path):
    assert compose_config([], tmp_path).trainer.keep_freed_memory is True
