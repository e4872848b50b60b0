"""eval.py's run: rebuild a training run from the config stored in its checkpoint, test it, and write
results.json into eval.py's own run directory."""
from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from datamodules.download import DataError, DownloadError
from lightning_modules.language_model import dynamic_evaluate
from lightning_modules.results import write_results
from lightning_modules.run.build import build_datamodule, build_loggers, build_network, build_objective, build_trainer, count_parameters
from lightning_modules.run.checkpoints import evaluation_checkpoint, load_our_checkpoint
from lightning_modules.run.driver import read_results, route_lightning_logs
from lightning_modules.run.errors import UserError, one_line
from lightning_modules.run.rundir import checkpoint_run_dir


# eval.py's own settings replace the training run's for these keys (merging would keep, e.g., the
# training run's TensorBoard logger and write test points into its curves).
EVAL_OWN_KEYS = ("trainer", "paths", "logger", "seed")


def evaluate(cfg: DictConfig) -> dict:
    """Rebuild the run stored in ``cfg.ckpt_path``, test it, and write results.json into eval.py's own
    run directory (never into the training run's); return the test metrics."""
    started = time.time()
    route_lightning_logs()
    requested = OmegaConf.select(cfg, "ckpt_path", throw_on_missing=False, default=None)
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        requested = None
    ckpt_path = evaluation_checkpoint(requested)
    stored = load_our_checkpoint(ckpt_path)["hyper_parameters"]["run_config"]
    run_cfg = OmegaConf.create({key: value for key, value in stored.items() if key not in EVAL_OWN_KEYS})
    for key in EVAL_OWN_KEYS:
        if key in cfg:
            run_cfg[key] = cfg[key]
    pl.seed_everything(run_cfg.seed, workers=True)
    datamodule = build_datamodule(run_cfg)
    objective = build_objective(run_cfg, build_network(run_cfg), dict(stored))
    trainer = build_trainer(run_cfg, build_loggers(run_cfg), [])
    try:
        tested = trainer.test(objective, datamodule=datamodule, ckpt_path=str(ckpt_path), verbose=False,
                              weights_only=True)
    except (DownloadError, DataError) as err:
        raise UserError(one_line(err)) from err
    metrics = {key: float(value) for key, value in tested[0].items()}
    if cfg.get("dynamic_eval"):  # language models: Krause et al.'s dynamic evaluation (conf/eval.yaml)
        try:
            metrics.update(dynamic_evaluate(objective, datamodule, lr=cfg.dynamic_eval_lr,
                                            decay=cfg.dynamic_eval_decay, rms=cfg.dynamic_eval_rms,
                                            device=trainer.strategy.root_device))
        except ValueError as err:
            raise UserError(one_line(err)) from err
    # Checkpoints from before the driver stored its config choices: the training run's results.json has them.
    choices = stored.get("choices") or read_results(checkpoint_run_dir(ckpt_path))
    output_dir = Path(run_cfg.paths.output_dir)
    record = {"status": "finished", "checkpoint": str(ckpt_path), "task": choices.get("task"),
              "model": choices.get("model"), "experiment": choices.get("experiment"),
              "training_run": str(checkpoint_run_dir(ckpt_path)), **metrics, "params": count_parameters(objective),
              "seconds": round(time.time() - started, 2), "output_dir": str(output_dir.resolve())}
    if trainer.is_global_zero:
        write_results(output_dir, record)
        print("test metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())), flush=True)
        print(f"results written to {output_dir / 'results.json'}", flush=True)
    return metrics
