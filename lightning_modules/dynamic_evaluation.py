"""Dynamic evaluation (Krause et al., 2018): the language model's evaluation mode that adapts to the
text it scores (``objective.dynamic_eval``; eval.py ``dynamic_eval=true dynamic_eval_lr=...``).

The test split is read as in the papers' protocol (test batch 1, the state carried, never reset). For
every window in order, its cross-entropy is counted with the current weights; then one gradient step
on that same loss moves the weights, pulled back towards the trained weights theta_0:
``theta <- theta - lr * g + decay * (theta_0 - theta)``. With ``rms`` the gradient is divided by the
root of its running mean square over the windows so far (the paper's RMS-normalised step). Dropout
and batch norm stay in evaluation mode.

The objective's test step runs it beside the static score (:meth:`DynamicEvaluation.score`): the
adapted weights are kept here and swapped into the model's parameters for their window only, so the
static score and the trained weights are left as they were.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from src.checks import check_fraction
from src.state import detach_state


@contextlib.contextmanager
def swapped_weights(params: list[nn.Parameter], tensors: list[torch.Tensor]):
    """Inside the block, each parameter holds the matching tensor (same shape; no copy); then its own again."""
    originals = [param.data for param in params]
    for param, tensor in zip(params, tensors):
        param.data = tensor
    try:
        yield
    finally:
        for param, tensor in zip(params, originals):
            param.data = tensor


class DynamicEvaluation:
    """The adapted weights, their running gradient statistics and the carried state of one pass over a split.

    Args:
        lr: step size, >= 0 (0: the static score).
        decay: pull towards the trained weights per step, in [0, 1).
        rms: scale the steps by the gradients' running root mean square.
        epsilon: added to that root before dividing.
    """

    def __init__(self, lr: float = 1e-4, decay: float = 0.0, rms: bool = False, epsilon: float = 1e-8) -> None:
        self.lr = check_fraction("dynamic_eval_lr", lr, 0.0, math.inf)
        self.decay = check_fraction("dynamic_eval_decay", decay)
        self.rms, self.epsilon = bool(rms), epsilon
        self.start()

    def start(self) -> None:
        """Begin a pass: the trained weights are read again at its first window."""
        self.initial: list[torch.Tensor] | None = None
        self.adapted: list[torch.Tensor] = []
        self.mean_square: list[torch.Tensor] = []
        self.state, self.steps = None, 0

    def score(self, model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy (nats, detached) of one window with the adapted weights, which then
        take their step on it.

        Args:
            model: the language model (``summed_loss(tokens, targets, state) -> (loss, state)`` and
                ``apply_constraints()``, called after each step).
            tokens, targets: (B, T) int64, the window and its next tokens.
        """
        # Lightning tests under inference mode; tensors made there cannot be saved for backward.
        with torch.inference_mode(False), torch.enable_grad():
            tokens, targets = tokens.clone(), targets.clone()
            params = [param for param in model.parameters() if param.requires_grad]
            if self.initial is None:
                self.initial = [param.detach().clone() for param in params]
                self.adapted = [param.detach().clone() for param in params]
                self.mean_square = [torch.zeros_like(param) for param in params] if self.rms else []
            with swapped_weights(params, self.adapted):
                summed, state = model.summed_loss(tokens, targets, self.state)
                self.state = detach_state(state)
                grads = torch.autograd.grad(summed / targets.numel(), params, allow_unused=True)
                self.steps += 1
                with torch.no_grad():
                    for index, (param, grad, start) in enumerate(zip(params, grads, self.initial)):
                        if grad is None:
                            continue
                        if self.rms:
                            square = self.mean_square[index]
                            square.mul_(1 - 1 / self.steps).add_(grad * grad, alpha=1 / self.steps)
                            grad = grad / (square.sqrt() + self.epsilon)
                        param.add_(grad, alpha=-self.lr)
                        param.add_(start - param, alpha=self.decay)
                model.apply_constraints()  # e.g. IndRNN's |u| bound, as after every training step
        return summed.detach()


__all__ = ["DynamicEvaluation", "swapped_weights"]
