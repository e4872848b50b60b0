"""What every objective shares: the batch contract (:class:`src.batch.SequenceBatch`, padded steps
left out), the check that a network suits the objective (its readout, no bidirectional layer on a
causal task), optimizer and scheduler from config, parameter constraints after each optimizer step,
a stop on non-finite losses, and per-stage metrics (the best validation is kept by one callback,
:class:`lightning_modules.callbacks.BestValidation`)."""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import Precision
from torch import nn
from torchmetrics import MeanMetric, Metric

from lightning_modules.callbacks import BestValidation, best_validation_of
from lightning_modules.learning import BPTT, LearningRule
from lightning_modules.nonfinite import NonFiniteLossCheck, attached_trainer
from src.batch import SequenceBatch, as_batch, average_samplings, step_mask
from src.checks import check_choice

STAGES = ("train", "val", "test")
# Values that nn.Module.__setattr__ can only store as plain attributes (never a parameter, module or buffer).
PLAIN_VALUE_TYPES = (str, int, float, bool, type(None))
# Devices to which a tensor is copied synchronously (Lightning's own rule for batches).
BLOCKING_DEVICE_TYPES = ("cpu", "mps")
# Lightning warns whenever a LightningModule overrides a batch-transfer hook while a DataModule is passed,
# even when the DataModule does not override it (then the module's hook is the one used, as wanted here):
# this module's transfer_batch_to_device, CarriedState's on_before_batch_transfer.
warnings.filterwarnings("ignore", message="You have overridden `(transfer_batch_to_device|on_before_batch_transfer)` "
                                          "in `LightningModule`")


