"""The optimizer step inside a CUDA graph: the parameter update captured once and replayed.

:class:`OptimizerStepGraph` replaces ``optimizer.step`` (an instance attribute, as torch's LR
schedulers do; the class, its state and ``state_dict`` stay) with a step that

1. runs the closure eagerly, as torch's optimizers do (Lightning's closure: training_step, backward,
   ``on_before_optimizer_step``, gradient clipping);
2. replays a captured graph of the pure update: the gradients are first copied into the static
   buffers the graph reads (backward allocates new ``.grad`` tensors every step), and for Adam, AdamW
   and RMSprop the learning rate into a device tensor, refilled only when ``group["lr"]`` changed (the
   group keeps its float: schedulers, callbacks and checkpoints see what they see in an eager run);
3. leaves the rest eager: Lightning's constraints after the step (``SequenceObjective.optimizer_step``).

A graph belongs to a *signature*: each group's parameters (identity), which of them have gradients,
the group's other settings (SGD's lr too: its foreach kernels take it as a constant), the optimizer
state's tensors (identity: ``load_state_dict`` replaces them). A new signature steps eagerly until it
has been seen on ``warmup`` eager steps, then is captured (recorded, not run) and replayed for that
step: a fresh optimizer's first step creates its state (a capture would record the creation and redo
it at every replay), which changes the signature, so the earliest capture is the third step. Adam, AdamW
and RMSprop take torch's ``capturable`` code path inside the capture only (their step counters move to
the parameters' device once; the eager steps read them there, with the eager arithmetic). Replays
equal the eager steps within float32 rounding (the capturable path divides where the eager one
multiplies); SGD's replay runs the eager kernels on the same values.

Eager steps, each reason logged once (``CUDA graphs: eager optimizer step: ...``): an optimizer other
than Adam, AdamW, RMSprop or SGD (e.g. LBFGS re-evaluates the closure), ``fused``/``differentiable``
groups, tensor hyperparameters, parameters off CUDA, sparse gradients, no gradient at all (a skipped
step: ``training_step`` returned None), step hooks (they would not run on a replay), a call with
extra arguments (a GradScaler's), a signature that changed (until it held for ``warmup`` steps), a
capture that failed (then eager for good). A GradScaler (``precision: 16-mixed``) is refused by the
callback before this class is installed: it skips steps on overflow, a decision made on the host.

Checkpoints: ``state_dict()`` returns the step counters on the CPU, as an eager run has them, so a
state saved here loads into an eager run and back (``load_state_dict`` drops the graph).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch.optim import optimizer as torch_optimizer

log = logging.getLogger(__name__)

# The optimizers whose step has been checked inside a graph, and how each reads its learning rate:
# "tensor" (capturable with a tensor lr, refilled on change) or "constant" (baked into the graph).
CHECKED_OPTIMIZERS = {torch.optim.Adam: "tensor", torch.optim.AdamW: "tensor", torch.optim.RMSprop: "tensor",
                      torch.optim.SGD: "constant"}


def unsupported_optimizer(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer``'s step can never be captured here (one line), or None when it can."""
    kind = type(optimizer)
    if kind not in CHECKED_OPTIMIZERS:
        names = ", ".join(k.__name__ for k in CHECKED_OPTIMIZERS)
        return f"{kind.__name__} is not one of the optimizers checked inside a CUDA graph ({names})"
    for group in optimizer.param_groups:
        for flag in ("fused", "differentiable"):
            if group.get(flag):
                return f"{kind.__name__}({flag}=True) is not checked inside a CUDA graph"
        tensors = sorted(key for key, value in group.items() if key != "params" and torch.is_tensor(value))
        if tensors:
            return f"tensor hyperparameters ({', '.join(tensors)}) are not handled: give them as floats"
    return None


class CudaGraph:
    """The device side: ``CudaGraph(record)`` captures what ``record()`` launches (nothing runs);
    ``replay()`` runs it. :meth:`unsupported` says why parameters cannot be captured (tests pass a
    stand-in that replays by calling ``record`` again)."""

    def __init__(self, record: Callable[[], None]) -> None:
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader pin-memory thread's CUDA calls must not invalidate the capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            record()

    def replay(self) -> None:
        self.graph.replay()

    @staticmethod
    def unsupported(params: list[torch.Tensor]) -> str | None:
        off = next((p for p in params if not p.is_cuda), None)
        return None if off is None else f"parameters on {off.device}, not CUDA"


def _hooks_registered(optimizer: torch.optim.Optimizer) -> bool:
    hook_tables = (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks,
                   torch_optimizer._global_optimizer_pre_hooks, torch_optimizer._global_optimizer_post_hooks)
    return any(len(table) for table in hook_tables)


