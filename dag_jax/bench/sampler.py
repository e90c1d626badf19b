"""Sampler throughput, dag_jax vs an eager PyTorch loop: ``python -m dag_jax.bench sampler``.

    python -m dag_jax.bench sampler --model=tiny --batch=8 --steps=20 --repeats=3 \
        --json=/tmp/bench_tiny.json [--check] [--impl=both|dag_jax|torch_ref]

Trajectories/s of ``dag_jax.diffusion.sampler.rollout`` (CFG, η, log-probs, one jitted
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
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.bench import flops
from dag_jax.bench.common import (
    Settings,
    Timing,
    float_on_cpu,
    peak_flops,
    record,
    settings_config,
    timed_runs,
    torch_missing,
)
from dag_jax.bench.unets import (
    SamplerInputs,
    abstract_params,
    default_init_params,
    latent_side,
    linen_unet,
    sampler_inputs,
    unet_config,
)
from dag_jax.diffusion.sampler import guided_eps, rollout, sample_keys
from dag_jax.diffusion.schedule import make_schedule
from dag_jax.models.unet import UNet2DConditionModel
from dag_jax.pipeline import unet_shapes
from dag_jax.tinyworld import random_tiny as tiny
from dag_jax.weights.convert import torch_to_linen


def unet_call_flops(settings: Settings) -> float:
    """Return the model FLOPs of one guided UNet call on the 2B-row [uncond; cond] batch.

    Counted on the program's jaxpr with the ``xla`` attention (``dag_jax.bench.flops``: matmul and
    convolution FLOPs, loop bodies × their trip count), on abstract inputs (nothing is
    allocated). The count is the model's, whatever kernels run; it is taken in a CPU-only
    subprocess on accelerator hosts, so the traced program is the CPU one everywhere.
    """
    if jax.default_backend() == "cpu":
        return cpu_unet_call_flops(settings)
    return float_on_cpu("dag_jax.bench.sampler:cpu_unet_call_flops", settings)


def cpu_unet_call_flops(settings: Settings) -> float:
    """Return ``unet_call_flops`` counted in this (CPU) process."""
    unet = linen_unet(unet_config(settings), settings.dtype, "xla")
    inputs = sampler_inputs(settings)
    eps_fn = lambda p, x, t, c: unet.apply({"params": p}, x, t, c).sample
    fn = lambda p, x, c, u: guided_eps(eps_fn, p, x, 500, c, u, settings.guidance)
    params = abstract_params(unet)
    return flops.model_flops(fn, params, inputs.x_T, inputs.context, inputs.uncond)


def schedule_grid(settings: Settings) -> dict[str, np.ndarray]:
    """Return the DDIM schedule's timesteps, alpha_t and alpha_s as host arrays."""
    schedule = make_schedule(tiny.SCHEDULER_CONFIG, settings.steps)
    return {
        "timesteps": np.asarray(schedule.timesteps),
        "alpha_t": np.asarray(schedule.alpha_t),
        "alpha_s": np.asarray(schedule.alpha_s),
    }


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
    from dag_jax.bench import torch_ref

    return torch_ref.rollout_call(
        torch_unet,
        inputs.x_T,
        inputs.context,
        inputs.uncond,
        schedule_grid(settings),
        seed=settings.seed,
        dtype=settings.dtype,
        guidance=settings.guidance,
        eta=settings.eta,
    )


