"""Re-evaluate a checkpoint: `python eval.py ckpt_path=outputs/<run>/checkpoints/best.ckpt` (or a run directory).

The checkpoint fixes the model, task and training settings; eval.py takes conf/eval.yaml's keys and
groups only (trainer, logger, paths, seed, batch_size, num_workers, test_samplings, dynamic_eval*),
and refuses any other override in one line before Hydra composes (`python eval.py --help`)."""
import os
import sys
from pathlib import Path

import hydra
from hydra._internal.utils import get_args_parser
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

# After PROJECT_ROOT is set:
from lightning_modules.run import UserError, evaluate, register_resolvers, run_entry  # noqa: E402
from lightning_modules.run.evaluate import check_eval_overrides  # noqa: E402

register_resolvers()


def refuse_fixed_overrides(argv: list[str]) -> None:
    """One line for an override of what the checkpoint fixes, before Hydra, whose own message for
    ``task.seq_len=50`` would advise adding ``+`` (and eval.py would then ignore it)."""
    try:
        overrides = get_args_parser().parse_known_args(argv)[0].overrides  # Hydra's own reading of argv
    except SystemExit:  # a malformed flag: Hydra reports it
        return
    try:
        check_eval_overrides(overrides)
    except UserError as err:
        sys.exit(f"error: {err}")


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_entry(evaluate, cfg)


if __name__ == "__main__":
    if not {"-h", "--help", "--hydra-help"} & set(sys.argv[1:]):
        refuse_fixed_overrides(sys.argv[1:])
    main()
