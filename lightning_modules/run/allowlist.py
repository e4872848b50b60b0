"""A checkpoint is data, never code: which ``_target_``s a config read from a checkpoint may name.

A checkpoint loads with ``weights_only=True``, but the run config stored in it
(``hyper_parameters.run_config``) names classes to build (Hydra ``_target_``s). Somebody else's
checkpoint could name ``builtins.open`` or ``os.system`` there, so before anything from a stored
config is instantiated, :func:`check_checkpoint_config` walks all of it and refuses, in one line and
before any call, everything that is not one of:

* a ``_target_`` named in the project's configs (``conf/**/*.yaml``, scanned at import, except the
  ``hydra`` settings, which are never stored in a checkpoint), written exactly as there; or
* a class of the project's packages (``src``, ``datamodules``, ``lightning_modules``) or of
  ``torch.nn`` / ``torch.optim`` that is a network, objective, DataModule, callback, optimizer or
  LR scheduler (so ``optimizer._target_=torch.optim.AdamW`` or a new layer of ``src/`` still
  evaluates). Such a path is resolved without importing anything outside those packages, one name at
  a time, and every step must stay inside them: ``src.layers.indrnn.torch.os.system`` stops at
  ``torch`` (a module outside ``src``), private names (``_x``, ``__globals__``) are refused.

Functions are allowed only by exact name (the project has helpers that write files, e.g. the NTU
converter; a checkpoint must not call them). A string holding an OmegaConf interpolation (``${...}``)
is refused: a stored config is resolved when it is saved, and resolvers can have side effects. (No
project class imports code by a name given in its arguments; one that does must be checked here.)
"""
from __future__ import annotations

import importlib
import re
import sys
from functools import lru_cache
from pathlib import Path

import yaml

from lightning_modules.run.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Packages whose modules may be imported and whose classes (of SAFE_BASES) may be named.
PROJECT_PACKAGES = ("src", "datamodules", "lightning_modules")
LIBRARY_PACKAGES = ("torch.nn", "torch.optim")
ALLOWED_PACKAGES = PROJECT_PACKAGES + LIBRARY_PACKAGES

_DOTTED = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*")


def _targets_in(node, path: tuple = ()) -> set[str]:
    """Every ``_target_`` string in a parsed YAML document, outside its ``hydra`` settings."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if path == () and key == "hydra":
                continue
            if key == "_target_" and isinstance(value, str):
                found.add(value)
            else:
                found |= _targets_in(value, path + (key,))
    elif isinstance(node, list):
        for value in node:
            found |= _targets_in(value, path + ("[]",))
    return found


@lru_cache(maxsize=None)
def config_targets(conf_dir: Path = CONF_DIR) -> frozenset[str]:
    """The ``_target_``s the project's configs name (``conf/hydra/`` and ``hydra:`` keys left out)."""
    targets: set[str] = set()
    for path in sorted(conf_dir.rglob("*.yaml")):
        if path.relative_to(conf_dir).parts[0] == "hydra":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            targets |= _targets_in(document)
    return frozenset(targets)


def _safe_bases() -> tuple[type, ...]:
    import pytorch_lightning as pl
    import torch

    return (torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler,
            torch.optim.lr_scheduler.ReduceLROnPlateau, pl.LightningModule, pl.LightningDataModule, pl.Callback)


def _inside(module_name: str, packages: tuple[str, ...] = ALLOWED_PACKAGES) -> bool:
    return any(module_name == package or module_name.startswith(package + ".") for package in packages)


def _resolve_class(target: str):
    """The class ``target`` names, or the reason it may not be named. Imports only modules inside
    :data:`ALLOWED_PACKAGES`; every attribute step must stay inside them."""
    if not _DOTTED.fullmatch(target):
        return None, "not a dotted name of public attributes"
    parts = target.split(".")
    if not _inside(parts[0] if parts[0] != "torch" else ".".join(parts[:2])):
        return None, "outside the project's packages and torch.nn/torch.optim"
    obj, index = None, len(parts)
    while index > 0:  # the longest importable module prefix that lies inside the allowed packages
        name = ".".join(parts[:index])
        if _inside(name):
            try:
                obj = importlib.import_module(name)
                break
            except ImportError:
                pass
        index -= 1
    if obj is None:
        return None, "no module of the allowed packages"
    for part in parts[index:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return None, f"{part!r} does not exist there"
        owner = obj.__name__ if isinstance(obj, type(sys)) else getattr(obj, "__module__", None)
        if not isinstance(owner, str) or not _inside(owner):
            return None, f"{part!r} leads out of the allowed packages (to {owner or type(obj).__name__})"
    if not isinstance(obj, type) or not issubclass(obj, _safe_bases()):
        return None, "not a network, objective, DataModule, callback, optimizer or scheduler class"
    return obj, None


def refusal(target) -> str | None:
    """Why a stored config may not name ``target``, or None if it may."""
    if not isinstance(target, str):
        return f"a _target_ must be a dotted name, got {type(target).__name__}"
    return _refusal(target)


@lru_cache(maxsize=None)
def _refusal(target: str) -> str | None:
    if target in config_targets():
        return None
    _, reason = _resolve_class(target)
    return reason


def _walk(node, where: str):
    """(key path, refusal) of the first thing in ``node`` that a checkpoint may not hold, or None."""
    if isinstance(node, dict):
        if "_target_" in node:
            target = node["_target_"]
            reason = refusal(target)
            if reason:
                return f"{where}._target_={target}" if where else f"_target_={target}", reason
        for key, value in node.items():
            if not isinstance(key, str):
                return f"{where}[{key!r}]", "keys must be strings"
            found = _walk(value, f"{where}.{key}" if where else key)
            if found:
                return found
    elif isinstance(node, (list, tuple)):
        for position, value in enumerate(node):
            found = _walk(value, f"{where}[{position}]")
            if found:
                return found
    elif isinstance(node, str) and "${" in node:
        return f"{where}={node}", "an interpolation (a stored config is resolved when saved; resolvers run code)"
    elif node is not None and not isinstance(node, (bool, int, float, str)):
        return f"{where}", f"a {type(node).__name__}, not plain data"
    return None


def check_checkpoint_config(run_config, source: str = "the checkpoint") -> None:
    """Refuse (one-line UserError) a stored run config that names anything but the project's own
    building blocks (see the module docstring), before anything in it is called."""
    found = _walk(run_config, "")
    if found:
        where, reason = found
        raise UserError(f"{source}: its stored config names code this project does not run from a checkpoint: "
                        f"{where} ({reason}); only the _target_s of conf/ and the project's own classes are "
                        f"built from a checkpoint (a checkpoint is data)")


__all__ = ["ALLOWED_PACKAGES", "check_checkpoint_config", "config_targets", "refusal"]
