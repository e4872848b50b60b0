"""The Lightning callback that turns CUDA-graph training steps on for a fit (``trainer=gpu``)."""
from __future__ import annotations

import logging

import pytorch_lightning as pl

from lightning_modules.cuda_graph.forward import GraphedForward
from lightning_modules.cuda_graph.optimizer import OptimizerStepGraph

log = logging.getLogger(__name__)


def scaler_refusal(trainer: pl.Trainer | None) -> str | None:
    """Why the optimizer step stays eager under ``trainer``'s precision plugin (one line), or None."""
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    if getattr(plugin, "scaler", None) is not None:
        return ("precision 16-mixed scales the loss with a GradScaler, which skips steps on overflow "
                "(a host decision)")
    return None


class CudaGraphs(pl.Callback):
    """For the fit, on CUDA: :class:`GraphedForward` on ``pl_module.net`` (``forward``) and
    :class:`OptimizerStepGraph` on each of ``trainer.optimizers`` (``optimizer_step``); both are
    removed when the fit ends or fails. On another device it logs one line and changes nothing."""

    def __init__(self, forward: bool = True, optimizer_step: bool = True) -> None:
        self.forward, self.optimizer_step = forward, optimizer_step
        self.graphed: GraphedForward | None = None
        self.steps: list[OptimizerStepGraph] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type != "cuda":
            log.info(f"CUDA graphs: off (the model is on {pl_module.device}, not CUDA)")
            return
        # A second CudaGraphs (e.g. trainer=gpu plus one added by hand) leaves the first one's in place.
        if self.forward and not isinstance(pl_module.net.__dict__.get("forward"), GraphedForward):
            self.graphed = GraphedForward(pl_module.net).install()
        if self.optimizer_step:
            refusal = scaler_refusal(trainer)
            if refusal:
                log.info(f"CUDA graphs: eager optimizer steps: {refusal}")
            else:
                self.steps = [OptimizerStepGraph(optimizer).install() for optimizer in trainer.optimizers
                              if not hasattr(optimizer.__dict__.get("step"), "graph_of")]

    def _remove(self) -> None:
        if self.graphed is not None:
            self.graphed.uninstall()
            self.graphed = None
        for step in self.steps:
            step.uninstall()
        self.steps = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove()
