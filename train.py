"""Train a recurrent network: `python train.py model=indrnn task=adding` (see README.md)."""
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from lightning_modules.pipeline import UserError, train  # noqa: E402  (after PROJECT_ROOT is set)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except UserError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
