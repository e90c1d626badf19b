"""What every benchmark shares: settings, records, timing, the machine, peak FLOP/s.

A benchmark is a function of ``Settings`` returning records (``python -m dag_jax.bench WHAT``,
see ``dag_jax.bench.__main__``). Every record is ``{"bench", "impl", "metric", "value",
"unit", "config"}``: impl is ``dag_jax`` or ``torch_ref`` (or what the bench compares), config
holds the settings and a description of the machine and devices (``machine_info``).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.infra import cpu_tuning

IMPLS = ("dag_jax", "torch_ref")
RECORD_KEYS = ("bench", "impl", "metric", "value", "unit", "config")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to benchmark and how; shared by every bench (each reads the fields it needs)."""

    model: str = "tiny"  # a key of unets.MODELS (the reward bench: reward.REWARD_MODELS)
    batch: int = 8
    steps: int = 20
    resolution: int = 0  # latent side; 0 = the model's sample_size
    repeats: int = 3
    warmup: int = 1
    dtype: str = "float32"  # compute dtype (JAX: params fp32; torch_ref: autocast)
    attention: str = "xla"  # dag_jax attention formulation: xla | jax | cudnn
    impl: str = "both"
    guidance: float = 5.0
    eta: float = 1.0
    seed: int = 0
    check: bool = False
    check_tol: float = 0.0  # relative L2 of ε̃; 0 = by dtype: 1e-4 (fp32) or 0.1 (bf16)
    reward: str = "all"  # reward bench: "all" or comma-separated reward names
    image_size: int = 0  # reward bench: image side; 0 = by model (tiny 64, sd15-random 512)
    tasks: str = "compressibility,alignment"  # tinyworld bench: configs/<task>.py:demo
    algos: str = "ddpo,dag_db,dag_kl,b2"  # tinyworld bench
    seeds: int = 1  # tinyworld bench: seeds seed, seed+1, ...
    epochs: int = 0  # tinyworld bench: 0 = the demo config's
    workdir: str = ""  # tinyworld bench: where runs are kept ("" = a temporary folder)
    groups: str = "1,8"  # ascent bench: sample.group sizes; dbterms: the last one
    lrs: str = "1e-3,3e-3,1e-2"  # ascent bench: Adam first-step sizes of the line search
    micro_batch: int = 0  # memory/train benches: transitions per train step; 0 = by bench
    fsdp: str = "1,2,4,8"  # memory bench: fsdp sizes (each must divide the device count)
    fl_source: str = "current"  # train bench: dag.fl_source (current | sampling)
    trainable: str = "lora"  # memory bench: train.trainable (lora | unet: full fine-tuning)
    size: str = "tiny"  # epoch bench: model shapes, tiny | sd15 (random weights)
    timeout: float = 540.0  # epoch bench: seconds the whole command may take
    json: str | None = None

    def impls(self) -> tuple[str, ...]:
        """Return the implementations to run, in order."""
        if self.impl == "both":
            return IMPLS
        if self.impl not in IMPLS:
            raise ValueError(f"--impl must be both, dag_jax or torch_ref, got {self.impl!r}")
        return (self.impl,)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated runs (and of compilation, where there is one)."""

    run_s: tuple[float, ...]
    compile_s: float | None = None

    @property
    def mean_s(self) -> float:
        """Return the mean seconds of one run."""
        return float(np.mean(self.run_s))


def record(bench: str, impl: str, metric: str, value: float, unit: str, config: dict) -> dict:
    """Return one benchmark record with the documented keys."""
    return dict(bench=bench, impl=impl, metric=metric, value=float(value), unit=unit, config=config)


def torch_missing() -> str | None:
    """Return why the torch reference cannot run (a missing package), or None."""
    for name in ("torch", "diffusers"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed"
    return None


# --------------------------------------------------------------------------- the machine


def host_cpu() -> str:
    """Return the host CPU model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    """Return the number of CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_info() -> dict:
    """Return a description of the host, the JAX device and the library versions."""
    dev = jax.devices()[0]
    return {
        "host_cpu": host_cpu(),
        "host_cores": cpu_count(),
        "jax_device": f"{dev.platform}:{dev.device_kind}",
        "jax_device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "host_memory_kept": cpu_tuning.host_memory_kept(),
        "host_allocator": cpu_tuning.allocator(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def settings_config(settings: Settings) -> dict:
    """Return a records' config: the settings (less ``json``) and ``machine_info()``."""
    config = dataclasses.asdict(settings)
    config.pop("json")
    return {**config, **machine_info()}


# --------------------------------------------------------------------------- timing


def timed_runs(
    fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, tuple[float, ...]]:
    """Return each function's wall seconds over ``repeats`` calls, after ``warmup`` untimed ones.

    The functions take turns (a, b, a, b, ...) so that a change in machine load mid-run hits
    all of them alike. Each must block until its work is done (block_until_ready / synchronize).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: tuple(t) for name, t in times.items()}


# --------------------------------------------------------------------------- FLOPs and MFU

# Dense bf16 peak FLOP/s from the vendors' datasheets (SPEC §10: MFU divides by these on
# GPU/TPU), matched against ``device_kind`` by substring, most specific first.
PUBLISHED_BF16_PEAK = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),  # v5e / "TPU v5 lite"
    ("TPU v4", 275e12),
)


def measured_matmul_peak(dtype: str, n: int = 4096, repeats: int = 5) -> float:
    """Return the FLOP/s of the best of ``repeats`` jitted n×n×n matmuls on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def peak_flops(dtype: str) -> tuple[float, str]:
    """Return (peak FLOP/s, where it comes from) for MFU on the default JAX device.

    GPU/TPU: the published dense bf16 peak of the device kind (whatever the compute dtype, so
    fp32 runs show how far they are from the chip's limit). CPU, or an unknown accelerator: a
    measured large matmul in the compute dtype.
    """
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        for name, peak in PUBLISHED_BF16_PEAK:
            if name.lower() in dev.device_kind.lower():
                return peak, f"published dense bf16 peak of {name}"
    n = 2048 if dev.platform == "cpu" else 8192
    return measured_matmul_peak(dtype, n), f"measured {n}³ {dtype} matmul on {dev.device_kind}"


def float_on_cpu(target: str, settings: Settings, *args) -> float:
    """Return ``target(settings, *args)``, a float, computed in a CPU-only subprocess.

    ``target`` is ``"module:function"`` and ``args`` are JSON values. The FLOP counts use it on
    accelerator hosts, so that the program they trace is the CPU one everywhere.
    """
    code = (
        "import importlib, json, sys; from dag_jax.bench.common import Settings; "
        "a = json.loads(sys.argv[1]); module, name = a['target'].split(':'); "
        "fn = getattr(importlib.import_module(module), name); "
        "print(fn(Settings(**a['settings']), *a['args']))"
    )
    arg = json.dumps({"target": target, "settings": dataclasses.asdict(settings), "args": args})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", code, arg], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- output


def format_table(records: list[dict]) -> str:
    """Return the records as an aligned text table (impl, metric, value, unit)."""
    rows = [("impl", "metric", "value", "unit")]
    rows += [(r["impl"], r["metric"], f"{r['value']:.4g}", r["unit"]) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def write_json(records: list[dict], path: str | Path) -> Path:
    """Write the records as a JSON list; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2))
    return path
