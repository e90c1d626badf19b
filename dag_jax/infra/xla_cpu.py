"""XLA:CPU compiler flags that dag_jax sets for speed, before JAX creates its CPU backend.

jaxlib 0.10 hands every convolution to YNNPACK ("ynn fusions"). On x86-64, at the UNet's and
VAE's shapes, these convs take 1.1–2.2× the time of XLA's Eigen convolutions forward and
1.5–2.8× with their gradient (the filter gradient alone: 3–4×).
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
flag it does not know. So the flags are only added:

- for the jaxlib versions they were measured on (``TESTED_JAXLIB``) and on x86-64;
- while no backend exists yet (entry points call ``tune_for_cpu()`` before touching a device);
- when ``XLA_FLAGS`` does not name the flag already (the user's value wins);
- unless ``DAG_JAX_XLA_CPU_FLAGS=0``.

They only change how XLA:CPU computes (which library runs a convolution, how wide its
vectors are), not the results beyond fp32 rounding, and do nothing on GPU or TPU backends.
"""

from __future__ import annotations

import logging
import os
import platform

import jaxlib

from dag_jax.infra import hostmem

log = logging.getLogger(__name__)

ENV_VAR = "DAG_JAX_XLA_CPU_FLAGS"
# (flag name, value) pairs, in the order they are appended to XLA_FLAGS.
FLAGS = (("xla_cpu_experimental_ynn_fusion_type", "-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"),)
# added on top of FLAGS where ``wide_vectors()`` holds
WIDE_VECTOR_FLAGS = (("xla_cpu_prefer_vector_width", "512"),)
TESTED_JAXLIB = ((0, 10), (0, 11))  # [first, past-the-end) major.minor measured with FLAGS
X86_64 = ("x86_64", "amd64")

_applied: tuple[str, ...] = ()


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


def opted_out() -> bool:
    """Return whether ``DAG_JAX_XLA_CPU_FLAGS`` turns the flags off."""
    return hostmem.switched_off(ENV_VAR)


def backends_initialized() -> bool:
    """Return whether JAX has created its backends (after which XLA_FLAGS is not read again)."""
    from jax._src import xla_bridge

    probe = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(probe()) if probe is not None else bool(getattr(xla_bridge, "_backends", {}))


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


def set_default_flags() -> tuple[str, ...]:
    """Append ``FLAGS`` to ``XLA_FLAGS`` where that is safe and useful; return those added.

    Returns () when opted out, on an untested jaxlib or machine, when the backends already
    exist (then it logs why) or when the user's ``XLA_FLAGS`` sets them. Idempotent.
    """
    global _applied
    if _applied or opted_out() or not applicable():
        return _applied
    if backends_initialized():
        log.info("XLA:CPU flags not set: JAX's backends exist already (call tune_for_cpu first)")
        return ()
    value, added = with_flags(os.environ.get("XLA_FLAGS", ""), machine_flags())
    if added:
        os.environ["XLA_FLAGS"] = value
    _applied = tuple(added)
    return _applied


def applied() -> tuple[str, ...]:
    """Return the flags this process added to ``XLA_FLAGS`` (benches record the whole value)."""
    return _applied


def tune_for_cpu() -> bool:
    """Set the XLA:CPU flags, then keep freed host memory when the backend is the CPU.

    Entry points call this before anything touches a device (after
    ``jax.distributed.initialize``, which creates no backend). Returns whether host memory
    is kept (``hostmem.tune_for_cpu``).
    """
    set_default_flags()
    return hostmem.tune_for_cpu()
