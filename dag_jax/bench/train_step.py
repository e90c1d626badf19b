"""A train step's memory and speed: ``python -m dag_jax.bench memory`` and ``... train``.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m dag_jax.bench memory --model=sd15-random [--fsdp=1,2,4,8] [--micro_batch=64]
    python -m dag_jax.bench train --model=tiny --algos=ddpo,dag_db,dag_kl --batch=4 --steps=4

Both benches build the real train program of ``dag_jax.train.phases`` (``build_phases``: the same
``grad_step``, ``fl_rewards`` and ``apply``) around a UNet of ``--model``'s shapes with random
weights (``unets.MODELS``), a VAE of the same family (``VAE_CONFIGS``; only DAG's
forward-looking rewards decode), the flow network and LoRA of ``dag_jax/configs/base.py``, and a
tiny JAX-native reward (mean brightness). Text encoding is not part of a train step; prompts
enter as random (77, D) embeddings.

memory: compiles (never runs) the DAG-DB micro-step of one ``--micro_batch`` (default: the
released 64; ``grad_step_per_state``, as ``train`` runs it) on a ("data", "fsdp") mesh of all
devices for each fsdp size of ``--fsdp``, with the released train settings (bf16 compute, remat,
fp32 params, a 256-row context table): every input is a ``jax.ShapeDtypeStruct`` carrying its
sharding, so no weight is ever allocated. ``--model=tiny`` shards leaves from 2^10 elements
(train's 2^18 would shard none of them).
Records per fsdp size N (``config["fsdp"]`` too), per device, from
``compiled.memory_analysis()``:
  fsdpN/param_bytes      the frozen UNet's shard (from its FSDP shardings)
  fsdpN/argument_bytes   all inputs: frozen shard, LoRA + flow, grad accumulator, micro-batch
  fsdpN/output_bytes, fsdpN/temp_bytes   outputs and XLA's temporaries (backend-specific:
                         on CPU, XLA:CPU's buffer assignment, not what a GPU/TPU compiler gives)
  fsdpN/total_bytes      argument + output + temp − alias
  fsdpN/compile_s        seconds to lower and compile
  param_bytes_ratio_fsdpN_vs_fsdp1   the largest size's param_bytes over fsdp 1's (target ≤ 0.2
                         for SD1.5 at fsdp 8)
  fsdpN/trainable_bytes, fsdpN/opt_state_bytes   the trainable tree's and its AdamW state's
                         shards (LoRA and flow replicated)

``--trainable=unet`` (``train.trainable``, full fine-tuning): the UNet is the trainable tree
(no frozen copy), sharded with the flow and the AdamW moments on "fsdp" by the same rule, and the
step constrains its gradient sum to those shardings. param_bytes is then the trained UNet's
shard, and per fsdp size also:
  fsdpN/param_opt_bytes  trainable_bytes + opt_state_bytes (params plus optimizer state)
  fsdpN/apply_argument_bytes, fsdpN/apply_temp_bytes   the AdamW update program (``apply``)
  param_opt_bytes_ratio_fsdpN_vs_fsdp1   the largest size's param_opt_bytes over fsdp 1's
                         (target ≤ 0.15 for SD1.5 at fsdp 8)

train: one optimizer step of ``train.update.update_window`` per algorithm of ``--algos`` (ddpo,
dag_db, dag_kl): ``--batch`` trajectories of ``--steps`` steps (sampled once with the dag_jax
sampler, untimed), their ``batch·steps`` transitions in micro-batches of ``--micro_batch``
(default 16) in the objective's row order (shuffled; DAG-KL: leave-one-out groups of distinct
trajectories, ``update.window_rows``) accumulated into one AdamW update, and for DAG first the
forward-looking rewards of every state (x̂₀ by the UNet, or with ``--fl_source=sampling`` kept
by the untimed sampler as ``dag.fl_source``; VAE decode, reward) and F̃_φ of every state (as
``train``), whose VJP over the states ends the step. Against it the PyTorch reference
(``dag_jax.bench.torch_ref_train``): diffusers UNet with a peft LoRA on to_q/k/v/out, the same
DDIM log-prob math, the same losses, a torch flow network built from diffusers blocks evaluated
as released (on [x_t; x_s] in every micro-batch), torch AdamW; same weights, trajectories, row
order and row weights. torch_ref always takes x̂₀^cond from a UNet pass with the current θ
(released); with ``--fl_source=sampling`` the timed dag_jax step reads them from the trajectory
instead, which is exact here (the timed step is the first after sampling, θ = θ_old), and the
first-step losses still agree. Records per algorithm (metric ``ALGO/...``, ``config["algo"]``)
and impl:
  step_s, step_min_s     mean and fastest wall seconds of one optimizer step over ``--repeats``
                         (after ``--warmup`` untimed steps, the first of which also compiles
                         and gives ``loss``; the impls take turns)
  transitions_per_s      batch·steps / step_s
  first_step_s           the first step (dag_jax: including compilation)
  loss                   the first step's loss (mean over micro-batches), same inputs for both
  achieved_tflops, mfu   the step's FLOPs (``dag_jax.bench.flops``: matmuls and convs of the
                         dag_jax programs the step runs, without remat; the same count for
                         both impls, so torch's extra flow evaluations are not counted as
                         model FLOPs) / step_s, and that over the peak
  speedup_vs_torch_ref   (dag_jax) its transitions_per_s ÷ torch_ref's
  check_loss_rel_diff    (dag_jax) |loss_jax − loss_torch| / |loss_torch|
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax import rewards
from dag_jax.algos.transitions import Transitions
from dag_jax.bench import flops
from dag_jax.bench.common import (
    Settings,
    float_on_cpu,
    peak_flops,
    record,
    settings_config,
    timed_runs,
    torch_missing,
)
from dag_jax.bench.unets import (
    CONTEXT_LEN,
    default_init_params,
    latent_side,
    linen_unet,
    sampler_inputs,
    unet_config,
)
from dag_jax.diffusion.sampler import Trajectory, rollout, sample_keys
from dag_jax.diffusion.schedule import make_schedule
from dag_jax.infra import parallel
from dag_jax.models.lora import LoRAConfig
from dag_jax.models.unet import UNet2DConditionModel
from dag_jax.models.vae import AutoencoderKL, VAEConfig
from dag_jax.pipeline import Pipeline, unet_shapes, vae_shapes
from dag_jax.tinyworld import random_tiny as tiny
from dag_jax.train import objectives
from dag_jax.train.collect import Collected
from dag_jax.train.config import (
    TRAINABLES,
    default_config,
    fl_from_sampling,
    flow_per_state,
    trains_unet,
    validate,
)
from dag_jax.train.phases import Context, Phases, build_phases
from dag_jax.train.run import Model, init_trainable, make_flow, make_tx, without_frozen_unet
from dag_jax.train.state import TrainState
from dag_jax.train.update import micro_batch_shardings, update_window, window_rows
from dag_jax.weights.convert import torch_to_linen

SD15_VAE_CONFIG = dict(
    tiny.VAE_CONFIG,
    sample_size=512,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
)
VAE_CONFIGS = {"tiny": tiny.VAE_CONFIG, "sd15-random": SD15_VAE_CONFIG}
TRAIN_ALGOS = ("ddpo", "dag_db", "dag_kl")
MEMORY_ALGO = "dag_db"
DEFAULT_TRAIN_MICRO_BATCH = 16
TINY_FLOW = dict(block_out_channels=(32, 32), attention_heads=4)
TINY_MIN_SHARD_SIZE = 2**10


# --------------------------------------------------------------------------- shared set-up


def train_config(settings: Settings, algo: str, fsdp: int = 1, *, released: bool = False):
    """Return a ``configs/base.py`` config for ``algo`` at the bench's sizes.

    ``released`` keeps the released train settings (bf16, remat, micro-batch 64, 256
    trajectories per update); otherwise ``--dtype`` applies without remat, ``--batch``
    trajectories make one update and the micro-batch defaults to 16.
    """
    c = default_config()
    c.algo = algo
    c.attention = settings.attention
    if not released:
        c.dtype, c.remat = settings.dtype, False
        c.train.trajectories_per_step = settings.batch
    c.sample.steps = settings.steps
    c.sample.guidance = settings.guidance
    c.sample.eta = settings.eta
    c.sample.trajectories = c.sample.chunk = c.train.trajectories_per_step
    default_mb = c.train.micro_batch if released else DEFAULT_TRAIN_MICRO_BATCH
    c.train.micro_batch = settings.micro_batch or default_mb
    c.dag.baseline_group = math.gcd(c.dag.baseline_group, c.train.micro_batch)
    c.dag.fl_source = settings.fl_source
    c.mesh.data, c.mesh.fsdp = -1, fsdp
    c.train.trainable = settings.trainable
    if settings.model == "tiny":
        c.flow.block_out_channels = TINY_FLOW["block_out_channels"]
        c.flow.attention_heads = TINY_FLOW["attention_heads"]
    return c


def brightness_reward() -> rewards.Reward:
    """Return a tiny JAX-native reward: the mean of the (quantised) image."""
    return rewards.jax_reward("brightness", lambda images, tokens: jnp.mean(images, (1, 2, 3)))


def bench_modules(settings: Settings, config) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """Return (Linen UNet adapted for LoRA, Linen VAE) of ``--model``'s shapes."""
    lora = LoRAConfig(rank=config.lora.rank, alpha=config.lora.alpha)
    unet = linen_unet(unet_config(settings), config.dtype, config.attention)
    unet = unet.clone(lora_scale=lora.scale, remat=config.remat)
    vae_config = VAEConfig.from_dict(VAE_CONFIGS[settings.model])
    return unet, AutoencoderKL(vae_config, dtype=jnp.dtype(config.dtype))