def first_eps_diff(
    unet: UNet2DConditionModel, params: dict, torch_unet, inputs: SamplerInputs, settings: Settings
) -> tuple[float, float]:
    """Return (max |ε̃_jax − ε̃_torch|, ‖ε̃_jax − ε̃_torch‖ / ‖ε̃_torch‖) at the first step."""
    from dag_jax.bench import torch_ref

    t0 = int(schedule_grid(settings)["timesteps"][0])
    eps_fn = lambda p, x, t, c: unet.apply({"params": p}, x, t, c).sample
    ours = jax.jit(lambda p, x, c, u: guided_eps(eps_fn, p, x, t0, c, u, settings.guidance))(
        params, inputs.x_T, inputs.context, inputs.uncond
    )
    ref = torch_ref.guided_eps_numpy(
        torch_unet, inputs.x_T, t0, inputs.context, inputs.uncond, settings.guidance
    )
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
    impl: str,
    timing: Timing,
    settings: Settings,
    config: dict,
    rollout_flops: float = 0.0,
    peak: float = 0.0,
) -> list[dict]:
    """Return the rate records of one implementation's sampler timing (and MFU if counted)."""
    mean = timing.mean_s
    rows = 2 * settings.batch * settings.steps
    rec = lambda metric, value, unit: record("sampler", impl, metric, value, unit, config)
    out = [
        rec("rollout_s", mean, "s"),
        rec("rollout_min_s", min(timing.run_s), "s"),
        rec("trajectories_per_s", settings.batch / mean, "traj/s"),
        rec("unet_calls_per_s", settings.steps / mean, "calls/s"),
        rec("unet_rows_per_s", rows / mean, "rows/s"),
    ]
    if timing.compile_s is not None:
        out.append(rec("compile_s", timing.compile_s, "s"))
    if rollout_flops and peak:
        achieved = rollout_flops / mean
        out.append(rec("achieved_tflops", achieved / 1e12, "TFLOP/s"))
        out.append(rec("mfu", achieved / peak, "fraction"))
    return out


def sampler_models(
    settings: Settings, use_torch: bool
) -> tuple[UNet2DConditionModel, dict, object, dict]:
    """Return (Linen UNet, its params, torch UNet or None, torch device info) on shared weights.

    With torch the diffusers UNet is built first and its state dict converted, so both compute
    the same function; without it the Linen UNet gets Flax's default init.
    """
    unet = linen_unet(unet_config(settings), settings.dtype, settings.attention)
    if not use_torch:
        return unet, default_init_params(unet, settings.seed), None, {}
    from dag_jax.bench import torch_ref

    device = torch_ref.pick_device()
    torch_unet = torch_ref.build_unet(unet_config(settings), settings.seed, device)
    params = torch_to_linen(torch_ref.state_dict_numpy(torch_unet), unet_shapes(unet), "unet")
    return unet, jax.device_put(params), torch_unet, torch_ref.describe(device)


def bench_sampler(settings: Settings) -> list[dict]:
    """Return records of the dag_jax rollout vs the eager PyTorch reference loop."""
    unet_config(settings)  # a bad --model fails before any work
    impls = settings.impls()
    wants_torch = "torch_ref" in impls or settings.check
    missing = torch_missing() if wants_torch else None
    if missing:
        print(f"[bench] {missing}: skipping the PyTorch reference (and --check)")
        impls = tuple(i for i in impls if i != "torch_ref")
    unet, params, torch_unet, torch_info = sampler_models(settings, wants_torch and not missing)
    config = {**settings_config(settings), "resolution": latent_side(settings), **torch_info}
    inputs = sampler_inputs(settings)

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
    rollout_flops = settings.steps * unet_call_flops(settings)
    peak, config["peak_source"] = peak_flops(settings.dtype)
    config["peak_tflops"] = peak / 1e12
    config["rollout_gflop"] = rollout_flops / 1e9
    config["loadavg_1min_before"] = os.getloadavg()[0]
    runs = timed_runs(calls, settings.repeats, settings.warmup)
    config["loadavg_1min_after"] = os.getloadavg()[0]
    timings = {impl: Timing(run_s=runs[impl], compile_s=compile_s.get(impl)) for impl in impls}
    for impl, timing in timings.items():
        records += timing_records(impl, timing, settings, config, rollout_flops, peak)
    if len(timings) == 2:
        speedup = timings["torch_ref"].mean_s / timings["dag_jax"].mean_s  # = ratio of traj/s
        records.append(record("sampler", "dag_jax", "speedup_vs_torch_ref", speedup, "x", config))
    return records
