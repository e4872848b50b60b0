"""eval.py's run: rebuild a training run from the config stored in its checkpoint, test it, and write
results.json into eval.py's own run directory.

The checkpoint fixes the network, the task and the objective; eval.py takes only its own settings
(the keys and groups of conf/eval.yaml: trainer, logger, paths, seed, the evaluation's batch size,
workers and NTU test samplings, and the objective's evaluation modes, e.g. the language model's
dynamic evaluation, which set the objective's key of the same name). Any other override (``+model=indrnn``,
``+model.hidden_size=16``, ``task.seq_len=50``) is refused in one line, never silently dropped.
"""
from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import pytorch_lightning as pl
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from datamodules.download import DataError, DownloadError
from lightning_modules.run.build import (CONFIG_DIR, build_datamodule, build_loggers, build_network, build_objective,
                                         build_trainer, count_parameters, objective_node)
from lightning_modules.run.checkpoints import evaluation_checkpoint, load_our_checkpoint
from lightning_modules.run.driver import read_results, route_lightning_logs
from lightning_modules.run.errors import UserError, one_line
from lightning_modules.run.record import write_record
from lightning_modules.run.rundir import checkpoint_run_dir


# eval.py's own settings replace the training run's for these keys (merging would keep, e.g., the
# training run's TensorBoard logger and write test points into its curves).
EVAL_OWN_KEYS = ("trainer", "paths", "logger", "seed")
# eval.py's keys that set the DataModule's (where it has them); every other key of conf/eval.yaml but
# ckpt_path sets the objective's key of the same name (its evaluation modes), where given.
DATA_SETTINGS = ("batch_size", "num_workers", "test_samplings")


@lru_cache(maxsize=None)
def eval_keys() -> tuple[str, ...]:
    """What eval.py's command line may set: conf/eval.yaml's keys and config groups, and ``hydra``."""
    document = yaml.safe_load((CONFIG_DIR / "eval.yaml").read_text())
    groups = [next(iter(entry)) for entry in document.get("defaults", []) if isinstance(entry, dict)]
    return tuple([key for key in document if key not in ("defaults", "hydra")] + groups + ["hydra"])


def override_key(override: str, full: bool = False) -> str:
    """The top-level key or group an override sets: ``+model.hidden_size=16`` -> ``model`` (``full``:
    ``model.hidden_size``)."""
    try:
        (parsed,) = OverridesParser.create().parse_overrides([override])
        key = parsed.key_or_group
    except HydraException:  # Hydra reports a malformed override itself
        key = override.partition("=")[0].lstrip("+~")
    key = key.split("@")[0]
    return key if full else key.split("/")[0].split(".")[0]


def check_eval_overrides(overrides) -> None:
    """Refuse, in one line, an override of something the checkpoint fixes (model, task, optimizer...)."""
    own = eval_keys()
    for override in overrides:
        if override_key(override) not in own:
            raise UserError(f"eval.py does not take {override}: the checkpoint fixes the model, task and training "
                            f"settings; eval.py accepts {', '.join(own)} (e.g. batch_size=64, trainer=gpu; "
                            f"python eval.py --help)")


def stored_run_config(stored: dict, cfg: DictConfig, rebase_data: bool = False) -> DictConfig:
    """The checkpoint's run config with eval.py's own settings: its trainer, logger, paths and seed,
    the evaluation's batch size, workers and test samplings where given, the objective's evaluation
    modes (e.g. ``dynamic_eval``) where given, and, with ``rebase_data``
    (``paths.data_dir=`` given to eval.py), the data files moved from the training run's data_dir
    to this one (a checkpoint from another machine); otherwise the data is read where it was trained."""
    run_cfg = OmegaConf.create({key: value for key, value in stored.items() if key not in EVAL_OWN_KEYS})
    for key in EVAL_OWN_KEYS:
        if key in cfg:
            run_cfg[key] = cfg[key]
    datamodule = run_cfg.task.datamodule
    trained_data = str((stored.get("paths") or {}).get("data_dir") or "")
    data_dir = OmegaConf.select(cfg, "paths.data_dir", default=None)
    if rebase_data and trained_data and data_dir and str(data_dir) != trained_data:
        for key, value in datamodule.items():
            if isinstance(value, str) and (value == trained_data or value.startswith(trained_data.rstrip("/") + "/")):
                datamodule[key] = str(data_dir) + value[len(trained_data.rstrip("/")):]
    settings = {setting: (datamodule, setting) for setting in DATA_SETTINGS}
    if "test_batch_size" in datamodule:
        settings["batch_size"] = (datamodule, "test_batch_size")
    objective = objective_node(run_cfg)
    own = {"ckpt_path", "hydra", *EVAL_OWN_KEYS, *DATA_SETTINGS}
    settings.update({setting: (objective, setting) for setting in cfg if setting not in own})
    for setting, (node, key) in settings.items():
        value = cfg.get(setting)
        if value is None:
            continue
        if node is None or key not in node:
            where = "task" if node is datamodule else "objective"
            typed = str(value).lower() if isinstance(value, bool) else value  # as typed: dynamic_eval=true
            raise UserError(f"{setting}={typed}: this checkpoint's {where} ({(node or {}).get('_target_')}) has no "
                            f"{key}; leave {setting} out")
        node[key] = value
    return run_cfg


def evaluate(cfg: DictConfig) -> dict:
    """Rebuild the run stored in ``cfg.ckpt_path``, test it, and write results.json into eval.py's own
    run directory (never into the training run's); return the test metrics."""
    started = time.time()
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    check_eval_overrides(overrides)
    route_lightning_logs()
    requested = OmegaConf.select(cfg, "ckpt_path", throw_on_missing=False, default=None)
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        requested = None
    ckpt_path = evaluation_checkpoint(requested)
    stored = load_our_checkpoint(ckpt_path)["hyper_parameters"]["run_config"]  # checked by the allowlist
    run_cfg = stored_run_config(stored, cfg, rebase_data=any(override_key(o, full=True) == "paths.data_dir"
                                                             for o in overrides))
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
    # Checkpoints from before the driver stored its config choices: the training run's results.json has them.
    choices = stored.get("choices") or read_results(checkpoint_run_dir(ckpt_path))
    output_dir = Path(run_cfg.paths.output_dir)
    record = {"status": "finished", "checkpoint": str(ckpt_path), "task": choices.get("task"),
              "model": choices.get("model"), "experiment": choices.get("experiment"),
              "training_run": str(checkpoint_run_dir(ckpt_path)), "overrides": overrides, **metrics,
              "params": count_parameters(objective),
              "seconds": round(time.time() - started, 2), "output_dir": str(output_dir.resolve())}
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_record(output_dir, record)
        print("test metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())), flush=True)
        print(f"results written to {output_dir / 'results.json'}", flush=True)
    return metrics