def bench_model(settings: Settings, config, unet, vae, frozen: dict, uncond: jax.Array) -> Model:
    """Return a ``train.run.Model`` around given modules and frozen params (arrays or abstract)."""
    pipe = Pipeline(
        unet=unet,
        vae=vae,
        text_encoder=None,  # a train step never encodes text
        params={},
        tokenizer=None,
        scheduler_config=dict(tiny.SCHEDULER_CONFIG),
        configs={},
        model_index={},
    )
    side = latent_side(settings)
    return Model(
        pipe=pipe,
        flow=make_flow(config, unet.config),
        lora=LoRAConfig(rank=config.lora.rank, alpha=config.lora.alpha),
        schedule=make_schedule(tiny.SCHEDULER_CONFIG, config.sample.steps),
        frozen=frozen,
        prompts=[f"prompt {i}" for i in range(config.train.trajectories_per_step)],
        prompt_ids=np.zeros((0, 1), np.int32),
        uncond=uncond,
        reward=brightness_reward(),
        latent_shape=(unet.config.in_channels, side, side),
    )


def config_record(settings: Settings, **extra) -> dict:
    """Return the records' config: the settings, the machine and ``extra``."""
    return {**settings_config(settings), "resolution": latent_side(settings), **extra}


# --------------------------------------------------------------------------- abstract programs


