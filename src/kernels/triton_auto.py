"""``backend="auto"`` and the loop layers' Triton kernels (leaky, Clockwork, skip: src/kernels/dense_triton.py;
Jordan: src/kernels/jordan_triton.py): on CUDA "auto" takes the compiled kernel, safely.

A kernel that raises while it compiles or launches (a Triton, driver or device it cannot be built for,
too little shared memory, ...) is logged once, in one line naming the layer and the error, and that
layer runs its PyTorch loop from then on, for the rest of the process; the call that failed is
computed by the float64-checked PyTorch reference of the same recurrence instead (a backward pass
that fails recomputes its gradients through the reference). ``backend="triton"`` stays strict: the
error is raised.

A layer tells its kernel entry point that "auto" chose it by passing its name as ``fallback_for``
(None: a strict "triton" call, which raises).
"""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

# Layer name -> the one-line report of its kernel's failure (the layers that run their loop for good).
FAILED: dict[str, str] = {}

Result = TypeVar("Result")


def failed(layer: str) -> bool:
    return layer in FAILED


def record_failure(layer: str, error: BaseException) -> None:
    """Log, once per layer, why its Triton kernel is given up, and give it up for the process."""
    if layer in FAILED:
        return
    lines = str(error).strip().splitlines()
    FAILED[layer] = (f"{layer}: the Triton kernel failed ({type(error).__name__}: {lines[0][:200] if lines else ''}); "
                     "backend=auto runs the PyTorch loop from now on (backend=triton raises the error)")
    log.warning(FAILED[layer])


def run(layer: str | None, kernel: Callable[[], Result], fallback: Callable[[], Result]) -> Result:
    """``kernel()``; for an "auto" call (``layer`` set) whose kernel raises, :func:`record_failure`
    and ``fallback()`` (the PyTorch reference). A strict call (``layer`` None) raises."""
    if layer is None:
        return kernel()
    try:
        return kernel()
    except Exception as error:  # compile or launch errors: Triton's, the driver's, out of resources
        record_failure(layer, error)
        return fallback()
