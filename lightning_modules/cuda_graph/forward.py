"""The network's forward and backward passes captured once in a CUDA graph and replayed at every
training step with the same input shape, so that a step costs two graph launches instead of hundreds
of kernel launches from Python (a 6-layer IndRNN at T=784 launches thousands).

:class:`GraphedForward` replaces ``network.forward`` (an instance attribute: parameter names, the
state dict and checkpoints are unchanged) with a dispatcher:

* a training step (``network.training`` and gradients enabled) on CUDA with one input tensor, no
  carried state and no lengths replays the graph captured for that input's shape and dtype (the
  first such step captures it with ``torch.cuda.make_graphed_callables``, after its 3 warm-up
  passes; the buffers they touched, e.g. batch-norm running statistics, are restored, so the
  trajectory equals the eager one);
* anything else runs the network eagerly: evaluation, a carried state (truncated BPTT, streams),
  padded batches (lengths), another input shape (a last short batch, PTB's random window lengths),
  autocast (``precision: bf16-mixed`` caches casts, which graphs cannot), a capture that failed. The
  first time each reason applies it is logged in one line, e.g. ``CUDA graphs: eager step: input
  shape (17, 784, 1) differs from the captured (32, 784, 1) (a last short batch or varying lengths)``.

Dropout inside a graph draws its own random numbers (the same distribution, not the eager bits);
everything else is the same kernels on the same values, so losses and gradients equal the eager
run's (tests/test_cuda_graph.py, on a GPU). The optimizer step has its own graph
(:mod:`lightning_modules.cuda_graph.optimizer`).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from src.state import map_state, state_tensors

log = logging.getLogger(__name__)


class _PredictionsAndState(nn.Module):
    """The network as a callable of one tensor returning tensors only: (predictions, *state tensors)."""

    def __init__(self, network: nn.Module, forward: Callable) -> None:
        super().__init__()
        self.network = network
        self._forward = forward
        self.template = None  # the returned state's structure (ints such as Clockwork's clock kept)

    def forward(self, inputs: torch.Tensor):
        predictions, state = self._forward(inputs)
        self.template = state
        return (predictions, *state_tensors(state))


class GraphedForward:
    """Installs itself as ``network.forward``; see the module docstring. ``report`` receives each
    one-line reason for an eager step the first time it applies (default: the module's logger)."""

    def __init__(self, network: nn.Module, report: Callable[[str], None] | None = None,
                 warmup: int = 3) -> None:
        self.network = network
        self.original = network.forward
        self.report = report or log.info
        self.warmup = warmup
        self.graphed = None
        self.signature = None
        self.template = None
        self.failed: str | None = None
        self.reported: set[str] = set()
        self.replays = 0

    def install(self) -> "GraphedForward":
        self.network.forward = self
        return self

    def uninstall(self) -> None:
        if self.network.__dict__.get("forward") is self:
            del self.network.forward

    def _eager(self, reason: str | None, args, kwargs):
        if reason is not None and reason not in self.reported:
            self.reported.add(reason)
            self.report(f"CUDA graphs: eager step: {reason}")
        return self.original(*args, **kwargs)

    def _why_not(self, args, kwargs) -> str | None:
        """None when this call can replay (or capture) a graph; else the one-line reason."""
        if self.failed:
            return self.failed
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return "the network was called with more than one input tensor"
        if any(value is not None for value in kwargs.values()):
            names = ", ".join(sorted(k for k, v in kwargs.items() if v is not None))
            return f"{names} given (a carried state or padded batches need the eager network)"
        inputs = args[0]
        if not inputs.is_cuda:
            return f"inputs on {inputs.device}, not CUDA"
        if torch.is_autocast_enabled():
            return "autocast is on (precision bf16-mixed/16-mixed caches casts, which graphs cannot)"
        signature = (tuple(inputs.shape), inputs.dtype, inputs.device, inputs.requires_grad)
        if self.signature is not None and signature != self.signature:
            return (f"input shape {tuple(inputs.shape)} differs from the captured {self.signature[0]} "
                    "(a last short batch or varying lengths)")
        return None

    def __call__(self, *args, **kwargs):
        if not (self.network.training and torch.is_grad_enabled()):
            return self.original(*args, **kwargs)  # evaluation: eager, nothing to report
        reason = self._why_not(args, kwargs)
        if reason is not None:
            return self._eager(reason, args, kwargs)
        inputs = args[0]
        if self.graphed is None:
            self._capture(inputs)
            if self.failed:
                return self._eager(self.failed, args, kwargs)
        outputs = self.graphed(inputs)
        self.replays += 1
        found = iter(outputs[1:])
        return outputs[0], map_state(lambda _: next(found), self.template)

    def _capture(self, inputs: torch.Tensor) -> None:
        wrapper = _PredictionsAndState(self.network, self.original)
        buffers = [(b, b.detach().clone()) for b in self.network.buffers()]
        try:
            self.graphed = torch.cuda.make_graphed_callables(
                wrapper, (inputs.detach().clone().requires_grad_(inputs.requires_grad),),
                num_warmup_iters=self.warmup, allow_unused_input=True)  # e.g. a frozen or unused head
            self.template = wrapper.template
            self.signature = (tuple(inputs.shape), inputs.dtype, inputs.device, inputs.requires_grad)
            self.report(f"CUDA graphs: captured forward and backward for inputs {tuple(inputs.shape)}")
        except Exception as error:  # an op that cannot be captured (a host sync, a host-to-device copy)
            self.graphed = None
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self.failed = f"capture failed ({type(error).__name__}: {first_line[:200]})"
        finally:
            with torch.no_grad():  # the warm-up passes must not count (batch-norm running statistics)
                for buffer, saved in buffers:
                    buffer.copy_(saved)