def transition_shapes(rows: int, latent_shape, table_rows: int, context_shape) -> Transitions:
    """Return a Transitions of ShapeDtypeStructs: ``rows`` transitions, a context table."""
    f32, i32 = jnp.float32, jnp.int32
    lat = lambda: jax.ShapeDtypeStruct((rows, *latent_shape), f32)
    vec = lambda dtype=f32: jax.ShapeDtypeStruct((rows,), dtype)
    return Transitions(
        x_t=lat(),
        x_s=lat(),
        t=vec(i32),
        s=vec(i32),
        alpha_t=vec(),
        alpha_s=vec(),
        terminal=vec(bool),
        initial=vec(bool),
        log_prob=vec(),
        eps=lat(),
        context_index=vec(i32),
        prompt=vec(i32),
        advantage=vec(),
        reward_t=vec(),
        reward_s=vec(),
        weight=vec(),
        contexts=jax.ShapeDtypeStruct((table_rows, *context_shape), f32),
    )


@dataclasses.dataclass
class AbstractStep:
    """The phases of a train config on abstract, sharded inputs (nothing allocated)."""

    model: Model
    phases: Phases
    trainable: dict
    frozen: dict
    batch: Transitions

    config: object = None
    opt_state: object = None  # the AdamW state of ``trainable``, laid out as training does

    def apply_call(self) -> tuple:
        """Return (the jitted AdamW update ``apply``, its abstract arguments)."""
        mesh = self.batch.x_t.sharding.mesh
        rep = parallel.replicated(mesh)
        count = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
        finite = jax.ShapeDtypeStruct((), jnp.bool_, sharding=rep)
        return self.phases.apply, (self.trainable, self.opt_state, self.trainable, count, finite)

    @property
    def per_state(self) -> bool:
        """Return whether the config computes DAG's F̃ once per state (``train``'s rule)."""
        return flow_per_state(self.config, self.model.schedule, 0, self.config.sample.steps)

    def grad_step_args(self) -> tuple:
        """Return the abstract arguments of ``phases.grad_step``."""
        beta = jax.ShapeDtypeStruct((), jnp.float32)
        return (self.trainable, self.frozen, self.batch, beta, self.trainable)

    def state_rows(self) -> int:
        """Return the states of one update window: trajectories per step × DDIM steps."""
        return self.config.train.trajectories_per_step * self.config.sample.steps

    def grad_step_call(self) -> tuple:
        """Return (jitted micro-batch step the config runs (per state or per row), its args)."""
        if not self.per_state:
            return self.phases.grad_step, self.grad_step_args()
        rep = parallel.replicated(self.batch.x_t.sharding.mesh)
        vec = lambda n, dtype: jax.ShapeDtypeStruct((n,), dtype, sharding=rep)
        n, mb = self.state_rows(), self.batch.size
        per_state = (vec(n, jnp.float32), vec(mb, jnp.int32), vec(n, jnp.float32))
        return self.phases.grad_step_per_state, (*self.grad_step_args(), *per_state)

    def flow_grad_call(self) -> tuple:
        """Return (the jitted flow VJP over one chunk of 2·micro-batch states, its args)."""
        mesh = self.batch.x_t.sharding.mesh
        rows = 2 * self.batch.size
        table = self.batch.contexts.shape
        states = transition_shapes(rows, self.model.latent_shape, table[0], table[1:])
        states = parallel.abstract(states, micro_batch_shardings(mesh, states))
        cot = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=parallel.batch_sharding(mesh, 1))
        return self.phases.flow_grad, (self.trainable, states, cot, self.trainable)


