"""TensorBoard diagnostics of memory through time, for any recurrent network (off by default).

Turn on with ``python train.py 'callbacks=[default,diagnostics]'`` (conf/callbacks/diagnostics.yaml).
Every ``every_n_steps`` training steps it logs

- ``grad_norm/<group>``: the L2 norm of the gradient of each recurrent layer's parameters (and of
  the other top-level modules: input projection, head);
- ``grad_h/<layer>/first_over_last``: g_1 / g_T, where g_t = ||dL/dx_t|| is the gradient reaching
  step t of the sequence that enters the layer; the vanishing (<< 1) or exploding (>> 1) gradient
  picture in one number; and the image ``grad_h/norm_vs_t`` of g_t against t for every layer (log);
- histograms ``u/<layer>`` (IndRNN recurrent weights), ``alpha/<layer>`` (leaky units' rates);

and after every validation, for the first sequence of the first validation batch (a fixed sequence):

- the image ``activity/<layer>``: hidden units (rows, at most ``max_units``) against time (columns);
- histograms ``clockwork/<layer>/period_<T_i>`` of each Clockwork module's activations.

Why the layer's input and not its output: a hook on the output tensor sees only the gradient that
comes from above at each step (for the top layer with a last-step readout, zero everywhere but T);
the gradient that flows back through the layer's own recurrence stays inside the layer (or inside a
fused kernel). The input gradient dL/dx_t = J_t^T dL/dh_t carries the total dL/dh_t of the layer
(for IndRNN: W^T (dL/dh_t * relu'(.))), so g_t against t is the memory picture of that layer,
whatever its implementation. In a diagnostic step the input of every layer is made a leaf that
requires grad (a detached copy, so nothing else changes) and a tensor hook reads its gradient.
"""
from __future__ import annotations

import io
import logging

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from src.checks import check_positive_int

log = logging.getLogger(__name__)