@torch.no_grad()
def clip_gradient_norm_(parameters: list[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_(parameters, max_norm)``: every gradient scaled by
    min(max_norm / (total 2-norm + 1e-6), 1), the same operations in the same order (bitwise equal),
    without its grouping of the gradients by device and dtype, which costs more than the arithmetic
    for a small network on CPU. Gradients on several devices or dtypes, or sparse, go to torch's."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    first = grads[0]
    if any(g.device != first.device or g.dtype != first.dtype or g.is_sparse for g in grads):
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0)
    scale = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(scale)


def bidirectional_modules(net: nn.Module) -> list[str]:
    """Names of the modules of ``net`` that read the sequence backwards too (``bidirectional=True``)."""
    return [name or type(net).__name__ for name, module in net.named_modules()
            if getattr(module, "bidirectional", False) is True]


def check_causal(net: nn.Module, why: str) -> None:
    """One-line ValueError if ``net`` has a bidirectional layer, which would see the future."""
    found = bidirectional_modules(net)
    if found:
        raise ValueError(f"{why}, but a bidirectional model sees the future ({found[0]}): "
                         f"set model.bidirectional=false and model.layer.bidirectional=false")


class SequenceObjective(NonFiniteLossCheck, pl.LightningModule):
    """Base LightningModule wrapping any network with the ``net(inputs, lengths=...) -> (predictions, state)``
    contract (:class:`src.networks.SequenceNetwork`).

    Batches are :class:`src.batch.SequenceBatch` (a plain ``(inputs, targets)`` pair is accepted):
    inputs (B, T, I), targets (B, ...) and optional ``lengths`` (B,) of right-padded sequences, which
    the network's readout respects; per-step predictions (B, T, ...) are scored on the valid steps only
    (see :meth:`valid_steps`).

    Subclasses set ``metric_name`` (logged as ``{stage}/{metric_name}``), ``best_mode`` ("min" or
    "max": which way ``val/{metric_name}`` improves) and ``readouts`` (the network readouts the
    objective accepts; None: any), and implement :meth:`loss` and :meth:`make_metric`.

    Args:
        net: the network (e.g. :class:`src.networks.RecurrentNetwork`); checked by :meth:`check_network`.
        optimizer: ``optimizer(params=...)`` builds the optimizer (Hydra ``_partial_: true``).
        scheduler: ``scheduler(optimizer=...)`` builds an LR scheduler, or None. A plateau schedule is
            the callback :class:`~lightning_modules.callbacks.PlateauReloadBest` (``scheduler=plateau``),
            not torch's ReduceLROnPlateau, which is refused: one plateau mechanism, one "best".
        monitor: the task's monitored metric, e.g. "val/mse" (Lightning's scheduler config names it).
        scheduler_interval: step the scheduler every "epoch" or every optimizer "step".
        decay_1d_params: apply the optimizer's weight decay to 1-D parameters too. Off by default:
            IndRNN's u, biases and batch-norm weights are excluded, as in the IndRNN papers.
        decay_exempt_names: instead of the 1-D rule, exempt exactly the parameters whose name contains
            one of these strings; the official IndRNN code's rule is ``["weight_hh", "bias"]`` (u and
            biases exempt, batch-norm scales decayed). None: the 1-D rule above.
        causal: the task predicts each step from the past only (``task.causal``): a network with a
            bidirectional layer is rejected.
        run_config: the run's resolved config as plain Python types, saved in checkpoints so that
            eval.py can rebuild the run (plain types load under torch's ``weights_only``).
        learning_rule: how the network learns from a training batch (:mod:`lightning_modules.learning`);
            None: :class:`~lightning_modules.learning.BPTT`. It must be one of ``learning_rules``.
    """

    metric_name = "loss"
    best_mode = "min"
    readouts: tuple[str, ...] | None = None
    learning_rules: tuple[str, ...] = ("bptt", "rtrl")  # the rules (their ``name``) this objective supports

    def __init__(self, net: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., Any] | None = None, monitor: str = "val/loss",
                 scheduler_interval: str = "epoch", decay_1d_params: bool = False, causal: bool = False,
                 run_config: dict | None = None, decay_exempt_names: list[str] | None = None,
                 learning_rule: LearningRule | None = None) -> None:
        super().__init__()
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        self.check_network(net, causal)
        # Only plain values go into hparams; the logger gets them from the pipeline at the end.
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "learning_rule"], logger=False)
        self.net, self.optimizer_factory, self.scheduler_factory = net, optimizer, scheduler
        self.learning_rule = learning_rule if learning_rule is not None else BPTT()
        if self.learning_rule.name not in self.learning_rules:
            raise ValueError(f"learning={self.learning_rule.name}: {type(self).__name__} trains with "
                             f"{' or '.join(self.learning_rules)} only")
        self.learning_rule.attach(self)
        self.metrics = nn.ModuleDict({f"{stage}_metric": self.make_metric() for stage in STAGES})
        self.losses = nn.ModuleDict({f"{stage}_loss": MeanMetric() for stage in ("val", "test")})

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning writes its bookkeeping (the running hook's name, ~50 times a training step) as module
        # attributes, and nn.Module.__setattr__ first checks every value against parameters, modules and
        # buffers (~5 us each; ~0.2 ms a step on a tiny network). A plain value whose name is none of
        # those is stored directly, exactly where nn.Module would store it; anything else goes through it.
        fields = self.__dict__
        if (type(value) in PLAIN_VALUE_TYPES and "_buffers" in fields and name not in fields["_parameters"]
                and name not in fields["_modules"] and name not in fields["_buffers"]):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """A :class:`SequenceBatch` moved field by field (non-blocking to an accelerator, as Lightning's
        default); anything else by Lightning's default, whose generic walk over a collection costs more
        per step than moving a small batch."""
        if type(batch) is SequenceBatch:
            non_blocking = device.type not in BLOCKING_DEVICE_TYPES
            return SequenceBatch(*(field.to(device, non_blocking=non_blocking) if isinstance(field, torch.Tensor)
                                   else field for field in batch))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def check_network(self, net: nn.Module, causal: bool) -> None:
        """One-line ValueError unless ``net.readout`` is one of ``readouts`` and, on a causal task,
        ``net`` has no bidirectional layer. Subclasses with other needs extend it."""
        readout = getattr(net, "readout", None)
        if self.readouts is not None and readout is not None and readout not in self.readouts:
            raise ValueError(self.readout_error(readout))
        if causal:
            check_causal(net, "the task is causal (task.causal=true): it predicts each step from the past only")

    def readout_error(self, readout: str) -> str:
        """The message for a network whose readout is not one of ``readouts``."""
        allowed = " or ".join(repr(r) for r in self.readouts)
        return f"{type(self).__name__} needs task.readout {allowed}, got {readout!r}"

    def make_metric(self) -> Metric:
        raise NotImplementedError

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of predictions against targets (padded steps already left out)."""
        raise NotImplementedError

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """inputs (B, T, I), lengths (B,) or None -> predictions (B, O) or (B, T, O), per the network's
        readout ("last" reads step lengths - 1 of each sequence, "mean" the mean over its valid steps)."""
        if lengths is None:  # networks outside src.networks (e.g. in tests) need not know lengths
            return self.net(inputs)[0]
        return self.net(inputs, lengths=lengths)[0]

    @staticmethod
    def valid_steps(predictions: torch.Tensor, targets: torch.Tensor,
                    lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step predictions (B, T, O) and targets (B, T, ...) of right-padded sequences -> those of
        the valid steps only, (N, O) and (N, ...) with N = lengths.sum(); anything else unchanged
        (per-sequence predictions (B, O), or ``lengths`` None)."""
        if lengths is None or predictions.dim() < 3:
            return predictions, targets
        mask = step_mask(lengths.to(predictions.device), predictions.shape[1])
        return predictions[mask], targets[mask]

    def _step(self, batch, stage: str) -> torch.Tensor:
        batch = as_batch(batch)
        predictions = self(batch.inputs, batch.lengths)
        # Test-time samplings (batch.groups) become one prediction per example before loss and metric.
        predictions, targets, lengths = average_samplings(predictions, batch)
        batch_size = predictions.shape[0]  # examples, not samplings (B without groups)
        predictions, targets = self.valid_steps(predictions, targets, lengths)
        loss = self.loss(predictions, targets)
        metric = self.metrics[f"{stage}_metric"]
        if stage == "train":
            logging = self.logging_step()  # once per step: it reads the trainer's progress counters
            self.check_training_loss(loss, inputs=batch.inputs, targets=batch.targets, logging=logging)
            if logging:  # a per-step metric costs kernels (and syncs): only when it is written
                self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
                metric(predictions.detach(), targets)
                self.log(f"train/{self.metric_name}", metric, on_step=True, on_epoch=False, batch_size=batch_size)
            return loss
        if stage == "val":
            self.note_validation_batch(batch.inputs)
        metric(predictions.detach(), targets)
        self.log_loss(stage, loss, batch_size)
        self.log(f"{stage}/{self.metric_name}", metric, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return loss

    def logging_step(self) -> bool:
        """True when Lightning writes this training step's scalars to the loggers (every
        ``trainer.log_every_n_steps`` optimizer steps, when the run stops, in fast_dev_run); True outside
        a Trainer. Lightning's own rule, from its public progress counters: the batches of the k-th
        optimizer step (k counted from 0, ``accumulate_grad_batches`` batches each) log when
        (k + 1) is a multiple of ``log_every_n_steps``."""
        trainer = attached_trainer(self)
        if trainer is None or trainer.fast_dev_run:
            return True
        if not trainer.log_every_n_steps:
            return False
        batches = trainer.fit_loop.epoch_loop.batch_progress.total.ready  # this one included
        optimizer_steps_before = max(batches - 1, 0) // trainer.accumulate_grad_batches
        return (optimizer_steps_before + 1) % trainer.log_every_n_steps == 0 or trainer.should_stop

    def log_loss(self, stage: str, loss: torch.Tensor, batch_size: int) -> None:
        """``train/loss`` on logging steps (:meth:`logging_step`); ``val/loss`` and ``test/loss`` as the
        batch-size-weighted epoch mean."""
        if stage == "train":
            if self.logging_step():
                self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        else:
            self.losses[f"{stage}_loss"](loss, weight=batch_size)
            self.log(f"{stage}/loss", self.losses[f"{stage}_loss"], on_epoch=True, batch_size=batch_size)

    def on_validation_start(self) -> None:
        # A non-finite training loss since the last logging step must not reach a checkpoint.
        if not self.trainer.sanity_checking:
            self.raise_if_loss_was_nonfinite()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self.learning_rule.training_step(self, batch)

    # Lightning reads training_step's signature at every batch (to pass batch_idx or not); a stored one
    # saves inspect's work (~30 us a step).
    training_step.__signature__ = inspect.signature(training_step)

    def bptt_training_step(self, batch) -> torch.Tensor:
        """The training step by backpropagation through time (what :class:`BPTT` calls)."""
        return self._step(batch, "train")

    def on_train_epoch_end(self) -> None:
        self.learning_rule.on_train_epoch_end(self)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_callbacks(self) -> list[pl.Callback]:
        """A :class:`BestValidation` of ``val/{metric_name}`` (``best_mode``) when a fit's trainer has
        none, so that every training run has exactly one "best" (the run driver adds the task's own);
        none for validate/test (eval.py), which keep no best."""
        if self.trainer.state.fn != "fit" or best_validation_of(self.trainer) is not None:
            return []
        return [BestValidation(f"val/{self.metric_name}", self.best_mode)]

    @property
    def best_value(self) -> float | None:
        """The best validation value of the run's :class:`BestValidation` (None before one, or
        outside a Trainer)."""
        trainer = attached_trainer(self)
        best = best_validation_of(trainer) if trainer is not None else None
        return None if best is None else best.best_value

    def on_validation_epoch_end(self) -> None:
        loss = float(self.losses["val_loss"].compute()) if self.losses["val_loss"].update_count else 0.0
        nonfinite_counts, self._validation_nonfinite = getattr(self, "_validation_nonfinite", []), []
        if not math.isfinite(loss):
            # Non-finite gradients can poison the weights while the training loss still looked
            # finite; raising here stops the run before this validation's checkpoint is saved.
            raise self.validation_loss_error(loss, nonfinite_counts)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.apply_constraints()  # e.g. IndRNN's |u| <= u_bound, re-imposed after every update as in the paper

    def apply_constraints(self) -> None:
        """Re-impose every parameter constraint of the network (what every learning rule and evaluation
        mode calls after an update). The modules that have one are found once: walking the whole network
        at every step costs more than the clamps."""
        if not hasattr(self, "_constraints"):
            self._constraints = [m.constrain_parameters_ for m in self.net.modules() if hasattr(m, "constrain_parameters_")]
        with torch.no_grad():
            for constrain in self._constraints:
                constrain()

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """``trainer.gradient_clip_val`` by norm in 32-bit training: :func:`clip_gradient_norm_` over the
        optimizer's parameters, as Lightning's own clipping would (~0.1 ms a step less on CPU); by value,
        or under another precision plugin (mixed precision unscales first; sharded strategies clip
        their own way): Lightning's."""
        if (gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm"
                and type(self.trainer.precision_plugin) is Precision):
            clip_gradient_norm_([p for group in optimizer.param_groups for p in group["params"]], gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def parameter_groups(self) -> list[dict]:
        """Matrices get the optimizer's weight decay; 1-D parameters (u, biases, BN) none, unless asked
        (``decay_1d_params``), or, with ``decay_exempt_names``, all but the parameters so named."""
        names = self.hparams.get("decay_exempt_names")
        if names is not None:
            trainable = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
            exempt = [p for name, p in trainable if any(part in name for part in names)]
            decayed = [p for name, p in trainable if not any(part in name for part in names)]
            return [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]
        matrices = [p for p in self.parameters() if p.requires_grad and p.dim() > 1]
        vectors = [p for p in self.parameters() if p.requires_grad and p.dim() <= 1]
        if self.hparams.decay_1d_params:
            return [{"params": matrices + vectors}]
        return [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError("scheduler: torch's ReduceLROnPlateau is not used here; the plateau schedule is the "
                             "callback lightning_modules.callbacks.PlateauReloadBest: use scheduler=plateau "
                             "(or callbacks=official_indrnn)")
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.monitor,
                                 "interval": self.hparams.scheduler_interval}}

