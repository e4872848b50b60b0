"""Freed host memory kept for reuse: glibc's malloc told to keep large freed blocks on its heap.

Why: glibc serves a request larger than its mmap threshold (adaptive, at most 32 MiB on 64-bit
Linux) with a fresh ``mmap`` and hands it back to the kernel on ``free``. A CPU training step
allocates and frees the same large activations and gradients every step, so every tensor over that
size is written to fresh pages, each of which faults in on first touch (one fault per 4 KiB page
where transparent huge pages are off or on ``madvise``, the common settings). Measured on the 2-core
development VM (glibc 2.36, THP on ``madvise``):

* IndRNN on one stream of 100,000 steps (``task=streaming_adding``, B=1): 39,500 minor faults and
  197 ms per training step by default, 0 faults and 123 ms with this setting; at 50,000 steps 10,600
  faults and 81 ms against 0 and 62 ms;
* ``nn.LSTM`` fwd+bwd at T=784, B=64, H=128: 414-417 ms against 200-204 ms.

:func:`keep_freed_memory` sets ``M_MMAP_THRESHOLD`` and then ``M_TRIM_THRESHOLD`` to ``INT_MAX``
(``mallopt``): blocks under 2 GiB that the main thread allocates come from the heap and are reused,
and the heap's free top goes back to the kernel only past 2 GiB. The costs: the process keeps its heap
at its peak, and above the peak of live memory where blocks of varying sizes fragment it (a CPU run
reaches its peak every step anyway; the test suite's peak RSS did not grow). The run driver applies
it to CPU runs that ``trainer.keep_freed_memory`` (default true) asks for
(:func:`lightning_modules.run.build.build_trainer`). It is process-wide and never undone: a later run
in the same process (a sweep's jobs under the basic launcher) keeps it even with the setting false.
Forked DataLoader workers inherit it; Lightning's spawned workers (``trainer=ddp_cpu``) start new
interpreters with glibc's defaults.

It needs glibc 2.35 or later: earlier versions refuse thresholds above 32 MiB, and then nothing is
changed (one warning). Without glibc (macOS, musl, Windows) it does nothing; with another allocator
preloaded (tcmalloc, jemalloc) glibc's settings have no effect.
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
_refused = False


def glibc_malloc() -> bool:
    """Whether this process's malloc is glibc's (Linux with glibc)."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _mallopt():
    """glibc's ``int mallopt(int param, int value)`` (1 on success)."""
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has taken effect in this process."""
    return _applied


def keep_freed_memory() -> bool:
    """Keep freed blocks under 2 GiB on the heap for reuse (see the module docstring).

    Returns True where glibc's malloc took the settings (now or in an earlier call), False without
    glibc or where glibc refused the mmap threshold: then nothing is changed, and the first refusal
    is logged as a warning."""
    global _applied, _refused
    if _applied:
        return True
    if _refused or not glibc_malloc():
        return False
    mallopt = _mallopt()
    # The mmap threshold first: setting the trim threshold alone would freeze the adaptive mmap threshold
    # at its current value, worse than the defaults.
    if mallopt(M_MMAP_THRESHOLD, INT_MAX) != 1:
        _refused = True
        log.warning("glibc's mallopt refused M_MMAP_THRESHOLD=%d (glibc %s; 2.35 or later takes it): host "
                    "tensors over 32 MiB keep glibc's defaults, fresh pages at every allocation", INT_MAX,
                    platform.libc_ver()[1] or "of unknown version")
        return False
    if mallopt(M_TRIM_THRESHOLD, INT_MAX) != 1:  # not seen: the threshold above is the one that matters
        log.warning("glibc's mallopt refused M_TRIM_THRESHOLD=%d: the heap's free top may still go back "
                    "to the kernel", INT_MAX)
    _applied = True
    return True


__all__ = ["freed_memory_kept", "glibc_malloc", "keep_freed_memory"]
