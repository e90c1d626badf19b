"""Opt-in CPU tuning for the CLIs: measured XLA:CPU flags and glibc malloc settings.

A CLI applies it when it is given ``--cpu_tuning`` or when ``DAG_JAX_CPU_TUNING=1``, first thing
in its ``main`` (``apply_if_requested``). Library calls (``train_and_evaluate``,
``load_pipeline``, evaluate, export) never apply it: they leave ``XLA_FLAGS``, the environment
and the allocator as the caller set them. Nothing here re-executes the process. docs/cpu.md has
the recipe and the figures.

**XLA:CPU flags.** jaxlib 0.10 hands every convolution to YNNPACK ("ynn fusions"). On x86-64,
at the UNet's and VAE's shapes, these convs take 1.1–2.2× the time of XLA's Eigen convolutions
forward and 1.5–2.8× with their gradient (the filter gradient alone: 3–4×).
``--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`` takes
convolutions out of YNNPACK and leaves its other fusions (dots, reductions) alone; taking dots
out too was slower. The measurements are in BENCHMARKS.md, "Convolutions back to Eigen"
(``python -m dag_jax.bench ops``).

On AMD CPUs with AVX-512 (Zen 4 and 5 run 512-bit vectors at full clock),
``--xla_cpu_prefer_vector_width=512`` lets XLA's own loops (the softmax's exponentials,
norms, activations) use the full vector width instead of XLA's 256-bit default; on a Zen 5
box the tiny DAG-DB gradient micro-step went 0.66 → 0.62 s (BENCHMARKS.md, "tcmalloc by
default, 512-bit vectors on AMD"). Intel CPUs keep the default, which guards against
AVX-512 down-clocking and was not measured here.

XLA reads ``XLA_FLAGS`` once, when the first backend is created, and aborts the process on a
flag it does not know. So the flags are only added for the jaxlib versions they were measured
on (``TESTED_JAXLIB``) and on x86-64, while no backend exists yet, and when ``XLA_FLAGS`` does
not name the flag already (the user's value wins). They only change how XLA:CPU computes
(which library runs a convolution, how wide its vectors are), not the results beyond fp32
rounding.

**Freed host memory kept.** XLA:CPU allocates a program's buffers with ``malloc`` on every run
and frees them afterwards. glibc serves blocks above its mmap threshold (128 KiB, adapting up
to 32 MiB) with fresh ``mmap`` calls and hands them back to the kernel on ``free``. So every
run of a jitted UNet page-faults and zero-fills its activations again. On the 2-core CI box
this kernel time was about half of a tiny UNet forward (1.49 s → 0.70 s with the thresholds
raised; BENCHMARKS.md, "Where the CPU time goes"). Raising the mmap and trim thresholds lets
glibc reuse freed blocks from one run to the next. It makes no difference to results, only to
speed and to how much resident memory the process keeps between runs.

**tcmalloc (yours to preload).** What the thresholds cannot reach: XLA:CPU allocates a
program's temporaries from its worker threads, and glibc serves those threads from per-thread
arenas whose heaps hold at most 64 MiB. A larger block (the tiny DAG-DB gradient step's
1.05 GiB of temporaries) is a fresh ``mmap`` on every run whatever the thresholds, and
64-byte-aligned blocks fragment the heap (tcache keeps the small leftovers, so a freed block is
never quite big enough again). There, the tiny DAG-DB gradient step spent 0.4 s of its 0.9 s
in the kernel, on 274 000 page faults per run. ``MALLOC_ARENA_MAX=1`` removes the faults but
serialises every allocation (the step got 34 % slower). A malloc with per-thread caches fixes
it: with tcmalloc preloaded (``LD_PRELOAD=libtcmalloc_minimal.so.4``, Debian's
``libtcmalloc-minimal4``) the step ran in 0.68 s with no faults (BENCHMARKS.md). A malloc can
only be replaced before the process starts, so ``apply`` only logs that hint where the process
runs on glibc's malloc (``allocator()``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from collections.abc import Mapping
from importlib import metadata

import jaxlib

log = logging.getLogger(__name__)

ENV_VAR = "DAG_JAX_CPU_TUNING"  # "1" (or true/yes/on) applies it without the flag
FLAG_HELP = (
    f"tune this process for XLA:CPU before JAX starts (also: {ENV_VAR}=1): measured "
    "XLA_FLAGS and glibc malloc settings, on a CPU backend only; see docs/cpu.md"
)
_ON = ("1", "true", "yes", "on")

# (flag name, value) pairs, in the order they are appended to XLA_FLAGS.
FLAGS = (("xla_cpu_experimental_ynn_fusion_type", "-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"),)
# added on top of FLAGS where ``wide_vectors()`` holds
WIDE_VECTOR_FLAGS = (("xla_cpu_prefer_vector_width", "512"),)
TESTED_JAXLIB = ((0, 10), (0, 11))  # [first, past-the-end) major.minor measured with FLAGS
X86_64 = ("x86_64", "amd64")

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and are reused
TRIM_THRESHOLD = 2**31 - 1  # never hand the heap's free top back to the kernel
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps
MALLOPT_DONE = "glibc malloc keeps freed memory (mmap threshold 1 GiB, no trim, 64 MiB top pad)"

# malloc replacements recognised by allocator(), by their library's file name
ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
TCMALLOC_HINT = (
    "host malloc is glibc's: XLA:CPU's large per-run buffers page-fault on every run; "
    "tcmalloc avoids it: apt-get install libtcmalloc-minimal4, then run with "
    "LD_PRELOAD=libtcmalloc_minimal.so.4 (docs/cpu.md)"
)
# distributions of JAX's accelerator plugins (PJRT for CUDA, ROCm, TPU, Metal)
ACCELERATOR_DISTS = ("jax-cuda", "jax-rocm", "libtpu", "jax-metal", "jax-tpu")

_flags_added: tuple[str, ...] = ()
_host_memory_kept = False


def requested(flag_value: bool, env: Mapping[str, str] | None = None) -> bool:
    """Return whether CPU tuning is asked for: by the CLI flag or by ``DAG_JAX_CPU_TUNING=1``."""
    env = os.environ if env is None else env
    return bool(flag_value) or env.get(ENV_VAR, "").strip().lower() in _ON


def define_flag(flag_values=None) -> None:
    """Define the absl flag ``--cpu_tuning`` (default False) on ``flag_values`` (absl's FLAGS)."""
    from absl import flags

    fv = flags.FLAGS if flag_values is None else flag_values
    flags.DEFINE_bool("cpu_tuning", False, FLAG_HELP, flag_values=fv)


def jaxlib_version() -> tuple[int, int]:
    """Return jaxlib's (major, minor) version."""
    major, minor = jaxlib.__version__.split(".")[:2]
    return int(major), int(minor)


def applicable(version: tuple[int, int] | None = None, machine: str | None = None) -> bool:
    """Return whether ``FLAGS`` were measured for this jaxlib version and machine."""
    version = jaxlib_version() if version is None else version
    machine = platform.machine() if machine is None else machine
    low, high = TESTED_JAXLIB
    return low <= version < high and machine.lower() in X86_64


def backends_initialized() -> bool:
    """Return whether JAX has created its backends (after which XLA_FLAGS is not read again)."""
    from jax._src import xla_bridge

    probe = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(probe()) if probe is not None else bool(getattr(xla_bridge, "_backends", {}))


def accelerator_plugins() -> list[str]:
    """Return the installed distributions of JAX accelerator plugins (CUDA, ROCm, TPU, Metal)."""
    names = set()
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(ACCELERATOR_DISTS):
            names.add(name)
    return sorted(names)


def cpu_only(platforms: str | None = None) -> bool:
    """Return whether JAX will compute on the CPU: by ``platforms`` (JAX_PLATFORMS), else plugins.

    ``platforms`` defaults to JAX's ``jax_platforms`` setting, which ``JAX_PLATFORMS`` sets.
    """
    if platforms is None:
        import jax

        platforms = jax.config.jax_platforms or ""
    if platforms.strip():
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not accelerator_plugins()


def wide_vectors(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Return whether the CPU is an AMD one with AVX-512 (Linux; False where unreadable)."""
    try:
        with open(cpuinfo) as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    fields = {}
    for line in head.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    vendor, cpu_flags = fields.get("vendor_id", ""), fields.get("flags", "").split()
    return vendor == "AuthenticAMD" and "avx512f" in cpu_flags


def machine_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[tuple[str, str], ...]:
    """Return the (name, value) flags for this machine: ``FLAGS``, plus the wide-vector one."""
    return FLAGS + (WIDE_VECTOR_FLAGS if wide_vectors(cpuinfo) else ())


def with_flags(xla_flags: str, flags=FLAGS) -> tuple[str, list[str]]:
    """Return (``xla_flags`` with each of ``flags`` it does not name appended, those added)."""
    named = {word.lstrip("-").split("=", 1)[0] for word in xla_flags.split()}
    added = [f"--{name}={value}" for name, value in flags if name not in named]
    return " ".join([xla_flags.strip(), *added]).strip(), added


def keep_freed_host_memory() -> bool:
    """Raise glibc's mmap/trim thresholds for this process; return whether they are set.

    Returns False where there is no glibc ``mallopt`` (macOS, musl). Calling it again changes
    nothing.
    """
    global _host_memory_kept
    if _host_memory_kept:
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
    _host_memory_kept = all(mallopt(param, value) == 1 for param, value in settings)
    return _host_memory_kept


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


def apply() -> list[str]:
    """Tune this process for XLA:CPU where that is safe; return what this call changed.

    Acts only on a CPU backend and before JAX creates its backends (else it logs why and
    returns []). Adds the measured flags missing from ``XLA_FLAGS`` (on the jaxlib versions
    and machines they were measured on), raises glibc's malloc thresholds, and logs the
    tcmalloc hint where glibc's malloc runs. Calling it again changes nothing.
    """
    global _flags_added
    if backends_initialized():
        log.warning("CPU tuning skipped: JAX's backends exist already (apply it before any JAX)")
        return []
    if not cpu_only():
        log.info("CPU tuning skipped: JAX computes on an accelerator")
        return []
    done = []
    if applicable():
        value, added = with_flags(os.environ.get("XLA_FLAGS", ""), machine_flags())
        if added:
            os.environ["XLA_FLAGS"] = value
            _flags_added += tuple(added)
        done += [f"XLA_FLAGS += {flag}" for flag in added]
    malloc = allocator()
    if malloc == "glibc":
        log.info(TCMALLOC_HINT)
        if not _host_memory_kept and keep_freed_host_memory():
            done.append(MALLOPT_DONE)
    return done


def apply_if_requested(flag_value: bool) -> list[str]:
    """Apply the tuning when ``requested(flag_value)``, logging what changed; return that."""
    if not requested(flag_value):
        return []
    done = apply()
    log.info("CPU tuning: %s", "; ".join(done) or "nothing to change")
    return done


def flags_added() -> tuple[str, ...]:
    """Return the flags this process added to ``XLA_FLAGS`` (benches record the whole value)."""
    return _flags_added


def host_memory_kept() -> bool:
    """Return whether this process raised glibc's malloc thresholds (benches record it)."""
    return _host_memory_kept
