"""Re-evaluate a checkpoint: `python eval.py ckpt_path=outputs/<run>/checkpoints/best.ckpt`."""
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from lightning_modules.pipeline import UserError, evaluate  # noqa: E402  (after PROJECT_ROOT is set)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except UserError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
