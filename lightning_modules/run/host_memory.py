"""Freed host memory kept for reuse: glibc's malloc told to keep large freed blocks on its heap.

Why: glibc serves a request larger than its mmap threshold (adaptive, at most 32 MiB on 64-bit
Linux) with a fresh ``mmap`` and hands it back to the kernel on ``free``. A CPU training step
allocates and frees the same large activations and gradients every step, so each step writes to
fresh pages and takes one page fault per 4 KiB page. Measured on the 2-core development VM (glibc
2.36, transparent huge pages on ``madvise``):

* IndRNN on one stream of 100,000 steps (``task=streaming_adding``, B=1): 39,500 minor faults and
  197 ms per training step by default, 0 faults and 123 ms with this setting; at 50,000 steps 10,600
  faults and 81 ms against 0 and 62 ms;
* ``nn.LSTM`` fwd+bwd at T=784, B=64, H=128: 419-438 ms against 213-220 ms.

:func:`keep_freed_memory` sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to ``INT_MAX``
(``mallopt``): blocks under 2 GiB come from the heap and are reused, and the heap's free top is
handed back only past 2 GiB. The cost: the process keeps the heap at its peak (a training run
reaches that peak every step anyway). The run driver applies it in every run that
``trainer.keep_freed_memory`` (default true) asks for (:func:`lightning_modules.run.build.build_trainer`);
it is process-wide and not undone. Elsewhere than glibc (macOS, musl, Windows) it does nothing.
Lightning's spawned workers (``trainer=ddp_cpu``) start new interpreters and keep glibc's defaults.
"""
from __future__ import annotations

import ctypes
import logging
import platform
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# mallopt takes a C int: the largest threshold it can be given.
INT_MAX = 2**31 - 1

_applied = False


def glibc_malloc() -> bool:
    """Whether this process's malloc is glibc's (Linux with glibc)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has taken effect in this process."""
    return _applied


def keep_freed_memory() -> bool:
    """Keep freed blocks under 2 GiB on the heap for reuse (see the module docstring).

    Returns True where glibc's malloc took both settings (now or in an earlier call), False where
    there is no glibc or it refused one (then a warning says which)."""
    global _applied
    if _applied:
        return True
    if not glibc_malloc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    refused = [name for name, parameter in (("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD), ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD))
               if mallopt(parameter, INT_MAX) != 1]
    if refused:
        log.warning("glibc's mallopt refused %s: large host tensors keep glibc's defaults "
                    "(fresh pages each step); set trainer.keep_freed_memory=false to skip this", ", ".join(refused))
        return False
    _applied = True
    return True


__all__ = ["freed_memory_kept", "glibc_malloc", "keep_freed_memory"]