def min_shard_size(settings: Settings) -> int:
    """Return the smallest leaf (elements) FSDP shards: train's rule, lowered for ``tiny``.

    Under the real threshold (2^18 elements) every leaf of the tiny UNet stays replicated, so
    its memory would not change with fsdp at all.
    """
    return TINY_MIN_SHARD_SIZE if settings.model == "tiny" else parallel.DEFAULT_MIN_SHARD_SIZE


def abstract_step(settings: Settings, config, mesh) -> AbstractStep:
    """Return the train phases of ``config`` on abstract inputs sharded as ``train`` shards them.

    Frozen UNet (and VAE) params are FSDP-sharded, the trainable tree replicated (with
    ``train.trainable=unet`` the UNet is the trainable tree, FSDP-sharded like the rest, and
    the frozen tree has no UNet), the micro-batch split over all devices with its context
    table replicated.
    """
    unet, vae = bench_modules(settings, config)
    shapes = {"unet": unet_shapes(unet), "vae": vae_shapes(vae)}
    shardings = parallel.fsdp_shardings(mesh, shapes, min_shard_size(settings))
    frozen = parallel.abstract(shapes, shardings)
    d = unet.config.cross_attention_dim
    uncond = jnp.zeros((1, CONTEXT_LEN, d), jnp.float32)
    model = bench_model(settings, config, unet, vae, frozen, uncond)
    layout = parallel.TreeLayout(mesh, trains_unet(config), min_shard_size(settings))
    model = dataclasses.replace(model, trainable_layout=layout)
    trainable = jax.eval_shape(
        lambda fz: init_trainable(dataclasses.replace(model, frozen=fz), config, jax.random.key(0)),
        frozen,
    )
    trainable = layout.abstract(trainable)
    model = without_frozen_unet(model)
    frozen = model.frozen
    batch = transition_shapes(
        config.train.micro_batch,
        model.latent_shape,
        config.train.trajectories_per_step,
        (CONTEXT_LEN, d),
    )
    batch = parallel.abstract(batch, micro_batch_shardings(mesh, batch))
    tx = make_tx(config, trainable)
    phases = build_phases(model, config, tx)
    opt_state = layout.abstract(jax.eval_shape(tx.init, trainable))
    return AbstractStep(model, phases, trainable, frozen, batch, config, opt_state)


