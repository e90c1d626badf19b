"""Benchmarks of dag_jax against plain PyTorch references; figures go to BENCHMARKS.md.

    python -m dag_jax.bench sampler --model=tiny --batch=8 --steps=20 --repeats=3 \
        --json=/tmp/bench_tiny.json [--check] [--impl=both|dag_jax|torch_ref]

``<what>`` names an entry of ``BENCHES`` (name → function of ``Settings`` returning records).
Every record is ``{"bench", "impl", "metric", "value", "unit", "config"}``: impl is ``dag_jax``
or ``torch_ref``, config holds the settings and a description of the machine and devices.

sampler: trajectories/s of ``dag_jax.diffusion.sampler.rollout`` (CFG, η, log-probs, one jitted
program; compile time reported on its own) against an eager diffusers loop doing the same math
(``dag_jax.bench.torch_ref``), both on the same random weights: the torch UNet is built first and
its state dict converted for the Linen UNet. Metrics per impl:
  rollout_s           mean wall seconds of one batch rollout (after ``--warmup`` untimed runs;
                      the impls' runs alternate, so load changes hit both alike)
  rollout_min_s       fastest of the ``--repeats`` runs (least disturbed by other load)
  trajectories_per_s  batch / rollout_s
  unet_calls_per_s    steps / rollout_s; one call = one forward on the 2B-row [uncond; cond] batch
  unet_rows_per_s     2·batch·steps / rollout_s (per-image UNet evaluations)
  compile_s           (dag_jax) seconds to lower and compile the rollout
  achieved_tflops, mfu  rollout FLOPs (steps × the matmul and conv FLOPs of one guided UNet
                      call, ``dag_jax.bench.flops``; the same count for both impls) / rollout_s,
                      and that over the peak:
                      the published dense bf16 peak on GPU/TPU, a measured matmul on CPU
                      (config: peak_tflops, peak_source, rollout_gflop)
  speedup_vs_torch_ref  (dag_jax) its trajectories_per_s ÷ torch_ref's
  check_eps_max_abs_diff, check_eps_rel_l2_diff  (dag_jax, with --check) max |ε̃_jax − ε̃_torch|
                      and ‖ε̃_jax − ε̃_torch‖/‖ε̃_torch‖ at the first step; the check fails above
                      ``--check_tol`` (relative L2; default 1e-4 fp32, 0.1 bf16)
config also records the 1-minute load average before and after the timed runs.
Without torch/diffusers the torch reference is skipped with a message and the Linen UNet gets
Flax's default random init.

reward: images/s of each reward of ``dag_jax.rewards`` (``--reward=all`` or comma-separated names)
on a batch of ``--batch`` random ``--image_size`` images, with random-weight towers in ``--model``
shapes (``tiny`` or ``sd15-random``: CLIP ViT-L/14, OpenCLIP ViT-H-14, ImageReward's BLIP);
JAX-native rewards jitted (compile_s apart), host rewards eager. See ``dag_jax/bench_reward.py``.

tinyworld: reward and diversity before (base model) and after training ``configs/<task>.py:demo``
runs in the built-in tiny world, measured by ``dag_jax.eval.evaluate`` on the same noise, per
``--tasks`` × ``--algos`` × ``--seeds``; a mean ± std table.
See ``dag_jax/bench_tinyworld.py``.

ascent: is DDPO's gradient an ascent direction in the tiny world, and how strong: the cosine of
two independent gradient estimates and a paired ± line search of Adam's first step, per
``--tasks`` and ``--groups`` (trajectories sharing x_T). See ``dag_jax/bench_ascent.py``.

dbterms: the DB residual's parts per denoising step at the base model (log p_θ − log P_B and
the forward-looking reward's change, within groups of the last of ``--groups``), per ``--tasks``.
See ``dag_jax/bench_dbterms.py``.

memory: per-device bytes of the real DAG-DB ``grad_step`` of ``dag_jax.train.phases`` (LoRA + flow,
bf16 compute, remat, ``--micro_batch`` transitions, default 64) in ``--model`` shapes, compiled
(never run) on abstract sharded inputs on a ("data", "fsdp") mesh of all devices, per fsdp size
of ``--fsdp`` (default 1,2,4,8; on CPU use XLA_FLAGS=--xla_force_host_platform_device_count=8).
Metrics (``compiled.memory_analysis()``), per size N:
  fsdpN/param_bytes      the frozen UNet's shard per device
  fsdpN/argument_bytes, fsdpN/output_bytes, fsdpN/temp_bytes, fsdpN/total_bytes, fsdpN/compile_s
  param_bytes_ratio_fsdpN_vs_fsdp1   largest N's param_bytes ÷ fsdp 1's (SD1.5 target ≤ 0.2)

train: one optimizer step of ``train.update_window`` per ``--algos`` (ddpo, dag_db, dag_kl;
b2 is skipped, its step being ddpo's): ``--batch`` trajectories × ``--steps`` transitions in
micro-batches of ``--micro_batch`` (default 16), DAG's forward-looking rewards included (UNet
x̂₀, VAE decode, a mean-brightness JAX reward), against a PyTorch reference of the same loss
(diffusers UNet + peft LoRA on to_q/k/v/out, a torch flow built from diffusers blocks, AdamW)
on the same weights and trajectories. Metrics per impl, named ``ALGO/...``:
  step_s, step_min_s, transitions_per_s, first_step_s (dag_jax: with compilation), loss (first
  step, same inputs), achieved_tflops, mfu (the step's matmul and conv FLOPs without remat,
  ``dag_jax.bench.flops``, shared by both impls), speedup_vs_torch_ref and check_loss_rel_diff
  (dag_jax).
See ``dag_jax/bench_train.py``.

ops: the kernels of a tiny-model step alone at the shapes it runs them (3×3 convs of the UNet
and VAE, the UNet's and the flow network's attention), dag_jax's formulation vs PyTorch's:
fwd_ms, grad_ms (median of ``--repeats``) and check_max_rel_diff per op. See
``dag_jax/bench_ops.py``.
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
from absl import app, flags

from dag_jax.bench import flops
from dag_jax.bench.reward import bench_reward
from dag_jax.diffusion.sampler import guided_eps, rollout, sample_keys
from dag_jax.diffusion.schedule import make_schedule
from dag_jax.infra import hostmem, xla_cpu
from dag_jax.models.attention import ATTENTION_IMPLS
from dag_jax.models.unet import UNet2DConditionModel, UNetConfig
from dag_jax.pipeline import unet_shapes
from dag_jax.tinyworld import random_tiny as tiny
from dag_jax.weights.convert import torch_to_linen

IMPLS = ("dag_jax", "torch_ref")
RECORD_KEYS = ("bench", "impl", "metric", "value", "unit", "config")
CONTEXT_LEN = 77  # CLIP text tokens

SD15_UNET_CONFIG = dict(
    tiny.UNET_CONFIG,
    sample_size=64,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
MODELS = {"tiny": tiny.UNET_CONFIG, "sd15-random": SD15_UNET_CONFIG}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to benchmark and how; shared by every bench (each reads the fields it needs)."""

    model: str = "tiny"
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
    flow_once_per_state: bool = True  # memory/train benches: dag.flow_once_per_state
    fl_source: str = "current"  # train bench: dag.fl_source (current | sampling)
    json: str | None = None

    def impls(self) -> tuple[str, ...]:
        """Return the implementations to run, in order."""
        if self.impl == "both":
            return IMPLS
        if self.impl not in IMPLS:
            raise ValueError(f"--impl must be both, dag_jax or torch_ref, got {self.impl!r}")
        return (self.impl,)

    def latent_side(self) -> int:
        """Return the latent side length (the model's sample_size unless set)."""
        return self.resolution or int(MODELS[self.model]["sample_size"])


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


