"""Train a recurrent network: `python train.py model=indrnn task=adding` (see README.md)."""
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

from lightning_modules.run import register_resolvers, run_entry, train  # noqa: E402  (after PROJECT_ROOT is set)

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_entry(train, cfg)


if __name__ == "__main__":
    main()