def sharded_bytes(tree) -> int:
    """Return the bytes one device holds of an abstract tree (its shards' sizes)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


# --------------------------------------------------------------------------- memory


def fsdp_sizes(settings: Settings, num_devices: int) -> list[int]:
    """Return the fsdp sizes of ``--fsdp`` (each must divide the device count)."""
    sizes = [int(s) for s in str(settings.fsdp).split(",") if s.strip()]
    bad = [s for s in sizes if s < 1 or num_devices % s]
    if not sizes or bad:
        raise ValueError(
            f"--fsdp sizes {bad or sizes} must divide the {num_devices} devices (on CPU set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8)"
        )
    return sizes


def memory_records(settings: Settings, fsdp: int) -> tuple[list[dict], int]:
    """Return (records of one fsdp size, its per-device param bytes)."""
    config = train_config(settings, MEMORY_ALGO, fsdp, released=True)
    mesh = parallel.make_mesh(-1, fsdp)
    step = abstract_step(settings, config, mesh)
    fn, args = step.grad_step_call()
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    mem = parallel.memory_per_device(compiled)
    unet_trains = trains_unet(config)
    params = sharded_bytes(step.trainable["unet"] if unet_trains else step.frozen["unet"])
    sizes = {"trainable": sharded_bytes(step.trainable), "opt_state": sharded_bytes(step.opt_state)}
    if unet_trains:
        sizes["param_opt"] = sizes["trainable"] + sizes["opt_state"]
        fn, args = step.apply_call()
        apply_mem = parallel.memory_per_device(fn.lower(*args).compile())
        sizes.update({f"apply_{k}": apply_mem[k] for k in ("argument", "temp") if k in apply_mem})
    cfg = config_record(
        settings,
        fsdp=fsdp,
        mesh=parallel.mesh_str(mesh),
        algo=MEMORY_ALGO,
        compute_dtype=config.dtype,
        remat=config.remat,
        micro_batch=config.train.micro_batch,
        context_table_rows=config.train.trajectories_per_step,
        flow_block_out_channels=list(config.flow.block_out_channels),
        lora_rank=config.lora.rank,
        fsdp_min_shard_size=min_shard_size(settings),
        trainable=config.train.trainable,
    )
    name = lambda m: f"fsdp{fsdp}/{m}"
    out = [record("memory", "dag_jax", name("param_bytes"), params, "bytes", cfg)]
    for key, value in sizes.items():
        out.append(record("memory", "dag_jax", name(f"{key}_bytes"), value, "bytes", cfg))
    for key in ("argument", "output", "temp"):
        if key in mem:
            out.append(record("memory", "dag_jax", name(f"{key}_bytes"), mem[key], "bytes", cfg))
    if {"argument", "output", "temp"} <= mem.keys():
        total = mem["argument"] + mem["output"] + mem["temp"] - mem.get("alias", 0)
        out.append(record("memory", "dag_jax", name("total_bytes"), total, "bytes", cfg))
    out.append(record("memory", "dag_jax", name("compile_s"), compile_s, "s", cfg))
    print(f"[bench] memory fsdp={fsdp}: compiled in {compile_s:.1f}s, {mem}", flush=True)
    return out, {"param": params, **({"param_opt": sizes["param_opt"]} if unet_trains else {})}


def bench_memory(settings: Settings) -> list[dict]:
    """Return per-device memory records of the sharded DAG-DB train step per fsdp size."""
    unet_config(settings)  # a bad --model fails before any work
    if settings.trainable not in TRAINABLES:
        raise ValueError(f"--trainable must be one of {TRAINABLES}, got {settings.trainable!r}")
    records, sizes = [], {}
    for fsdp in fsdp_sizes(settings, jax.device_count()):
        recs, sizes[fsdp] = memory_records(settings, fsdp)
        records += recs
    largest = max(sizes)
    if 1 in sizes and largest > 1:
        cfg = dict(records[-1]["config"], fsdp=[largest, 1])
        for what in sizes[1]:
            ratio = sizes[largest][what] / sizes[1][what]
            metric = f"{what}_bytes_ratio_fsdp{largest}_vs_fsdp1"
            records.append(record("memory", "dag_jax", metric, ratio, "fraction", cfg))
    return records


# --------------------------------------------------------------------------- train: FLOPs


def train_step_flops(settings: Settings, algo: str) -> float:
    """Return the model FLOPs of one optimizer step (see ``cpu_train_step_flops``).

    Counted on the program the CPU backend traces (as ``sampler.unet_call_flops``): on
    accelerator hosts in a CPU-only subprocess.
    """
    if jax.default_backend() == "cpu":
        return cpu_train_step_flops(settings, algo)
    return float_on_cpu("dag_jax.bench.train_step:cpu_train_step_flops", settings, algo)


def cpu_train_step_flops(settings: Settings, algo: str) -> float:
    """Return the matmul and conv FLOPs of one optimizer step, on one device, without remat.

    (micro-batches per step) × ``grad_step``, plus for DAG ``fl_rewards`` on the window's
    trajectories and the flow's state passes, counted by ``dag_jax.bench.flops`` (their ``lax.map``
    loops × trip count); remat is off so recomputation is not counted (model FLOPs).
    """
    config = train_config(settings, algo)
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    step = abstract_step(settings, config, mesh)
    rows = settings.batch * settings.steps
    micro = -(-rows // config.train.micro_batch)
    fn, args = step.grad_step_call()
    count = micro * flops.model_flops(fn, *args)
    if algo.startswith("dag"):
        traj = trajectory_shapes(settings, step.model, fl_from_sampling(config))
        idx = jax.ShapeDtypeStruct((settings.batch,), jnp.int32)
        fl = step.phases.fl_rewards
        count += flops.model_flops(fl, step.frozen, step.trainable, None, traj, idx)
    if step.per_state:  # F̃ of every state forward, then the flow's VJP in chunks
        count += flops.model_flops(step.phases.state_flows, step.trainable, traj)
        chunks = -(-rows // (2 * config.train.micro_batch))
        fn, args = step.flow_grad_call()
        count += chunks * flops.model_flops(fn, *args)
    return count


def trajectory_shapes(settings: Settings, model: Model, x0_cond: bool = False) -> Trajectory:
    """Return an abstract Trajectory of ``--batch`` × ``--steps`` for ``fl_rewards``.

    ``x0_cond``: with the sampler's x̂₀^cond of every state (``dag.fl_source = "sampling"``).
    """
    b, k = settings.batch, settings.steps
    f32 = jnp.float32
    d = model.pipe.unet.config.cross_attention_dim
    per_step = jax.ShapeDtypeStruct((b, k, *model.latent_shape), f32)
    return Trajectory(
        latents=jax.ShapeDtypeStruct((b, k + 1, *model.latent_shape), f32),
        timesteps=jax.ShapeDtypeStruct((k,), jnp.int32),
        log_probs=jax.ShapeDtypeStruct((b, k), f32),
        eps=per_step,
        context=jax.ShapeDtypeStruct((b, CONTEXT_LEN, d), f32),
        x0_cond=per_step if x0_cond else None,
    )


# --------------------------------------------------------------------------- train: set-up


@dataclasses.dataclass
class Weights:
    """Random weights shared by both impls: Linen params, and the torch modules if any."""

    unet: dict
    vae: dict
    torch_unet: object = None
    torch_vae: object = None
    torch_info: dict = dataclasses.field(default_factory=dict)


def random_weights(settings: Settings, unet, vae, use_torch: bool) -> Weights:
    """Return random UNet and VAE weights: built in torch and converted, or Flax's init."""
    if not use_torch:
        side = 2 ** len(vae.config.block_out_channels)
        x = jnp.zeros((1, vae.config.in_channels, side, side))
        vae_params = jax.jit(vae.init)(jax.random.key(settings.seed + 1), x)["params"]
        return Weights(default_init_params(unet, settings.seed), vae_params)
    from dag_jax.bench import torch_ref, torch_ref_train

    device = torch_ref.pick_device()
    torch_unet = torch_ref.build_unet(unet_config(settings), settings.seed, device)
    torch_vae = torch_ref_train.build_vae(VAE_CONFIGS[settings.model], settings.seed, device)
    unet_params = torch_to_linen(torch_ref.state_dict_numpy(torch_unet), unet_shapes(unet))
    vae_params = torch_to_linen(torch_ref.state_dict_numpy(torch_vae), vae_shapes(vae), "vae")
    return Weights(unet_params, vae_params, torch_unet, torch_vae, torch_ref.describe(device))


