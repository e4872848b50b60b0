"""Shared fixtures: composing train.yaml as train.py would, and running the entry points as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lightning_modules.run import register_resolvers

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
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir.parent)
        del cfg.hydra
    return cfg


@pytest.fixture
def train_cfg(tmp_path):
    """Factory: ``train_cfg(["model=lstm", ...])`` -> composed config writing into tmp_path/run."""
    return lambda overrides=(): compose_train(tmp_path / "run", QUICK + list(overrides))


def run_script(script: str, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python <script> <args>`` from the repository root, as a user would."""
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
