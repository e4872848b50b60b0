"""The logic behind train.py and eval.py: build a run from a composed config, fit, test, report."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import ModelCheckpoint

from datamodules.download import DownloadError
from lightning_modules.base import NonFiniteLossError
from lightning_modules.results import log_hparams, write_results

log = logging.getLogger(__name__)


# `${add:${task.seq_len},20}` in configs: Hydra/OmegaConf have no arithmetic of their own.
OmegaConf.register_new_resolver("add", lambda *terms: sum(terms), replace=True)


class UserError(Exception):
    """A problem with the user's config or data, reported as one line without a traceback."""


def _instantiate(node, group: str, **kwargs):
    """Instantiate ``node`` (calling it with ``kwargs`` if it is a ``_partial_``); turn a failure
    into a UserError naming the config group."""
    try:
        if node.get("_partial_", False):  # Hydra keeps returning a partial even when given kwargs
            return instantiate(node)(**kwargs) if kwargs else instantiate(node)
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise UserError(f"{group}: {cause}") from err
    except (ValueError, OmegaConfBaseException) as err:
        raise UserError(f"{group}: {err}") from err


def build(cfg: DictConfig):
    """Instantiate (datamodule, objective) from a composed config; the objective checks the network."""
    datamodule = _instantiate(cfg.task.datamodule, "task")
    network = build_network(cfg)
    optimizer = _instantiate(cfg.optimizer, "optimizer")
    scheduler = _instantiate(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None
    plain_config = {key: value for key, value in OmegaConf.to_container(cfg, resolve=True).items() if key != "hydra"}
    objective = _instantiate(cfg.objective, "objective", net=network, optimizer=optimizer,
                             scheduler=scheduler, run_config=plain_config)
    return datamodule, objective


def build_network(cfg: DictConfig):
    """The model config as one network, or, for tasks with ``task.encoder_decoder``, as two.

    An encoder-decoder task gets two separate networks of the chosen model: an encoder reading token
    embeddings and summarising them (``task.readout``) into a context vector, and a decoder
    predicting every output step from [previous token's embedding, context]. The decoder is always
    built unidirectional: teacher forcing would let a backward-in-time layer read the answer.
    """
    seq2seq = cfg.task.get("encoder_decoder")
    if not seq2seq:
        return _instantiate(cfg.model, "model")
    embedding_size, context_size = seq2seq.embedding_size, seq2seq.context_size
    encoder = _instantiate(cfg.model, "model", input_size=embedding_size, output_size=context_size)
    causal = {"bidirectional": False} if "bidirectional" in cfg.model else {}
    if "bidirectional" in cfg.model.get("layer", {}):
        causal["layer"] = {"bidirectional": False}
    decoder = _instantiate(cfg.model, "model", input_size=embedding_size + context_size,
                           output_size=cfg.task.output_size, readout="all", **causal)
    return _instantiate(seq2seq, "task.encoder_decoder", encoder=encoder, decoder=decoder)


def _instantiate_dict(node, group: str) -> list:
    return [_instantiate(item, group) for item in (node or {}).values() if item is not None and "_target_" in item]


def _choice(group: str) -> str:
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get(group))
    return group


def _run_summary(cfg: DictConfig) -> dict:
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    return {
        "task": _choice("task"),
        "model": _choice("model"),
        "overrides": list(hydra.overrides.task) if hydra else [],
        "output_dir": str(cfg.paths.output_dir),
    }


def _is_multirun() -> bool:
    return HydraConfig.initialized() and getattr(HydraConfig.get().mode, "name", None) == "MULTIRUN"


def route_lightning_logs() -> None:
    """Send Lightning's messages through the root handlers that Hydra set up (console and train.log).

    Lightning installs its own console handler at import when the root logger has none yet (always
    the case before Hydra starts), which would print every message twice and keep it out of train.log.
    """
    for name in ("pytorch_lightning", "lightning_fabric"):
        lightning_logger = logging.getLogger(name)
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)
        lightning_logger.propagate = True


