"""Re-evaluate a checkpoint: `python eval.py ckpt_path=outputs/<run>/checkpoints/best.ckpt` (or a run directory)."""
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from lightning_modules.run import evaluate, register_resolvers, run_entry  # noqa: E402  (after PROJECT_ROOT is set)

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_entry(evaluate, cfg)


if __name__ == "__main__":
    main()