@dataclasses.dataclass
class TrainRun:
    """One algorithm's dag_jax train state, ready for ``train.update.update_window``."""

    algo: str
    ctx: Context  # model, config, mesh, objective, compiled phases: the train program's own
    state: TrainState
    data: Collected
    beta: float

    @property
    def config(self):
        """Return the run's config."""
        return self.ctx.config

    @property
    def model(self) -> Model:
        """Return the run's model."""
        return self.ctx.model

    @property
    def window(self) -> np.ndarray:
        """Return the trajectories of the optimizer step (all of them)."""
        return np.arange(self.data.rewards.size)

    def step(self) -> float:
        """Run one optimizer step; return its loss (blocks until the update is done)."""
        self.state, metrics = update_window(self.ctx, self.state, self.data, self.window, self.beta)
        jax.block_until_ready(self.state.trainable)
        return metrics["loss"]

    def next_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (rows, weights) in the order ``update_window`` will use on its next call.

        ``train.update.window_rows``: the objective's row order (DAG-KL: groups of distinct
        trajectories, their empty slots at weight 0), padded to whole micro-batches.
        """
        steps = int(self.data.traj.log_probs.shape[1])
        return window_rows(self.ctx, self.state, self.window.size, steps)


def random_lora_b(trainable: dict, seed: int, scale: float = 0.02) -> dict:
    """Return ``trainable`` with random LoRA B (so the adapter changes the UNet's output)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(trainable["lora"])
    key = jax.random.key(seed + 7)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        if path[-1].key == "B":
            leaf = scale * jax.random.normal(jax.random.fold_in(key, i), leaf.shape)
        out.append(leaf)
    return {**trainable, "lora": jax.tree_util.tree_unflatten(tree, out)}


def sample_trajectories(model: Model, policy: dict, settings: Settings, config):
    """Return (Trajectory of ``--batch`` × ``--steps``, the sampler inputs) from the policy."""
    inputs = sampler_inputs(settings)
    keys = sample_keys(jax.random.key(settings.seed), jnp.arange(settings.batch))

    @jax.jit
    def run(policy, x, ctx):
        return rollout(
            model.eps_fn,
            policy,
            x,
            ctx,
            model.uncond,
            model.schedule,
            keys,
            guidance=config.sample.guidance,
            eta=config.sample.eta,
            keep_x0_cond=fl_from_sampling(config),
        )

    return run(policy, inputs.x_T, inputs.context), inputs


def train_run(settings: Settings, algo: str, weights: Weights, mesh) -> TrainRun:
    """Return the dag_jax state of ``algo``: model, phases, trainable, sampled trajectories."""
    config = train_config(settings, algo)
    validate(config, mesh.size)
    unet, vae = bench_modules(settings, config)
    params = {"unet": weights.unet, "vae": weights.vae}
    frozen = parallel.put(params, parallel.fsdp_shardings(mesh, params))
    inputs = sampler_inputs(settings)
    model = bench_model(settings, config, unet, vae, frozen, jnp.asarray(inputs.uncond[:1]))
    trainable = init_trainable(model, config, jax.random.key(settings.seed))
    trainable = random_lora_b(trainable, settings.seed)
    tx = make_tx(config, trainable)
    traj, _ = sample_trajectories(model, model.policy_of(frozen, trainable), settings, config)
    n = settings.batch
    advantage = np.random.default_rng(settings.seed).standard_normal(n).astype(np.float32)
    if algo != "ddpo":
        advantage[:] = 0.0
    data = Collected(
        traj=traj,
        prompt_idx=np.arange(n),
        rewards=np.zeros(n, np.float32),
        advantage=advantage,
        weight=np.ones(n, np.float32),
        unique=n,
    )
    objective = objectives.get(config)
    # placed as the update leaves them, so the first step's programs are the ones timed
    rep = parallel.replicated(mesh)
    trainable = jax.device_put(trainable, rep)
    state = TrainState(
        trainable=trainable,
        opt_state=jax.device_put(tx.init(trainable), rep),
        trackers=objective.trackers(config),
    )
    ctx = Context(model, config, mesh, objective, build_phases(model, config, tx))
    return TrainRun(algo, ctx, state, data, float(config.dag.beta))


def train_algos(settings: Settings) -> list[str]:
    """Return the algorithms of ``--algos`` the train bench runs (others are skipped)."""
    names = [a.strip() for a in settings.algos.split(",") if a.strip()]
    skipped = [a for a in names if a not in TRAIN_ALGOS]
    if skipped:
        print(
            f"[bench] train: skipping {skipped} (the bench runs {TRAIN_ALGOS}; b2's step is ddpo's)"
        )
    return [a for a in names if a in TRAIN_ALGOS]


# --------------------------------------------------------------------------- train: records


def algo_records(
    algo: str, impl: str, times, first_s, loss, settings: Settings, cfg, step_flops, peak
) -> list[dict]:
    """Return the timing records of one (algorithm, impl)."""
    mean = float(np.mean(times))
    rows = settings.batch * settings.steps
    m = lambda name: f"{algo}/{name}"
    rec = lambda name, value, unit: record("train", impl, m(name), value, unit, cfg)
    out = [
        rec("step_s", mean, "s"),
        rec("step_min_s", min(times), "s"),
        rec("transitions_per_s", rows / mean, "transitions/s"),
        rec("first_step_s", first_s, "s"),
        rec("loss", loss, "loss"),
    ]
    if step_flops and peak:
        out.append(rec("achieved_tflops", step_flops / mean / 1e12, "TFLOP/s"))
        out.append(rec("mfu", step_flops / mean / peak, "fraction"))
    return out


def timed_first(fn) -> tuple[float, float]:
    """Return (fn()'s value, its wall seconds)."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_algo(settings: Settings, algo, weights, mesh, impls, peak, base_cfg) -> list[dict]:
    """Return the train records of one algorithm for each impl (and their comparison)."""
    run = train_run(settings, algo, weights, mesh)
    cfg = dict(
        base_cfg,
        algo=algo,
        micro_batch=run.config.train.micro_batch,
        compute_dtype=run.config.dtype,
        remat=run.config.remat,
        beta=run.beta,
        baseline_group=run.config.dag.baseline_group,
        transitions_per_step=settings.batch * settings.steps,
    )
    steps, first, losses = {}, {}, {}
    if "torch_ref" in impls:
        from dag_jax.bench import torch_ref_train

        ref = torch_ref_train.TorchTrainStep.from_run(run, weights, settings)
        rows = run.next_rows()  # the order (and weights) dag_jax's first step uses
        losses["torch_ref"], first["torch_ref"] = timed_first(lambda: ref.step(*rows))
        steps["torch_ref"] = lambda: ref.step(*run.next_rows())
    if "dag_jax" in impls:
        losses["dag_jax"], first["dag_jax"] = timed_first(run.step)
        steps["dag_jax"] = run.step
    step_flops = train_step_flops(settings, algo)
    cfg["step_gflop"] = step_flops / 1e9
    cfg["loadavg_1min_before"] = os.getloadavg()[0]
    times = timed_runs(steps, settings.repeats, max(settings.warmup - 1, 0))
    cfg["loadavg_1min_after"] = os.getloadavg()[0]
    records = []
    for impl in steps:
        records += algo_records(
            algo, impl, times[impl], first[impl], losses[impl], settings, cfg, step_flops, peak
        )
    if len(steps) == 2:
        speedup = np.mean(times["torch_ref"]) / np.mean(times["dag_jax"])
        rel = abs(losses["dag_jax"] - losses["torch_ref"]) / max(abs(losses["torch_ref"]), 1e-30)
        records.append(
            record("train", "dag_jax", f"{algo}/speedup_vs_torch_ref", speedup, "x", cfg)
        )
        records.append(record("train", "dag_jax", f"{algo}/check_loss_rel_diff", rel, "rel", cfg))
        jl, tl = losses["dag_jax"], losses["torch_ref"]
        print(f"[bench] {algo}: first-step loss dag_jax {jl:.6g}, torch_ref {tl:.6g}")
    return records


def torch_ref_missing() -> str | None:
    """Return why the PyTorch train reference cannot run (torch, diffusers or peft missing)."""
    missing = torch_missing()
    if missing is None and importlib.util.find_spec("peft") is None:
        return "peft is not installed"
    return missing


def bench_train(settings: Settings) -> list[dict]:
    """Return records of one optimizer step per algorithm, dag_jax vs the PyTorch reference."""
    unet_config(settings)  # a bad --model fails before any work
    impls = settings.impls()
    missing = torch_ref_missing() if "torch_ref" in impls else None
    if missing:
        print(f"[bench] {missing}: skipping the PyTorch reference")
        impls = tuple(i for i in impls if i != "torch_ref")
    mesh = parallel.make_mesh(-1, 1)
    config = train_config(settings, "ddpo")
    unet, vae = bench_modules(settings, config)
    weights = random_weights(settings, unet, vae, "torch_ref" in impls)
    peak, peak_source = peak_flops(config.dtype)
    base_cfg = config_record(
        settings,
        mesh=parallel.mesh_str(mesh),
        peak_tflops=peak / 1e12,
        peak_source=peak_source,
        **weights.torch_info,
    )
    records = []
    for algo in train_algos(settings):
        records += bench_algo(settings, algo, weights, mesh, impls, peak, base_cfg)
    return records
