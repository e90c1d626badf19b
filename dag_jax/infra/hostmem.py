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

What the thresholds cannot reach: XLA:CPU allocates a program's temporaries from its worker
threads, and glibc serves those threads from per-thread arenas whose heaps hold at most
64 MiB. A larger block (the tiny DAG-DB gradient step's 1.05 GiB of temporaries) is a fresh
``mmap`` on every run whatever the thresholds, and 64-byte-aligned blocks fragment the heap
(tcache keeps the small leftovers, so a freed block is never quite big enough again).
There, the tiny DAG-DB gradient step spent 0.4 s of its 0.9 s in the kernel, on 274 000 page
faults per run. ``MALLOC_ARENA_MAX=1`` removes the faults but serialises every allocation
(the step got 34 % slower). A malloc with per-thread caches fixes it: with tcmalloc
preloaded (``LD_PRELOAD=libtcmalloc_minimal.so.4``, Debian's ``libtcmalloc-minimal4``) the
step ran in 0.68 s with no faults (BENCHMARKS.md). ``allocator()`` says which malloc this
process runs on; ``tune_for_cpu`` logs the hint when it is glibc's.

A malloc can only be replaced before the process starts. So the compute CLIs (train, sample,
evaluate, bench, pretrain_tiny) call ``preload_tcmalloc()`` first thing under
``if __name__ == "__main__"``: on a CPU-only JAX install (or ``JAX_PLATFORMS=cpu``), when the
process runs on glibc's malloc and the dynamic loader can find tcmalloc, it re-executes the
same command line with tcmalloc in ``LD_PRELOAD`` and says so on stderr. It never does this
twice, nor from library calls, and ``DAG_JAX_PRELOAD_TCMALLOC=0`` turns it off. Where
tcmalloc is not installed, nothing changes and the hint is logged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping
from importlib import metadata

import jax

ENV_VAR = "DAG_JAX_KEEP_HOST_MEMORY"
# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and are reused
TRIM_THRESHOLD = 2**31 - 1  # never hand the heap's free top back to the kernel
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps

_applied = False
# malloc replacements recognised by allocator(), by their library's file name
ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
PRELOAD_HINT = (
    "host malloc is glibc's: XLA:CPU's large per-run buffers page-fault on every run; "
    "tcmalloc avoids it: install it (Debian: libtcmalloc-minimal4) and the CLIs preload it, "
    "or run with LD_PRELOAD=libtcmalloc_minimal.so.4 (dag_jax/hostmem.py)"
)
PRELOAD_ENV = "DAG_JAX_PRELOAD_TCMALLOC"  # "0" keeps glibc's malloc
PRELOADED_ENV = "DAG_JAX_PRELOADED"  # set on the re-executed process: never re-execute twice
TCMALLOC_LIBS = ("tcmalloc_minimal", "tcmalloc")  # gperftools' libraries, preferred first
# gperftools logs every allocation above 1 GiB by default; XLA:CPU's temporaries pass that
LARGE_ALLOC_ENV = ("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
# distributions of JAX's accelerator plugins (PJRT for CUDA, ROCm, TPU, Metal)
ACCELERATOR_DISTS = ("jax-cuda", "jax-rocm", "libtpu", "jax-metal", "jax-tpu")
_OFF = ("0", "false", "no", "off")
log = logging.getLogger(__name__)


def switched_off(name: str, env: Mapping[str, str] | None = None) -> bool:
    """Return whether the opt-out variable ``name`` says off (0/false/no/off); unset is on."""
    env = os.environ if env is None else env
    return env.get(name, "1").strip().lower() in _OFF


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


def allocator(maps: str = "/proc/self/maps") -> str:
    """Return the malloc this process runs on: a preloaded replacement's name, or "glibc".

    Reads the shared objects mapped into the process (Linux); "unknown" elsewhere.
    """
    try:
        with open(maps) as f:
            names = {line.rsplit("/", 1)[-1].strip() for line in f if "/" in line}
    except OSError:
        return "unknown"
    for name in ALLOCATORS:
        if any(n.startswith(f"lib{name}") for n in names):
            return name
    return "glibc"


def is_applied() -> bool:
    """Return whether this process raised the thresholds (benchmarks record it)."""
    return _applied


def tune_for_cpu() -> bool:
    """Call ``keep_freed_host_memory`` when JAX's backend is the CPU (unless the env opts out).

    Returns whether the thresholds are now raised. This initialises JAX's backends, so call
    it after ``jax.distributed.initialize``.
    """
    if switched_off(ENV_VAR):
        return False
    if jax.default_backend() != "cpu":
        return False
    if allocator() == "glibc":
        log.info(PRELOAD_HINT)
    return keep_freed_host_memory()


def find_tcmalloc() -> str | None:
    """Return the name the dynamic loader knows tcmalloc by (for ``LD_PRELOAD``), or None."""
    for name in TCMALLOC_LIBS:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def accelerator_plugins() -> list[str]:
    """Return the installed distributions of JAX accelerator plugins (CUDA, ROCm, TPU, Metal)."""
    names = set()
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(ACCELERATOR_DISTS):
            names.add(name)
    return sorted(names)


def cpu_only(env: Mapping[str, str]) -> bool:
    """Return whether JAX will compute on the CPU: by ``JAX_PLATFORMS``, else by the plugins."""
    platforms = env.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not accelerator_plugins()


def preload_env(
    env: Mapping[str, str], *, malloc: str, library: str | None, cpu: bool
) -> dict[str, str] | None:
    """Return the environment to re-execute under tcmalloc with, or None to run as is.

    ``malloc`` is this process's allocator (``allocator()``), ``library`` tcmalloc's name
    (``find_tcmalloc()``) and ``cpu`` whether JAX computes on the CPU (``cpu_only``).
    """
    if switched_off(PRELOAD_ENV, env) or env.get(PRELOADED_ENV):
        return None
    if malloc != "glibc" or library is None or not cpu:
        return None
    out = dict(env)
    out["LD_PRELOAD"] = " ".join(p for p in (library, env.get("LD_PRELOAD", "").strip()) if p)
    out[PRELOADED_ENV] = library
    out.setdefault(*LARGE_ALLOC_ENV)
    return out


def preload_tcmalloc(argv: list[str] | None = None) -> None:
    """Re-execute this command under tcmalloc where that helps; otherwise return.

    For the ``__main__`` blocks of the CLIs only, before anything else runs: it replaces the
    process. ``argv`` defaults to the interpreter's original command line.
    """
    env = preload_env(
        os.environ, malloc=allocator(), library=find_tcmalloc(), cpu=cpu_only(os.environ)
    )
    if env is None:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    print(
        f"[dag_jax] re-running under tcmalloc ({env[PRELOADED_ENV]}): XLA:CPU's buffers stop "
        f"page-faulting; {PRELOAD_ENV}=0 keeps glibc's malloc",
        file=sys.stderr,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