class OptimizerStepGraph:
    """Installs itself as ``optimizer.step``; see the module docstring. ``report`` receives each
    one-line reason for an eager step the first time it applies (default: the module's logger);
    ``graph``: the capture class (:class:`CudaGraph`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, report: Callable[[str], None] | None = None,
                 warmup: int = 1, graph: type = CudaGraph) -> None:
        self.optimizer = optimizer
        self.report = report or log.info
        self.warmup, self.graph_class = warmup, graph
        self.lr_mode = CHECKED_OPTIMIZERS.get(type(optimizer))
        self.refused = unsupported_optimizer(optimizer)
        self.failed: str | None = None
        self.reported: set[str] = set()
        self.graph = None
        self.captured: tuple | None = None  # the signature (and, through it, the objects) the graph reads
        self.candidate: tuple | None = None  # a signature not captured yet, and its eager steps so far
        self.candidate_steps = 0
        self.graph_params: list[torch.Tensor] = []  # the parameters the graph updates (those with gradients)
        self.static_grads: list[torch.Tensor] = []
        self.lr_tensors: list[torch.Tensor] = []
        self.lr_values: list[float] = []
        self.replays = 0
        self.captures = 0
        self.original = None
        self.handles: list = []

    # Installing -----------------------------------------------------------------------------------
    def install(self) -> "OptimizerStepGraph":
        optimizer = self.optimizer
        self.had_own_step = "step" in optimizer.__dict__  # e.g. an LR scheduler's wrapper
        self.original = optimizer.step

        def step(closure=None, **kwargs):
            return self.step(closure, **kwargs)

        step._wrapped_by_lr_sched = True  # a later LR scheduler must not wrap this (it binds the function)
        step.graph_of = self  # marks the step as installed (a second installer leaves it alone)
        optimizer.step = step
        self.handles = [optimizer.register_state_dict_post_hook(self._eager_checkpoint),
                        optimizer.register_load_state_dict_post_hook(self._state_replaced)]
        return self

    def uninstall(self) -> None:
        optimizer = self.optimizer
        if self.had_own_step:
            optimizer.step = self.original
        else:
            optimizer.__dict__.pop("step", None)
        for handle in self.handles:
            handle.remove()
        self.handles, self.graph, self.captured = [], None, None
        with torch.no_grad():  # the step counters back where an eager run keeps them
            for group in optimizer.param_groups:
                if not _device_counters(group):
                    for p in group["params"]:
                        state = optimizer.state.get(p, {})
                        if torch.is_tensor(state.get("step")) and not state["step"].is_cpu:
                            state["step"] = state["step"].cpu()

    # Checkpoints ----------------------------------------------------------------------------------
    @staticmethod
    def _eager_checkpoint(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        """The state dict an eager run writes: step counters on the CPU for groups that keep them there
        (the packed state's inner dicts are the live ones: copied, never changed in place)."""
        host_counters = {index for group in state_dict["param_groups"] if not _device_counters(group)
                         for index in group["params"]}
        state = {}
        for index, values in state_dict["state"].items():
            step = values.get("step")
            if index in host_counters and torch.is_tensor(step) and not step.is_cpu:
                values = {**values, "step": step.detach().cpu()}
            state[index] = values
        return {**state_dict, "state": state}

    def _state_replaced(self, optimizer: torch.optim.Optimizer) -> None:
        self.graph, self.captured, self.candidate, self.candidate_steps = None, None, None, 0

    # Stepping -------------------------------------------------------------------------------------
    def _eager(self, reason: str | None, kwargs: dict) -> None:
        if reason is not None and reason not in self.reported:
            self.reported.add(reason)
            self.report(f"CUDA graphs: eager optimizer step: {reason}")
        return self.original(**kwargs)

    def _with_grads(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def why_not_ever(self, kwargs: dict) -> str | None:
        """The reasons known before the closure runs (the optimizer, a failed capture, the call, hooks)."""
        if self.refused or self.failed:
            return self.refused or self.failed
        if kwargs:
            return f"step called with {', '.join(sorted(kwargs))} (a GradScaler's step)"
        if _hooks_registered(self.optimizer):
            return "optimizer step hooks are registered (a replay would not run them)"
        return None

    def why_not(self, kwargs: dict) -> str | None:
        """None when this step can replay (or capture) a graph; else the one-line reason."""
        reason = self.why_not_ever(kwargs)
        if reason is not None:
            return reason
        if any(torch.is_tensor(v) for g in self.optimizer.param_groups for k, v in g.items() if k != "params"):
            return "a hyperparameter became a tensor (e.g. group['lr']): give it as a float"
        with_grads = self._with_grads()
        if not with_grads:
            return "no parameter has a gradient (a skipped step: training_step returned None)"
        if any(p.grad.is_sparse for p in with_grads):
            return "sparse gradients (copied into a graph's static buffers they would lose their layout)"
        return self.graph_class.unsupported(with_grads)

    def signature(self) -> tuple:
        """What a graph's kernels depend on: per group its parameters, which have gradients, its other
        settings (SGD: lr included); the state tensors of the parameters with gradients."""
        groups = []
        for group in self.optimizer.param_groups:
            settings = tuple(sorted((key, repr(value)) for key, value in group.items()
                                    if key != "params" and (key != "lr" or self.lr_mode == "constant")))
            params = tuple(group["params"])
            groups.append((tuple(map(id, params)), tuple(p.grad is not None for p in params), settings))
        state = tuple(id(value) for p in self._with_grads() for value in self.optimizer.state.get(p, {}).values()
                      if torch.is_tensor(value))
        return tuple(groups), state

    def step(self, closure=None, **kwargs):
        reason = self.why_not_ever(kwargs)
        if reason is not None:  # the optimizer's own step, closure included (LBFGS evaluates it itself)
            return self._eager(reason, dict(kwargs, closure=closure))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        reason = self.why_not(kwargs)
        if reason is not None:
            self._eager(reason, kwargs)
            return loss
        signature = self.signature()
        if self.graph is not None and signature == self.captured[0]:
            self._replay()
            return loss
        if signature != self.candidate:
            if self.graph is not None:
                self._eager(self._what_changed(signature), {})
            else:
                self.original()
            self.candidate, self.candidate_steps = signature, 1
            return loss
        if self.candidate_steps < self.warmup:
            self.original()
            self.candidate_steps += 1
            return loss
        self._capture()
        if self.failed:
            self._eager(self.failed, {})
        else:
            self._replay()
        return loss

    def _what_changed(self, signature: tuple) -> str:
        (groups, state), (old_groups, old_state) = signature, self.captured[0]
        if len(groups) != len(old_groups) or any(a[0] != b[0] for a, b in zip(groups, old_groups)):
            return "the optimizer's parameters changed since the capture (a new capture follows)"
        if any(a[1] != b[1] for a, b in zip(groups, old_groups)):
            return "other parameters have gradients than at the capture (a new capture follows if it lasts)"
        if state != old_state:
            return "the optimizer state was replaced (a new capture follows)"
        return ("the optimizer's settings changed since the capture (SGD's lr is a constant in its graph; "
                "a new capture follows if it lasts)")

    def _move_counters(self) -> None:
        """Adam/AdamW/RMSprop: step counters on the parameters' device (the capturable path reads them
        there; the eager path reads them with .item(), the same value)."""
        if self.lr_mode != "tensor":
            return
        for p in self._with_grads():
            state = self.optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")) and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)

    def _capture(self) -> None:
        self._move_counters()
        with_grads = self._with_grads()
        self.graph = None
        self.graph_params = with_grads
        self.static_grads = [p.grad.detach().clone() for p in with_grads]
        self.lr_values = [group["lr"] for group in self.optimizer.param_groups]
        device = with_grads[0].device
        self.lr_tensors = [torch.tensor(float(lr), dtype=torch.float32, device=device) for lr in self.lr_values]
        captured = (self.signature(), with_grads, [dict(self.optimizer.state.get(p, {})) for p in with_grads])
        try:
            self.graph = self.graph_class(self._record)
            self.captured = captured  # holds the objects whose ids the signature names
            self.captures += 1
            self.report(f"CUDA graphs: captured the optimizer step ({type(self.optimizer).__name__}, "
                        f"{len(with_grads)} parameters)")
        except Exception as error:  # e.g. a host synchronisation inside the step
            text = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self.failed = f"capture failed ({type(error).__name__}: {text[:200]})"
            self.graph, self.captured = None, None

    def _record(self) -> None:
        """The update the graph holds: the optimizer's own step on the static gradients (and lr tensors)."""
        with_grads = self.graph_params
        saved_grads = [p.grad for p in with_grads]
        saved_groups = [dict(group) for group in self.optimizer.param_groups]
        try:
            for p, static in zip(with_grads, self.static_grads):
                p.grad = static
            if self.lr_mode == "tensor":
                for group, lr in zip(self.optimizer.param_groups, self.lr_tensors):
                    group["lr"] = lr
                    group["capturable"] = with_grads[0].is_cuda  # the capturable path is CUDA-only
            self.original()
        finally:
            for p, grad in zip(with_grads, saved_grads):
                p.grad = grad
            for group, saved in zip(self.optimizer.param_groups, saved_groups):
                group.update({key: value for key, value in saved.items() if key != "params"})

    def _replay(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.static_grads, [p.grad for p in self.graph_params])
            for index, group in enumerate(self.optimizer.param_groups):
                if self.lr_mode == "tensor" and group["lr"] != self.lr_values[index]:
                    self.lr_tensors[index].fill_(group["lr"])  # a scheduler's new rate, no host sync
                    self.lr_values[index] = group["lr"]
        self.graph.replay()
        self.optimizer._opt_called = True  # what torch's LR-scheduler wrapper records for a step
        self.replays += 1


def _device_counters(group: dict) -> bool:
    """Whether an eager run keeps this group's step counters on the parameters' device."""
    return bool(group.get("capturable") or group.get("fused"))
