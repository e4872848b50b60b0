"""Building a run's pieces from a composed config: datamodule, network, objective, callbacks, loggers,
trainer. Every failure to build is a one-line :class:`UserError` naming the config group."""
from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.accelerators import CPUAccelerator

from lightning_modules.run.errors import UserError, one_line, optimizer_error
from lightning_modules.run.host_memory import keep_freed_memory
from lightning_modules.run.process_group import ProcessGroupShutdown


def instantiate_node(node, group: str, **kwargs):
    """Instantiate ``node`` (calling it with ``kwargs`` if it is a ``_partial_``); a failure becomes a
    UserError naming the config group."""
    try:
        if node.get("_partial_", False):  # Hydra keeps returning a partial even when given kwargs
            return instantiate(node)(**kwargs) if kwargs else instantiate(node)
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        raise UserError(f"{group}: {one_line(err.__cause__ or err)}") from err
    except (ValueError, TypeError, OmegaConfBaseException) as err:
        raise UserError(f"{group}: {one_line(err)}") from err


def choice(group: str) -> str | None:
    """The config file chosen for ``group`` (e.g. "indrnn" for model), or None outside a Hydra run."""
    if HydraConfig.initialized():
        value = HydraConfig.get().runtime.choices.get(group)
        return None if value in (None, "null") else str(value)
    return None


def objective_node(cfg: DictConfig):
    """The objective's config: the ``objective`` group (each task's defaults list chooses one)."""
    node = cfg.get("objective")
    if node is None:
        raise UserError("no objective: the task's defaults list must choose one (e.g. `- /objective: regression`)")
    return node


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    return instantiate_node(cfg.task.datamodule, "task.datamodule")


def build_network(cfg: DictConfig) -> torch.nn.Module:
    """The model config as one network; a task with a ``network`` wrapper (e.g. the encoder-decoder)
    receives the model as a factory and builds its own networks from it."""
    wrapper = cfg.task.get("network")
    if not wrapper:
        return instantiate_node(cfg.model, "model")
    model_factory = instantiate_node(cfg.model, "model", _partial_=True)
    return instantiate_node(wrapper, "task.network", model=model_factory)


def build_objective(cfg: DictConfig, network: torch.nn.Module, run_config: dict) -> pl.LightningModule:
    """The task's objective around ``network``; its optimizer and scheduler are built once here so
    that a bad optimizer value fails before training, as one line naming the key."""
    optimizer = instantiate_node(cfg.optimizer, "optimizer")
    scheduler = instantiate_node(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None
    objective = instantiate_node(objective_node(cfg), "objective", net=network, optimizer=optimizer,
                                 scheduler=scheduler, run_config=run_config)
    try:
        objective.configure_optimizers()
    except (ValueError, TypeError, KeyError) as err:
        raise optimizer_error(err) from err
    return objective


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    return [instantiate_node(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items()
            if node is not None and "_target_" in node]


def build_loggers(cfg: DictConfig, purge_step: int | None = None) -> list:
    """The configured loggers; TensorBoard ones hide events at and after ``purge_step`` (a resume
    continues the curve from its checkpoint's step instead of drawing the lost steps twice)."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None or "_target_" not in node:
            continue
        extra = {"purge_step": purge_step} if purge_step is not None and "TensorBoard" in str(node._target_) else {}
        loggers.append(instantiate_node(node, f"logger.{name}", **extra))
    return loggers


# Keys of the trainer group that are process settings, not Trainer arguments: build_trainer applies them.
PROCESS_SETTINGS = ("float32_matmul_precision", "keep_freed_memory")


def split_process_settings(trainer_cfg: DictConfig) -> tuple[DictConfig, dict]:
    """(the Trainer's arguments, the process settings among PROCESS_SETTINGS) of the trainer group."""
    present = [key for key in PROCESS_SETTINGS if key in trainer_cfg]
    if not present:
        return trainer_cfg, {}
    resolved = OmegaConf.to_container(trainer_cfg, resolve=True)  # resolved here: a copy loses the root
    settings = {key: resolved.pop(key) for key in present}
    return OmegaConf.create(resolved), settings


def build_trainer(cfg: DictConfig, loggers: list, callbacks: list[pl.Callback]) -> pl.Trainer:
    """The configured Trainer with ``callbacks`` and a :class:`ProcessGroupShutdown` (every Trainer: a
    distributed run's processes must end their process group before Python shuts down).

    It applies the trainer group's process settings: torch's float32 matmul precision, and, for a
    Trainer on the CPU, glibc keeping freed host memory for reuse (:mod:`lightning_modules.run.host_memory`;
    a GPU run's large tensors live on the device)."""
    trainer_cfg, settings = split_process_settings(cfg.trainer)
    if settings.get("float32_matmul_precision") is not None:
        torch.set_float32_matmul_precision(str(settings["float32_matmul_precision"]))
    trainer = instantiate_node(trainer_cfg, "trainer", logger=loggers or False,
                               callbacks=[*callbacks, ProcessGroupShutdown()])
    if settings.get("keep_freed_memory") and isinstance(trainer.accelerator, CPUAccelerator):
        keep_freed_memory()
    return trainer


def plain_config(cfg: DictConfig) -> dict:
    """The resolved config (no hydra node) as plain Python types, plus the chosen config names, for
    checkpoints (``weights_only`` loading needs plain types) and eval.py."""
    plain = {key: value for key, value in OmegaConf.to_container(cfg, resolve=True).items() if key != "hydra"}
    plain["choices"] = {group: choice(group) for group in ("task", "model", "experiment")}
    return plain


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule]:
    """(datamodule, objective) from a composed config: what train.py fits, for tests and notebooks."""
    return build_datamodule(cfg), build_objective(cfg, build_network(cfg), plain_config(cfg))


CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_config(overrides: list[str], output_dir: str | os.PathLike, config_name: str = "train") -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` as train.py would, Hydra's runtime set up,
    writing into ``output_dir`` (for tests, benchmarks and notebooks; resolvers must be registered)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig().set_config(cfg)
    output_dir = Path(output_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir.parent)
        del cfg.hydra
    return cfg


def count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


__all__ = ["CONFIG_DIR", "PROCESS_SETTINGS", "build", "build_callbacks", "build_datamodule",
           "build_loggers", "build_network", "build_objective", "build_trainer", "choice", "compose_config",
           "count_parameters", "instantiate_node", "objective_node", "plain_config", "split_process_settings"]
