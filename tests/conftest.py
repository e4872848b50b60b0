"""Shared fixtures: composing train.yaml as train.py would, and running the entry points as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from lightning_modules.run import register_resolvers
from lightning_modules.run.build import compose_config

register_resolvers()  # as train.py does before Hydra composes (${add:...}, run directories)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Small, fast settings for the adding problem: a few steps per epoch, short sequences.
QUICK = [
    "task.seq_len=20",
    "task.datamodule.train_size=64",
    "task.datamodule.val_size=32",
    "task.datamodule.test_size=32",
    "task.datamodule.batch_size=16",
    "trainer=cpu",
    "trainer.enable_model_summary=false",
    "callbacks.progress_bar.refresh_rate=0",
]


def compose_train(output_dir: Path, overrides: list[str]) -> DictConfig:
    """train.yaml composed with ``overrides``, with Hydra's runtime set up as under ``python train.py``."""
    return compose_config(overrides, output_dir)


def compose_eval(output_dir: Path, ckpt_path, overrides: list[str] = ()) -> DictConfig:
    """eval.yaml composed for ``ckpt_path`` with ``overrides`` as eval.py would (CPU trainer), writing
    into ``output_dir``: ``evaluate(cfg)`` is eval.py's run without a new interpreter."""
    return compose_config([f"ckpt_path={ckpt_path}", "trainer=cpu", *overrides], output_dir, config_name="eval")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """The run directory of one finished QUICK run (3 epochs of 4 steps, trained under umask 022), shared
    by the tests that only read it (results.json, TensorBoard, eval.py); never write into it."""
    from lightning_modules.run import train

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    previous = os.umask(0o022)
    try:
        train(compose_train(run_dir, QUICK + ["task.max_epochs=3"]))
    finally:
        os.umask(previous)
    return run_dir


@pytest.fixture
def train_cfg(tmp_path):
    """Factory: ``train_cfg(["model=lstm", ...])`` -> composed config writing into tmp_path/run."""
    return lambda overrides=(): compose_train(tmp_path / "run", QUICK + list(overrides))


def run_script(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python <script> <args>`` from the repository root, as a user would."""
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