def recurrent_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost recurrent layers of ``model`` by name: modules with ``hidden_size`` and
    ``batch_first`` (every layer of src.layers, torch's RNN/LSTM/GRU, the bidirectional wrapper)."""
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if hasattr(module, "hidden_size") and hasattr(module, "batch_first"):
            if not any(name.startswith(outer + ".") for outer in layers):
                layers[name] = module
    return layers


def _parameter_group(name: str, layer_names: list[str]) -> str:
    for layer in layer_names:
        if name.startswith(layer + "."):
            return layer
    parts = name.split(".")
    return ".".join(parts[:-1]) or parts[0]  # e.g. head.weight -> head


def _batch_major(output: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """A layer's output as (B, T, H)."""
    if output.dim() == 2:  # unbatched (T, H)
        return output.unsqueeze(0)
    return output if layer.batch_first else output.transpose(0, 1)


def figure_to_array(figure) -> "numpy.ndarray":  # noqa: F821
    """A matplotlib figure as an (H, W, 3) uint8 array for SummaryWriter.add_image."""
    import matplotlib.image
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    buffer.seek(0)
    image = matplotlib.image.imread(buffer, format="png")[..., :3]
    return (image * 255).astype("uint8")


class RecurrentDiagnostics(pl.Callback):
    """Gradient norms, dL/dh_t against t, parameter histograms and hidden activity in TensorBoard.

    Args:
        every_n_steps: training steps between two diagnostic steps (positive).
        max_units: hidden units shown in the activity images (the first ones of each layer).
    """

    def __init__(self, every_n_steps: int = 100, max_units: int = 64) -> None:
        super().__init__()
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.max_units = check_positive_int("max_units", max_units)
        self._layers: dict[str, nn.Module] = {}
        self._handles: list = []
        self._mode: str | None = None  # "grad" during a diagnostic training step, "activity" in validation
        self._grad_norms: dict[str, torch.Tensor] = {}  # layer -> (T,) ||dL/dh_t||
        self._activity: dict[str, torch.Tensor] = {}  # layer -> (T, H) of the fixed validation sequence
        self._warned = False

    # ---- set-up ---------------------------------------------------------------------------------
    def _writer(self, trainer: pl.Trainer):
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        if not self._warned:
            log.warning("diagnostics: no TensorBoard logger (logger=tensorboard or logger=many): nothing is logged")
            self._warned = True
        return None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = recurrent_layers(pl_module)
        if not self._layers:
            log.warning("diagnostics: no recurrent layer found in %s", type(pl_module).__name__)
        for name, layer in self._layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._input_hook(name)))
            self._handles.append(layer.register_forward_hook(self._output_hook(name)))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _input_hook(self, name: str):
        def hook(module: nn.Module, args):
            if self._mode != "grad" or not module.training or not args or not isinstance(args[0], torch.Tensor):
                return None
            sequence = args[0]
            if not sequence.requires_grad:  # raw data entering the first layer: a leaf with a gradient
                sequence = sequence.detach().requires_grad_(True)
            sequence.register_hook(self._gradient_hook(name, module))
            return (sequence, *args[1:])

        return hook

    def _output_hook(self, name: str):
        def hook(module: nn.Module, inputs, outputs) -> None:
            if self._mode == "activity":
                output = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
                if isinstance(output, torch.Tensor):
                    self._activity[name] = _batch_major(output.detach(), module)[0].float().cpu()

        return hook

    def _gradient_hook(self, name: str, layer: nn.Module):
        def hook(grad: torch.Tensor) -> None:
            per_step = _batch_major(grad.detach(), layer).float().pow(2).sum(dim=(0, 2)).sqrt().cpu()  # (T,)
            # A layer called twice in a step (e.g. a decoder) adds up its gradients.
            previous = self._grad_norms.get(name)
            self._grad_norms[name] = per_step if previous is None or previous.shape != per_step.shape \
                else (previous.pow(2) + per_step.pow(2)).sqrt()

        return hook

    # ---- training: gradients ------------------------------------------------------------------
    def _diagnostic_step(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._mode = "grad" if self._diagnostic_step(trainer) else None
        self._grad_norms.clear()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self._mode != "grad":
            return
        self._mode = None
        writer = self._writer(trainer) if trainer.is_global_zero else None
        if writer is None:
            return
        step = trainer.global_step
        groups: dict[str, float] = {}
        for name, parameter in pl_module.named_parameters():
            if parameter.grad is not None:
                group = _parameter_group(name, list(self._layers))
                groups[group] = groups.get(group, 0.0) + float(parameter.grad.detach().float().pow(2).sum())
        for group, squared in groups.items():
            writer.add_scalar(f"grad_norm/{group}", squared ** 0.5, step)
        for name, norms in self._grad_norms.items():
            if norms.numel() > 1 and float(norms[-1]) > 0:
                writer.add_scalar(f"grad_h/{name}/first_over_last", float(norms[0] / norms[-1]), step)
        if self._grad_norms:
            writer.add_image("grad_h/norm_vs_t", self._plot_gradient_norms(step), step, dataformats="HWC")
        self._log_parameter_histograms(writer, pl_module, step)

    def _plot_gradient_norms(self, step: int):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 3.5))
        for name, norms in self._grad_norms.items():
            axes.plot(range(1, norms.numel() + 1), norms.clamp_min(1e-30).numpy(), label=name, linewidth=1)
        axes.set_yscale("log")
        axes.set_xlabel("t")
        axes.set_ylabel("||dL/dx_t|| entering the layer")
        axes.set_title(f"gradient through time, step {step}")
        axes.legend(fontsize=6)
        figure.tight_layout()
        return figure_to_array(figure)

    def _log_parameter_histograms(self, writer, pl_module: pl.LightningModule, step: int) -> None:
        for name, layer in self._layers.items():
            for sub_name, module in layer.named_modules():
                full = f"{name}.{sub_name}" if sub_name else name
                if type(module).__name__ == "IndRNNRecurrence":
                    writer.add_histogram(f"u/{full}", module.weight_hh.detach().float().cpu(), step)
                alpha = getattr(module, "alpha", None)
                if isinstance(alpha, torch.Tensor):
                    writer.add_histogram(f"alpha/{full}", alpha.detach().float().cpu(), step)

    # ---- validation: activity of a fixed sequence ---------------------------------------------
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        first = batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking
        self._mode = "activity" if first else None
        if first:
            self._activity.clear()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._mode = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = self._writer(trainer) if trainer.is_global_zero and self._activity else None
        if writer is None:
            return
        step = trainer.global_step
        for name, activity in self._activity.items():  # (T, H)
            writer.add_image(f"activity/{name}", self._plot_activity(name, activity, step), step, dataformats="HWC")
            layer = self._layers[name]
            periods, module_size = getattr(layer, "periods", None), getattr(layer, "module_size", None)
            if periods and module_size:
                for index, period in enumerate(periods):
                    block = activity[:, index * module_size:(index + 1) * module_size]
                    writer.add_histogram(f"clockwork/{name}/period_{period}", block, step)
        self._activity.clear()

    def _plot_activity(self, name: str, activity: torch.Tensor, step: int):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown = activity[:, : self.max_units].T.numpy()  # (units, T)
        figure, axes = plt.subplots(figsize=(7, 3.5))
        limit = float(abs(shown).max()) or 1.0
        image = axes.imshow(shown, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-limit, vmax=limit)
        figure.colorbar(image, ax=axes)
        axes.set_xlabel("t")
        axes.set_ylabel("unit")
        axes.set_title(f"{name}: hidden activity, first validation sequence, step {step}")
        figure.tight_layout()
        return figure_to_array(figure)