def host_cpu() -> str:
    """Return the host CPU model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Return a description of the host, the JAX device and the library versions."""
    dev = jax.devices()[0]
    return {
        "host_cpu": host_cpu(),
        "host_cores": _cpu_count(),
        "jax_device": f"{dev.platform}:{dev.device_kind}",
        "jax_device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "host_memory_kept": hostmem.is_applied(),
        "host_allocator": hostmem.allocator(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_count() -> int:
    """Return the number of CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


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


def unet_call_flops(unet_config: dict, settings: Settings) -> float:
    """Return the model FLOPs of one guided UNet call on the 2B-row [uncond; cond] batch.

    Counted on the program's jaxpr with the ``xla`` attention (``dag_jax.bench.flops``: matmul and
    convolution FLOPs, loop bodies × their trip count), on abstract inputs (nothing is
    allocated). The count is the model's, whatever kernels run; it is taken in a CPU-only
    subprocess on accelerator hosts, so the traced program is the CPU one everywhere.
    """
    if jax.default_backend() == "cpu":
        return _cpu_unet_call_flops(unet_config, settings)
    code = (
        "import json, sys; from dag_jax import bench; "
        "a = json.loads(sys.argv[1]); "
        "print(bench._cpu_unet_call_flops(a['config'], bench.Settings(**a['settings'])))"
    )
    arg = json.dumps({"config": unet_config, "settings": dataclasses.asdict(settings)})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code, arg], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def _cpu_unet_call_flops(unet_config: dict, settings: Settings) -> float:
    """Return ``unet_call_flops`` counted in this (CPU) process."""
    unet = linen_unet(unet_config, settings.dtype, "xla")
    inputs = sampler_inputs(settings, unet_config)
    eps_fn = lambda p, x, t, c: unet.apply({"params": p}, x, t, c).sample
    fn = lambda p, x, c, u: guided_eps(eps_fn, p, x, 500, c, u, settings.guidance)
    side = 2 ** len(unet.config.block_out_channels)
    params = jax.eval_shape(
        unet.init,
        jax.random.key(0),
        jnp.zeros((1, unet.config.in_channels, side, side)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, 1, unet.config.cross_attention_dim)),
    )["params"]
    return flops.model_flops(fn, params, inputs.x_T, inputs.context, inputs.uncond)


# --------------------------------------------------------------------------- sampler


@dataclasses.dataclass(frozen=True)
class SamplerInputs:
    """Host arrays both implementations start from."""

    x_T: np.ndarray  # (B, C, H, W) fp32 initial latents
    context: np.ndarray  # (B, 77, D) fp32 random "prompt embeddings"
    uncond: np.ndarray  # (B, 77, D) fp32 random "empty prompt" embeddings (rows equal)


def sampler_inputs(settings: Settings, unet_config: dict) -> SamplerInputs:
    """Return seeded random initial latents and text contexts for the sampler bench."""
    rng = np.random.default_rng(settings.seed)
    side, d = settings.latent_side(), int(unet_config["cross_attention_dim"])
    x_T = rng.standard_normal((settings.batch, unet_config["in_channels"], side, side))
    context = rng.standard_normal((settings.batch, CONTEXT_LEN, d))
    uncond = np.broadcast_to(rng.standard_normal((1, CONTEXT_LEN, d)), context.shape)
    f32 = lambda a: np.ascontiguousarray(a, np.float32)
    return SamplerInputs(f32(x_T), f32(context), f32(uncond))


def linen_unet(unet_config: dict, dtype: str, attention: str = "xla") -> UNet2DConditionModel:
    """Return the Linen UNet of a diffusers config with the given compute dtype."""
    return UNet2DConditionModel(
        UNetConfig.from_dict(unet_config), dtype=jnp.dtype(dtype), attention_impl=attention
    )


def default_init_params(unet: UNet2DConditionModel, seed: int) -> dict:
    """Return Flax-default random fp32 UNet params (used when torch is missing)."""
    cfg = unet.config
    side = 2 ** len(cfg.block_out_channels)
    x = jnp.zeros((1, cfg.in_channels, side, side), jnp.float32)
    ctx = jnp.zeros((1, 1, cfg.cross_attention_dim), jnp.float32)
    return jax.jit(unet.init)(jax.random.key(seed), x, jnp.zeros((1,), jnp.int32), ctx)["params"]


def prepare_dag_jax_sampler(
    unet: UNet2DConditionModel, params: dict, inputs: SamplerInputs, settings: Settings
) -> tuple[Callable[[], object], float]:
    """Return (a blocking call of the compiled rollout, seconds it took to compile)."""
    schedule = make_schedule(tiny.SCHEDULER_CONFIG, settings.steps)
    eps_fn = lambda p, x, t, c: unet.apply({"params": p}, x, t, c).sample

    def run(params, x_T, context, uncond, keys):
        return rollout(
            eps_fn,
            params,
            x_T,
            context,
            uncond,
            schedule,
            keys,
            guidance=settings.guidance,
            eta=settings.eta,
        )

    keys = sample_keys(jax.random.key(settings.seed), jnp.arange(settings.batch))
    args = (params, inputs.x_T, inputs.context, inputs.uncond, keys)
    args = jax.block_until_ready(jax.device_put(args))
    start = time.perf_counter()
    compiled = jax.jit(run).lower(*args).compile()
    compile_s = time.perf_counter() - start
    return lambda: jax.block_until_ready(compiled(*args)), compile_s


def prepare_torch_sampler(
    torch_unet, inputs: SamplerInputs, settings: Settings
) -> Callable[[], object]:
    """Return a blocking call of the eager PyTorch reference rollout."""
    import torch

    from dag_jax.bench import torch_ref as bench_torch

    dev = next(torch_unet.parameters()).device
    schedule = make_schedule(tiny.SCHEDULER_CONFIG, settings.steps)
    grid = {
        "timesteps": np.asarray(schedule.timesteps),
        "alpha_t": np.asarray(schedule.alpha_t),
        "alpha_s": np.asarray(schedule.alpha_s),
    }
    x_T, context, uncond = (
        torch.from_numpy(a).to(dev) for a in (inputs.x_T, inputs.context, inputs.uncond)
    )
    gen = torch.Generator(device=dev).manual_seed(settings.seed)
    autocast = bench_torch.autocast(dev, settings.dtype)

    def once():
        with autocast:
            bench_torch.rollout(
                torch_unet,
                x_T,
                context,
                uncond,
                generator=gen,
                guidance=settings.guidance,
                eta=settings.eta,
                **grid,
            )
        bench_torch.synchronize(dev)

    return once


def first_eps_diff(
    unet: UNet2DConditionModel, params: dict, torch_unet, inputs: SamplerInputs, settings: Settings
) -> tuple[float, float]:
    """Return (max |ε̃_jax − ε̃_torch|, ‖ε̃_jax − ε̃_torch‖ / ‖ε̃_torch‖) at the first step."""
    import torch

    from dag_jax.bench import torch_ref as bench_torch

    t0 = int(make_schedule(tiny.SCHEDULER_CONFIG, settings.steps).timesteps[0])
    eps_fn = lambda p, x, t, c: unet.apply({"params": p}, x, t, c).sample
    ours = jax.jit(lambda p, x, c, u: guided_eps(eps_fn, p, x, t0, c, u, settings.guidance))(
        params, inputs.x_T, inputs.context, inputs.uncond
    )
    dev = next(torch_unet.parameters()).device
    with torch.no_grad():
        x, c, u = (torch.from_numpy(a).to(dev) for a in (inputs.x_T, inputs.context, inputs.uncond))
        ref = bench_torch.guided_eps(
            torch_unet, x, torch.tensor(t0, device=dev), c, u, settings.guidance
        )
    ref = ref.cpu().numpy().astype(np.float64)
    diff = np.asarray(ours, np.float64) - ref
    rel = np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)
    return float(np.abs(diff).max()), float(rel)


def check_tolerance(settings: Settings) -> float:
    """Return the allowed relative L2 difference of ε̃ for the JAX compute dtype.

    bf16 gets 0.1: its ~3% rounding error per UNet output is amplified by the guidance
    (ε_u + w·(ε_c − ε_u)); a wrong weight conversion gives errors of order 1.
    """
    return settings.check_tol or (1e-4 if settings.dtype == "float32" else 0.1)


def timing_records(
    bench: str,
    impl: str,
    timing: Timing,
    settings: Settings,
    config: dict,
    rollout_flops: float = 0.0,
    peak: float = 0.0,
):
    """Return the rate records of one implementation's sampler timing (and MFU if counted)."""
    mean = timing.mean_s
    out = [
        record(bench, impl, "rollout_s", mean, "s", config),
        record(bench, impl, "rollout_min_s", min(timing.run_s), "s", config),
        record(bench, impl, "trajectories_per_s", settings.batch / mean, "traj/s", config),
        record(bench, impl, "unet_calls_per_s", settings.steps / mean, "calls/s", config),
        record(
            bench,
            impl,
            "unet_rows_per_s",
            2 * settings.batch * settings.steps / mean,
            "rows/s",
            config,
        ),
    ]
    if timing.compile_s is not None:
        out.append(record(bench, impl, "compile_s", timing.compile_s, "s", config))
    if rollout_flops and peak:
        achieved = rollout_flops / mean
        out.append(record(bench, impl, "achieved_tflops", achieved / 1e12, "TFLOP/s", config))
        out.append(record(bench, impl, "mfu", achieved / peak, "fraction", config))
    return out


def sampler_models(
    settings: Settings, unet_config: dict, use_torch: bool
) -> tuple[UNet2DConditionModel, dict, object, dict]:
    """Return (Linen UNet, its params, torch UNet or None, torch device info) on shared weights.

    With torch the diffusers UNet is built first and its state dict converted, so both compute
    the same function; without it the Linen UNet gets Flax's default init.
    """
    unet = linen_unet(unet_config, settings.dtype, settings.attention)
    if not use_torch:
        return unet, default_init_params(unet, settings.seed), None, {}
    from dag_jax.bench import torch_ref as bench_torch

    device = bench_torch.pick_device()
    torch_unet = bench_torch.build_unet(unet_config, settings.seed, device)
    params = torch_to_linen(bench_torch.state_dict_numpy(torch_unet), unet_shapes(unet), "unet")
    return unet, jax.device_put(params), torch_unet, bench_torch.describe(device)


def bench_sampler(settings: Settings) -> list[dict]:
    """Return records of the dag_jax rollout vs the eager PyTorch reference loop."""
    if settings.model not in MODELS:
        raise ValueError(f"--model must be one of {sorted(MODELS)}, got {settings.model!r}")
    unet_config = MODELS[settings.model]
    impls = settings.impls()
    wants_torch = "torch_ref" in impls or settings.check
    missing = torch_missing() if wants_torch else None
    if missing:
        print(f"[bench] {missing}: skipping the PyTorch reference (and --check)")
        impls = tuple(i for i in impls if i != "torch_ref")
    unet, params, torch_unet, torch_info = sampler_models(
        settings, unet_config, wants_torch and not missing
    )
    config = {**dataclasses.asdict(settings), "resolution": settings.latent_side()}
    config.pop("json")
    config.update(machine_info(), **torch_info)
    inputs = sampler_inputs(settings, unet_config)

    records = []
    if settings.check and torch_unet is not None:
        diff, rel = first_eps_diff(unet, params, torch_unet, inputs, settings)
        tol = check_tolerance(settings)
        print(f"[bench] check: eps max abs diff {diff:.3g}, relative L2 diff {rel:.3g}")
        if not rel <= tol:
            raise AssertionError(f"first-step eps differ by {rel:.3g} (rel. L2) > {tol:.3g}")
        records += [
            record("sampler", "dag_jax", "check_eps_max_abs_diff", diff, "abs", config),
            record("sampler", "dag_jax", "check_eps_rel_l2_diff", rel, "rel", config),
        ]
    calls, compile_s = {}, {}
    for impl in impls:
        if impl == "dag_jax":
            calls[impl], compile_s[impl] = prepare_dag_jax_sampler(unet, params, inputs, settings)
        else:
            calls[impl] = prepare_torch_sampler(torch_unet, inputs, settings)
    rollout_flops = settings.steps * unet_call_flops(unet_config, settings)
    peak, config["peak_source"] = peak_flops(settings.dtype)
    config["peak_tflops"] = peak / 1e12
    config["rollout_gflop"] = rollout_flops / 1e9
    config["loadavg_1min_before"] = os.getloadavg()[0]
    runs = timed_runs(calls, settings.repeats, settings.warmup)
    config["loadavg_1min_after"] = os.getloadavg()[0]
    timings = {impl: Timing(run_s=runs[impl], compile_s=compile_s.get(impl)) for impl in impls}
    for impl, timing in timings.items():
        records += timing_records("sampler", impl, timing, settings, config, rollout_flops, peak)
    if len(timings) == 2:
        speedup = timings["torch_ref"].mean_s / timings["dag_jax"].mean_s  # = ratio of traj/s
        records.append(record("sampler", "dag_jax", "speedup_vs_torch_ref", speedup, "x", config))
    return records


# --------------------------------------------------------------------------- registry and CLI


def bench_toy2d(settings: Settings) -> list[dict]:
    """Return the records of the 2-D proof (``probes.toy2d``; imported only when asked for)."""
    from dag_jax.bench.probes import toy2d

    return toy2d.bench_toy2d(settings)


def bench_tinyworld(settings: Settings) -> list[dict]:
    """Return the reward rise of demo runs in the tiny world (``dag_jax.bench.tinyworld``)."""
    from dag_jax.bench import tinyworld as tw

    records = tw.bench_tinyworld(settings)
    print(tw.format_rise(records))
    return records


def bench_memory(settings: Settings) -> list[dict]:
    """Return per-device memory of the sharded train step per fsdp size (``bench_train``)."""
    from dag_jax.bench import train_step as bench_train

    return bench_train.bench_memory(settings)


def bench_train(settings: Settings) -> list[dict]:
    """Return one optimizer step's speed per algorithm vs PyTorch (``bench_train``)."""
    from dag_jax.bench import train_step as bt

    return bt.bench_train(settings)


def bench_dbterms(settings: Settings) -> list[dict]:
    """Return the per-step parts of the DB residual in the tiny world (``bench_dbterms``)."""
    from dag_jax.bench.probes import dbterms as bd

    return bd.bench_dbterms(settings)


def bench_ascent(settings: Settings) -> list[dict]:
    """Return the policy-gradient line search of the tiny world (``probes.ascent``)."""
    from dag_jax.bench.probes import ascent as bench_ascent

    return bench_ascent.bench_ascent(settings)


def bench_ops(settings: Settings) -> list[dict]:
    """Return per-op milliseconds, dag_jax vs PyTorch (``dag_jax.bench.ops``)."""
    from dag_jax.bench import ops as bench_ops

    return bench_ops.bench_ops(settings)


BENCHES: dict[str, Callable[[Settings], list[dict]]] = {
    "ascent": bench_ascent,
    "ops": bench_ops,
    "dbterms": bench_dbterms,
    "sampler": bench_sampler,
    "reward": bench_reward,
    "toy2d": bench_toy2d,
    "tinyworld": bench_tinyworld,
    "memory": bench_memory,
    "train": bench_train,
}


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


def run(what: str, settings: Settings) -> list[dict]:
    """Run bench ``what``, print its table, write ``settings.json`` if set; return the records."""
    if what not in BENCHES:
        raise ValueError(f"unknown benchmark {what!r}; known: {', '.join(sorted(BENCHES))}")
    xla_cpu.tune_for_cpu()
    records = BENCHES[what](settings)
    print(format_table(records))
    if settings.json:
        print(f"[bench] wrote {write_json(records, settings.json)}")
    return records


FLAGS = flags.FLAGS


def settings_from_flags() -> Settings:
    """Return Settings from the parsed command-line flags."""
    names = [f.name for f in dataclasses.fields(Settings)]
    return Settings(**{name: FLAGS[name].value for name in names})


def define_flags() -> None:
    """Define this entry point's command-line flags (only when run as a program)."""
    flags.DEFINE_enum("model", "tiny", sorted(MODELS), "UNet shapes (random weights)")
    flags.DEFINE_integer("batch", 8, "trajectories per rollout")
    flags.DEFINE_integer("steps", 20, "DDIM steps")
    flags.DEFINE_integer("resolution", 0, "latent side length; 0 = the model's sample_size")
    flags.DEFINE_integer("repeats", 3, "timed runs")
    flags.DEFINE_integer("warmup", 1, "untimed runs before timing (after compilation)")
    flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16"], "compute dtype (torch_ref: autocast)"
    )
    flags.DEFINE_enum("attention", "xla", list(ATTENTION_IMPLS), "dag_jax attention kernel")
    flags.DEFINE_enum("impl", "both", ["both", *IMPLS], "implementations to run")
    flags.DEFINE_float("guidance", 5.0, "classifier-free guidance scale")
    flags.DEFINE_float("eta", 1.0, "DDIM eta")
    flags.DEFINE_integer("seed", 0, "random seed")
    flags.DEFINE_bool("check", False, "assert both implementations give the same first-step eps")
    flags.DEFINE_float("check_tol", 0.0, "--check tolerance (relative L2 of eps); 0 = by dtype")
    flags.DEFINE_string("reward", "all", "reward bench: 'all' or comma-separated reward names")
    flags.DEFINE_integer("image_size", 0, "reward bench: image side; 0 = by --model")
    flags.DEFINE_string("tasks", "compressibility,alignment", "tinyworld: configs/<task>.py:demo")
    flags.DEFINE_string("algos", "ddpo,dag_db,dag_kl,b2", "tinyworld, train: algorithms")
    flags.DEFINE_integer("seeds", 1, "tinyworld: number of seeds, from --seed")
    flags.DEFINE_integer("epochs", 0, "tinyworld: epochs per run (0 = the demo config's)")
    flags.DEFINE_string("workdir", "", "tinyworld: folder for the runs (default: temporary)")
    flags.DEFINE_string(
        "groups", "1,8", "ascent: sample.group sizes (trajectories sharing x_T); dbterms: the last"
    )
    flags.DEFINE_string("lrs", "1e-3,3e-3,1e-2", "ascent: step sizes of the line search")
    flags.DEFINE_integer(
        "micro_batch", 0, "memory/train: transitions per train step (0: memory 64, train 16)"
    )
    flags.DEFINE_string("fsdp", "1,2,4,8", "memory: fsdp sizes of the (data, fsdp) mesh")
    flags.DEFINE_bool(
        "flow_once_per_state",
        True,
        "memory/train: DAG's F̃ once per state per window (false: on [x_t; x_s] in every "
        "micro-batch, as released)",
    )
    flags.DEFINE_enum(
        "fl_source",
        "current",
        ["current", "sampling"],
        "train: where DAG's forward-looking x̂₀ come from (dag.fl_source; sampling: kept by "
        "the sampler, no UNet pass in the step)",
    )
    flags.DEFINE_string("json", None, "write the records to this JSON file")


def main(argv):
    if len(argv) != 2:
        raise app.UsageError(
            f"usage: python -m dag_jax.bench <{'|'.join(sorted(BENCHES))}> [flags]"
        )
    run(argv[1], settings_from_flags())


def cli() -> None:
    """Console entry point: parse the flags and run ``main``."""
    define_flags()
    app.run(main)
