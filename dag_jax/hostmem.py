"""Keep freed host memory inside the process, so XLA:CPU programs stop page-faulting.

XLA:CPU allocates a program's buffers with ``malloc`` on every run and frees them afterwards.
glibc serves blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh
``mmap`` calls and hands them back to the kernel on ``free``. So every run of a jitted UNet
page-faults and zero-fills its activations again. On the 2-core CI box this kernel time was
about half of a tiny UNet forward (1.49 s → 0.70 s with the thresholds raised; BENCHMARKS.md,
"Where the CPU time goes"). Raising the mmap and trim thresholds lets glibc reuse freed blocks
from one run to the next. It makes no difference to results, only to speed and to how much
resident memory the process keeps between runs.

The entry points (train, sample, evaluate, bench, pretrain_tiny) call ``tune_for_cpu()``
through ``xla_cpu.tune_for_cpu()``. It only acts when JAX computes on the CPU, and
``DAG_JAX_KEEP_HOST_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import jax

ENV_VAR = "DAG_JAX_KEEP_HOST_MEMORY"
# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and are reused
TRIM_THRESHOLD = 2**31 - 1  # never hand the heap's free top back to the kernel
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps

_applied = False


def keep_freed_host_memory() -> bool:
    """Raise glibc's mmap/trim thresholds for this process; return whether they were set.

    Returns False where there is no glibc ``mallopt`` (macOS, musl): those allocators keep
    their own policy. Calling it again changes nothing.
    """
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
    )
    _applied = all(mallopt(param, value) == 1 for param, value in settings)
    return _applied


def is_applied() -> bool:
    """Return whether this process raised the thresholds (benchmarks record it)."""
    return _applied


def tune_for_cpu() -> bool:
    """Call ``keep_freed_host_memory`` when JAX's backend is the CPU (unless the env opts out).

    Returns whether the thresholds are now raised. This initialises JAX's backends, so call
    it after ``jax.distributed.initialize``.
    """
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if jax.default_backend() != "cpu":
        return False
    return keep_freed_host_memory()