def train(cfg: DictConfig) -> float | None:
    """Fit, test the best checkpoint, write results.json; return the best monitored value."""
    start = time.time()
    route_lightning_logs()
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, objective = build(cfg)
    loggers = _instantiate_dict(cfg.get("logger"), "logger")
    callbacks = _instantiate_dict(cfg.get("callbacks"), "callbacks")
    trainer = _instantiate(cfg.trainer, "trainer", logger=loggers or False, callbacks=callbacks)
    monitor = cfg.task.monitor
    results = {"status": "running", **_run_summary(cfg), "monitor": monitor,
               "params": sum(p.numel() for p in objective.parameters())}
    output_dir = Path(cfg.paths.output_dir)
    try:
        trainer.fit(objective, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except DownloadError as err:  # missing or corrupt data: one line naming the files and the folder
        raise UserError(str(err)) from err
    except NonFiniteLossError as err:
        checkpoint = _checkpoint_callback(trainer)
        results.update(status="diverged", error=str(err), seconds=round(time.time() - start, 2),
                       steps=trainer.global_step, last_checkpoint=_existing(checkpoint, "last_model_path"),
                       best_checkpoint=_existing(checkpoint, "best_model_path"))
        write_results(output_dir, results)
        message = f"{err} (results.json and the last good checkpoint are in {output_dir})"
        if _is_multirun():  # one diverged job must not end the whole sweep
            log.error(message)
            return math.nan
        raise UserError(message) from err
    best_checkpoint = _existing(_checkpoint_callback(trainer), "best_model_path")
    results.update(_fit_metrics(trainer), status="fitted", steps=trainer.global_step, epochs=trainer.current_epoch,
                   best_checkpoint=best_checkpoint, seconds=round(time.time() - start, 2))
    if trainer.is_global_zero:  # a crash while testing must not lose the fit's results
        write_results(output_dir, results)
    if cfg.get("test", True):
        # Without a best checkpoint (e.g. fast_dev_run) the current weights are tested.
        tested = trainer.test(objective, datamodule=datamodule, ckpt_path=best_checkpoint, verbose=False)
        results.update({key: float(value) for key, value in (tested[0] if tested else {}).items()})
    results.update(status="finished", seconds=round(time.time() - start, 2))
    if trainer.is_global_zero:
        write_results(output_dir, results)
        log_hparams(loggers, cfg, results)
        _print_summary(output_dir, results)
    best = results.get(f"{monitor}_best", results.get(monitor))
    return None if best is None else float(best)


def _fit_metrics(trainer: pl.Trainer) -> dict:
    return {key: float(value) for key, value in trainer.callback_metrics.items()
            if key.startswith("val/") and torch.as_tensor(value).numel() == 1}


def _checkpoint_callback(trainer: pl.Trainer) -> ModelCheckpoint | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)


def _existing(callback: ModelCheckpoint | None, attribute: str) -> str | None:
    path = getattr(callback, attribute, "") if callback is not None else ""
    return path if path and Path(path).exists() else None


def _print_summary(output_dir: Path, results: dict) -> None:
    metrics = {k: v for k, v in results.items() if k.startswith(("val/", "test/")) and isinstance(v, float)}
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
    print(f"run directory: {output_dir}\nfinal metrics: {shown} ({results['steps']} steps, {results['seconds']} s)",
          flush=True)


def evaluate(cfg: DictConfig) -> dict:
    """Rebuild the run stored in ``cfg.ckpt_path``, test it, write results.json; return test metrics."""
    start = time.time()
    route_lightning_logs()
    ckpt_path = Path(cfg.ckpt_path)
    if not ckpt_path.is_file():
        raise UserError(f"checkpoint not found: {ckpt_path} (pass ckpt_path=outputs/<run>/checkpoints/best.ckpt)")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        stored = checkpoint["hyper_parameters"]["run_config"]
    except Exception as err:  # corrupt file, foreign checkpoint, missing config: all one message
        raise UserError(f"cannot read a run config from checkpoint {ckpt_path}: {err}") from err
    # The run's own model, task and optimizer; this invocation's trainer, paths and logger.
    run_cfg = OmegaConf.merge(OmegaConf.create(stored), {k: cfg[k] for k in ("trainer", "paths", "logger", "seed")
                                                          if k in cfg})
    pl.seed_everything(run_cfg.seed, workers=True)
    datamodule, objective = build(run_cfg)
    loggers = _instantiate_dict(run_cfg.get("logger"), "logger")
    trainer = _instantiate(run_cfg.trainer, "trainer", logger=loggers or False, callbacks=[])
    try:
        tested = trainer.test(objective, datamodule=datamodule, ckpt_path=str(ckpt_path), verbose=False)
    except DownloadError as err:
        raise UserError(str(err)) from err
    metrics = {key: float(value) for key, value in tested[0].items()}
    results = {"status": "finished", "checkpoint": str(ckpt_path), "task": stored.get("task", {}).get("name"),
               **metrics, "params": sum(p.numel() for p in objective.parameters()),
               "seconds": round(time.time() - start, 2), "output_dir": str(run_cfg.paths.output_dir)}
    if trainer.is_global_zero:
        write_results(Path(run_cfg.paths.output_dir), results)
        print(f"test metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())), flush=True)
        print(f"results written to {Path(run_cfg.paths.output_dir) / 'results.json'}", flush=True)
    return metrics
