"""Train: ``python -m dag_jax.train --config=configs/imagereward.py --workdir=DIR``.

One epoch (one B² stage) reads top to bottom:

  1. sample   trajectories of the current policy (``sample.trajectories`` per epoch, in compiled
              chunks; B²: prefixes to the interval start, then ``b2.branches`` branches each);
  2. reward   the final images (a jitted JAX reward, or a host reward on the gathered images);
  3. advantages / selection   DDPO: per-prompt standardisation (or within ``sample.group``);
              B²: z-scores against the prompt's history (or within each prefix) and best/worst
              selection; DAG: none (the reward enters through the flow);
  4. update   per window of ``train.trajectories_per_step`` trajectories: (DAG) forward-looking
              rewards of every state with the current θ, then all the window's transitions,
              shuffled (``dag.baseline=step``: in blocks of one step of a trajectory group), in
              micro-batches whose gradients are accumulated into one AdamW update (DAG: F̃ of
              every state once at the window's start, and φ's gradient as one VJP over the
              states at its end, ``dag.flow_once_per_state``);
  5. log and checkpoint.

Everything random comes from ``fold_in(key(seed), epoch)`` and per-sample keys from *global*
sample indices, so any mesh shape and any restart gives the same numbers. Workdir contents:
see README.md ("The workdir").
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dag_jax import hostmem, parallel, rewards, xla_cpu
from dag_jax.algos import b2, dag, ddpo
from dag_jax.algos.optim import GroupConfig, make_optimizer
from dag_jax.algos.stats import PerPromptStatTracker
from dag_jax.algos.transitions import (
    SHARED_FIELDS,
    Transitions,
    from_trajectory,
    row_flows,
    scatter_state_cotangents,
    states_are_shared,
    step_group_order,
    take,
)
from dag_jax.checkpoint import Checkpointer
from dag_jax.diffusion.sampler import Trajectory, branch_rollout, rollout, sample_keys
from dag_jax.diffusion.schedule import Schedule, make_schedule
from dag_jax.metrics import MetricsWriter, ProgressLine
from dag_jax.models.flow import FlowConfig, FlowNetwork
from dag_jax.models.lora import LoRAConfig, init_lora
from dag_jax.pipeline import Pipeline

log = logging.getLogger("dag_jax.train")
ALGOS = ("ddpo", "dag_db", "dag_kl", "b2")
B2_OBJECTIVES = ("ddpo", "dag_db", "dag_kl")
DAG_BASELINES = ("rows", "step")
FL_SOURCES = ("current", "sampling")
B2_BASELINES = ("prompt", "prefix")
GROUP_SCALES = ("group", "pooled")


class ConfigError(ValueError):
    """The config names something that does not exist or cannot work together."""


class NonFiniteLoss(RuntimeError):
    """Too many consecutive updates had a non-finite loss."""


# --------------------------------------------------------------------------- config checks


def _default_config() -> ml_collections.ConfigDict:
    """Return configs/base.py's defaults (the set of keys a config may have)."""
    import runpy

    base = Path(__file__).resolve().parents[1] / "configs" / "base.py"
    if base.exists():
        return runpy.run_path(str(base))["get_config"]()
    return None


def _flat_keys(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict) and k not in ("options",):
            out.update(_flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raise ConfigError naming the first problem, before anything is built or compiled."""
    default = _default_config()
    if default is not None:
        unknown = sorted(set(_flat_keys(config)) - set(_flat_keys(default)))
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    if config.algo not in ALGOS:
        raise ConfigError(f"config.algo must be one of {ALGOS}, got {config.algo!r}")
    if config.b2.objective not in B2_OBJECTIVES:
        raise ConfigError(f"config.b2.objective must be one of {B2_OBJECTIVES}")
    if config.reward.name not in rewards.names():
        raise ConfigError(
            f"unknown reward {config.reward.name!r}; known rewards: {', '.join(rewards.names())}"
        )
    model = str(config.model)
    if model not in ("random-tiny", "tiny") and (
        model.startswith((".", "/", "~")) or os.sep in model and not _looks_like_hub_id(model)
    ):
        if not Path(model).expanduser().exists():
            raise ConfigError(f"config.model: no such folder {model!r}")
    c = config
    _divides("sample.chunk", c.sample.chunk, "the device count", num_devices)
    _divides("train.micro_batch", c.train.micro_batch, "the device count", num_devices)
    if c.algo == "b2":
        _divides("b2.prefixes", c.b2.prefixes, "the device count", num_devices)
        if not 1 <= c.b2.low <= c.b2.high <= c.sample.steps:
            raise ConfigError(
                f"need 1 <= b2.low ({c.b2.low}) <= b2.high ({c.b2.high}) <= "
                f"sample.steps ({c.sample.steps})"
            )
    else:
        _divides("sample.trajectories", c.sample.trajectories, "sample.chunk", c.sample.chunk)
        if c.sample.group < 1:
            raise ConfigError(f"sample.group must be >= 1, got {c.sample.group}")
        _divides("sample.trajectories", c.sample.trajectories, "sample.group", c.sample.group)
        _divides(
            "sample.trajectories",
            c.sample.trajectories,
            "train.trajectories_per_step",
            c.train.trajectories_per_step,
        )
    if c.b2.baseline not in B2_BASELINES:
        raise ConfigError(f"config.b2.baseline must be one of {B2_BASELINES}")
    if c.dag.baseline not in DAG_BASELINES:
        raise ConfigError(f"config.dag.baseline must be one of {DAG_BASELINES}")
    if c.dag.fl_source not in FL_SOURCES:
        raise ConfigError(
            f"config.dag.fl_source must be one of {FL_SOURCES}, got {c.dag.fl_source!r}"
        )
    if c.ddpo.group_scale not in GROUP_SCALES:
        raise ConfigError(f"config.ddpo.group_scale must be one of {GROUP_SCALES}")
    if _objective(c) == "dag_kl" or _step_baseline(c):
        if c.dag.baseline_group < 2:
            raise ConfigError(f"dag.baseline_group must be >= 2, got {c.dag.baseline_group}")
        _divides(
            "train.micro_batch", c.train.micro_batch, "dag.baseline_group", c.dag.baseline_group
        )
    if _step_baseline(c):  # windows must split into whole blocks of trajectories
        g = c.dag.baseline_group
        _divides(
            "train.trajectories_per_step", c.train.trajectories_per_step, "dag.baseline_group", g
        )
        if c.algo == "b2":
            _divides(
                "b2.prefixes × b2.branches", c.b2.prefixes * c.b2.branches, "dag.baseline_group", g
            )
        else:
            _divides("sample.trajectories", c.sample.trajectories, "dag.baseline_group", g)
    if c.train.epochs < 1:
        raise ConfigError("train.epochs must be >= 1")


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not Path(model).exists()


def _divides(name: str, value: int, what: str, by: int) -> None:
    if by <= 0 or value <= 0 or value % by:
        raise ConfigError(f"config {name}={value} is not divisible by {what} ({by})")


def _step_baseline(c) -> bool:
    """Return whether a DAG objective takes its baselines over step groups (``dag.baseline``)."""
    return _objective(c).startswith("dag") and c.dag.baseline == "step"


def _trajectory_group(c) -> int:
    """Return how many consecutive trajectories of an epoch share prompt and x_T (or prefix)."""
    return c.b2.branches if c.algo == "b2" else c.sample.group


def _objective(c) -> str:
    """Return the loss an algo trains with (B² has its own choice)."""
    return c.b2.objective if c.algo == "b2" else c.algo


def fl_from_sampling(c) -> bool:
    """Return whether DAG's forward-looking x̂₀ come from the sampling pass (``dag.fl_source``)."""
    return _objective(c).startswith("dag") and c.dag.fl_source == "sampling"


def flow_per_state(c, schedule: Schedule, start: int, num_steps: int) -> bool:
    """Return whether a window of steps [start, start + num_steps) computes F̃ once per state.

    DAG objectives with ``dag.flow_once_per_state``, where the states chain exactly
    (``transitions.states_are_shared``); otherwise F̃ is evaluated per row, as released.
    """
    if not (_objective(c).startswith("dag") and c.dag.flow_once_per_state):
        return False
    return states_are_shared(schedule, start, num_steps)


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass
class Model:
    """Everything static a run computes with: modules, schedule, frozen params, prompts."""

    pipe: Pipeline
    flow: FlowNetwork
    lora: LoRAConfig
    schedule: Schedule
    frozen: dict  # {"unet", "vae", "text_encoder"} fp32, sharded
    prompts: list[str]
    prompt_ids: np.ndarray  # (P, L) int32 token ids
    uncond: jax.Array  # (1, L, D) embedding of the negative prompt
    reward: rewards.Reward
    latent_shape: tuple[int, int, int]

    def eps_fn(self, policy, x, t, ctx):
        """Return the adapted UNet's output; ``policy`` = {"base": unet params, "lora": …}."""
        variables = {"params": policy["base"], "lora": policy["lora"]}
        return self.pipe.unet.apply(variables, x, t, ctx).sample

    def flow_fn(self, flow_params, x, t, ctx):
        """Return F̃_φ(x, t, c), (B,) fp32."""
        return self.flow.apply({"params": flow_params}, x, t, ctx)

    @staticmethod
    def policy_of(frozen: dict, trainable: dict) -> dict:
        """Return the policy params {"base": frozen UNet, "lora": trainable LoRA}."""
        return {"base": frozen["unet"], "lora": trainable["lora"]}


def load_model(config, mesh, task: bool = True) -> Model:
    """Return the Model: pipeline (loaded or random-tiny), flow, prompts, reward.

    ``task=False`` leaves out the prompts, their negative embedding and the reward (empty /
    None): what tools that only restore a run's checkpoints need (``dag_jax.export``).
    """
    import dag_jax
    from dag_jax import tiny

    dtype = jnp.dtype(config.dtype)
    if config.model == "random-tiny":
        pipe = tiny.random_tiny_pipeline(config.seed)
        pipe = dataclasses.replace(
            pipe,
            unet=pipe.unet.clone(dtype=dtype, remat=config.remat),
            vae=pipe.vae.clone(dtype=dtype),
        )
    else:
        pipe = dag_jax.load_pipeline(
            config.model,
            dtype=dtype,
            variant=config.variant or None,
            revision=config.revision or None,
            remat=config.remat,
        )
    lora = LoRAConfig(rank=config.lora.rank, alpha=config.lora.alpha)
    pipe = dataclasses.replace(
        pipe, unet=pipe.unet.clone(lora_scale=lora.scale, attention_impl=config.attention)
    )
    side = config.resolution or pipe.unet.config.sample_size
    latent_shape = (pipe.unet.config.in_channels, side, side)
    flow = make_flow(config, pipe.unet.config)
    frozen = parallel.put(pipe.params, parallel.fsdp_shardings(mesh, pipe.params))
    prompts, prompt_ids, uncond, reward = [], np.zeros((0, 1), np.int32), None, None
    if task:
        prompts = load_prompts(config)
        prompt_ids = pipe.encode_prompt_ids(prompts)
        neg = jnp.asarray(pipe.encode_prompt_ids([config.prompts.negative]))
        uncond = jax.jit(pipe.encode_text)(frozen["text_encoder"], neg)
        reward = rewards.get(config.reward.name, **dict(config.reward.options))
    return Model(
        pipe=pipe,
        flow=flow,
        lora=lora,
        schedule=make_schedule(pipe.scheduler_config, config.sample.steps),
        frozen=frozen,
        prompts=prompts,
        prompt_ids=prompt_ids,
        uncond=uncond,
        reward=reward,
        latent_shape=latent_shape,
    )


def make_flow(config, unet_config) -> FlowNetwork:
    """Return the flow network of ``config.flow`` for a UNet's latent channels and text width."""
    return FlowNetwork(
        FlowConfig(
            in_channels=unet_config.in_channels,
            cross_attention_dim=unet_config.cross_attention_dim,
            block_out_channels=tuple(config.flow.block_out_channels),
            down_block_types=_flow_blocks(len(config.flow.block_out_channels)),
            layers_per_block=config.flow.layers_per_block,
            attention_heads=config.flow.attention_heads,
            norm_num_groups=min(32, min(config.flow.block_out_channels)),
        ),
        dtype=jnp.dtype(config.dtype),
    )


def _flow_blocks(n: int) -> tuple[str, ...]:
    """Return the flow's down-block types: cross-attention except in the last block."""
    return ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",) if n > 1 else ("DownBlock2D",)


def load_prompts(config) -> list[str]:
    """Return the training prompts of the config (a named set's train split, or inline)."""
    if config.prompts.name == "inline":
        prompts = [str(p) for p in config.prompts.inline]
        if not prompts:
            raise ConfigError("config.prompts.inline is empty")
        return prompts
    from dag_jax.data import prompts as prompt_sets

    root = config.prompts.root or None
    return list(prompt_sets.load(config.prompts.name, root=root).train)


def init_trainable(model: Model, config, key: jax.Array) -> dict:
    """Return the trainable tree {"lora": …, "flow": …} (flow only for DAG objectives)."""
    k_lora, k_flow = jax.random.split(key)
    out = {"lora": init_lora(k_lora, model.frozen["unet"], model.lora)}
    if _objective(config).startswith("dag"):
        c, s = model.latent_shape[0], model.latent_shape[1]
        d = model.pipe.unet.config.cross_attention_dim
        out["flow"] = model.flow.init(
            k_flow, jnp.zeros((1, c, s, s)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, d))
        )["params"]
        if config.dag.anchor_initial_flow:
            out["log_z"] = jnp.zeros((), jnp.float32)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), out)


def checkpoint_template(model: Model, config) -> dict:
    """Return the abstract {"trainable", "opt_state"} tree of a run's checkpoints (no compute)."""

    def build():
        trainable = init_trainable(model, config, jax.random.key(0))
        return {"trainable": trainable, "opt_state": make_tx(config, trainable).init(trainable)}

    return jax.eval_shape(build)


def make_tx(config, trainable: dict):
    """Return AdamW with per-group clipping (LoRA and flow separately, as the DAG release)."""
    t = config.train
    groups = {"lora": GroupConfig(t.learning_rate, t.weight_decay, t.max_grad_norm or None)}
    if "flow" in trainable:
        groups["flow"] = GroupConfig(
            config.train.flow_learning_rate,
            config.train.flow_weight_decay,
            config.train.flow_max_grad_norm or None,
        )
    if "log_z" in trainable:
        groups["log_z"] = GroupConfig(config.train.flow_learning_rate, 0.0, None)
    return make_optimizer(groups)


# --------------------------------------------------------------------------- compiled phases


def _put(mesh, array: np.ndarray, batch_axis: bool = True) -> jax.Array:
    """Return a global array of a host array every process holds in full.

    Split on the batch axis over all devices when it divides evenly (a ragged last window,
    or a B² selection, is replicated instead).
    """
    batch_axis = batch_axis and array.ndim > 0 and array.shape[0] % mesh.size == 0
    sharding = parallel.batch_sharding(mesh, array.ndim) if batch_axis else None
    return parallel.put(array, sharding or parallel.replicated(mesh))


@dataclasses.dataclass
class Phases:
    """The compiled functions of a run (built once; shapes are fixed by the config)."""

    sample: Any
    prefix: Any
    branches: Any
    fl_rewards: Any
    grad_step: Any  # (trainable, frozen, batch, beta, grad_sum) -> (grad_sum, metrics)
    apply: Any
    grid: Any
    reward: Any  # (reward params, images, prompt_idx) -> (B,) for JAX-native rewards
    # DAG with F̃ once per state (``dag.flow_once_per_state``): F̃ of a window's states, the
    # micro-batch step on those values (also returning per-state ∂L/∂F̃), φ's VJP over states
    state_flows: Any = None  # (trainable, traj) -> (B, K)
    grad_step_per_state: Any = None  # (… grad_sum, state_flow, rows, cotangent) -> (+ cotangent)
    flow_grad: Any = None  # (trainable, state rows, cotangent, grad_sum) -> grad_sum


def build_phases(model: Model, config, tx) -> Phases:
    """Return the jitted phase functions, closed over the static model and config."""
    c = config
    objective = _objective(c)
    schedule = model.schedule
    bound = model.reward.bound_with_params(model.prompts)
    policy_kw = dict(guidance=c.sample.guidance, eta=c.sample.eta, reduction=c.dag.reduction)
    if objective == "ddpo":
        policy_kw["reduction"] = "mean"
    keep = fl_from_sampling(c)  # rollouts keep x̂₀^cond of every state for the FL rewards

    def context_of(frozen, ids):
        return model.pipe.encode_text(frozen["text_encoder"], ids)

    def initial(keys):
        shape = model.latent_shape
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1 << 30), shape))(keys)

    def images_of(frozen, latents):
        return model.pipe.decode_images(frozen["vae"], latents)

    def from_noise(
        frozen, trainable, ids, keys, eta, num_steps=None, noise_keys=None, keep_x0_cond=False
    ):
        ctx = context_of(frozen, ids)
        traj = rollout(
            model.eps_fn,
            model.policy_of(frozen, trainable),
            initial(keys if noise_keys is None else noise_keys),
            ctx,
            model.uncond,
            schedule,
            keys,
            guidance=c.sample.guidance,
            eta=eta,
            num_steps=num_steps,
            reduction=policy_kw["reduction"],
            keep_x0_cond=keep_x0_cond,
        )
        return traj, ctx

    @jax.jit
    def sample(frozen, trainable, ids, idx, ekey):
        # sample.group consecutive trajectories share x_T (the key of their group's first
        # index); every trajectory keeps its own step noise. group 1: x_T of its own key.
        noise_keys = sample_keys(ekey, idx // c.sample.group * c.sample.group)
        keys = sample_keys(ekey, idx)
        traj, _ = from_noise(
            frozen, trainable, ids, keys, c.sample.eta, noise_keys=noise_keys, keep_x0_cond=keep
        )
        return traj, images_of(frozen, traj.final)

    @functools.partial(jax.jit, static_argnums=5)
    def prefix(frozen, trainable, ids, idx, ekey, start):
        keys = sample_keys(ekey, idx)
        if start == 0:
            return initial(keys), context_of(frozen, ids), keys
        traj, ctx = from_noise(frozen, trainable, ids, keys, c.sample.eta, num_steps=start)
        return traj.final, ctx, keys

    @functools.partial(jax.jit, static_argnums=(5, 6))
    def branches(frozen, trainable, x, ctx, keys, start, length):
        traj = branch_rollout(
            model.eps_fn,
            model.policy_of(frozen, trainable),
            x,
            ctx,
            model.uncond,
            schedule,
            keys,
            c.b2.branches,
            start=start,
            num_steps=length,
            guidance=c.sample.guidance,
            eta=c.sample.eta,
            reduction=policy_kw["reduction"],
            keep_x0_cond=keep,
        )
        return traj, images_of(frozen, traj.final)

    @jax.jit
    def fl_rewards(frozen, trainable, reward_params, traj: Trajectory, prompt_idx):
        if keep and traj.x0_cond is None:
            raise ValueError("dag.fl_source='sampling' needs trajectories sampled with x0_cond")
        k = traj.log_probs.shape[1]
        alpha_t = schedule.alpha_t[traj.start : traj.start + k]
        score = lambda x0: bound(reward_params, images_of(frozen, x0), prompt_idx)
        return dag.forward_looking_rewards(
            model.eps_fn,
            model.policy_of(frozen, trainable),
            traj.latents,
            traj.timesteps,
            alpha_t,
            traj.context,
            score,
            schedule.prediction_type,
            x0_cond=traj.x0_cond,  # kept by the sampler when dag.fl_source = "sampling"
        )

    def loss_fn(trainable, frozen, batch: Transitions, beta, flow_values=None):
        params = {"policy": model.policy_of(frozen, trainable), "flow": trainable.get("flow")}
        if "log_z" in trainable:
            params["log_z"] = trainable["log_z"]
        if flow_values is not None:
            params["flow_values"] = flow_values
        if objective == "ddpo":
            d = c.b2 if c.algo == "b2" else c.ddpo
            return ddpo.ddpo_loss(
                model.eps_fn,
                params["policy"],
                batch,
                model.uncond,
                clip_range=d.clip_range,
                adv_clip=d.adv_clip,
                **policy_kw,
            )
        args = (model.eps_fn, model.flow_fn, params, batch, model.uncond, beta)
        if objective == "dag_db":
            return dag.db_loss(
                *args,
                reg_coef=c.dag.reg_coef,
                baseline_group=c.dag.baseline_group if _step_baseline(c) else 0,
                **policy_kw,
            )
        return dag.kl_loss(
            *args,
            reg_coef=c.dag.reg_coef,
            kl_coef=c.dag.kl_coef,
            clip_range=c.dag.clip_range,
            adv_clip=c.dag.adv_clip,
            baseline_group=c.dag.baseline_group,
            **policy_kw,
        )

    @jax.jit
    def grad_step(trainable, frozen, batch, beta, grad_sum):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, frozen, batch, beta
        )
        return jax.tree.map(jnp.add, grad_sum, grads), metrics

    @jax.jit
    def state_flows(trainable, traj: Trajectory):
        flow = trainable["flow"]
        return dag.state_flows(model.flow_fn, flow, traj.latents, traj.timesteps, traj.context)

    @jax.jit
    def grad_step_per_state(trainable, frozen, batch, beta, grad_sum, state_flow, rows, cot):
        grad = jax.value_and_grad(loss_fn, argnums=(0, 4), has_aux=True)
        values = row_flows(state_flow, rows)
        (_, metrics), (grads, (g_t, g_s)) = grad(trainable, frozen, batch, beta, values)
        cot = scatter_state_cotangents(cot, rows, g_t, g_s)
        return jax.tree.map(jnp.add, grad_sum, grads), metrics, cot

    @jax.jit
    def flow_grad(trainable, states: Transitions, cotangent, grad_sum):
        vjp = lambda flow: dag.flow_vjp_loss(model.flow_fn, flow, states, cotangent)
        g = jax.grad(vjp)(trainable["flow"])
        return {**grad_sum, "flow": jax.tree.map(jnp.add, grad_sum["flow"], g)}

    @jax.jit
    def apply(trainable, opt_state, grad_sum, count, finite):
        grads = jax.tree.map(lambda g: g / count, grad_sum)
        updates, new_opt = tx.update(grads, opt_state, trainable)
        new = jax.tree.map(jnp.add, trainable, updates)
        keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)
        return keep(new, trainable), keep(new_opt, opt_state)

    @jax.jit
    def grid(frozen, trainable, ids, idx):
        keys = sample_keys(jax.random.key(c.seed + 12345), idx)
        traj, _ = from_noise(frozen, trainable, ids, keys, 0.0)
        return images_of(frozen, traj.final)

    phases = Phases(sample, prefix, branches, fl_rewards, grad_step, apply, grid, jax.jit(bound))
    if objective.startswith("dag"):
        phases.state_flows, phases.flow_grad = state_flows, flow_grad
        phases.grad_step_per_state = grad_step_per_state
    return phases


# --------------------------------------------------------------------------- one epoch


@dataclasses.dataclass
class LoopState:
    """What the loop carries from epoch to epoch (all of it is checkpointed)."""

    epoch: int
    trainable: dict
    opt_state: Any
    updates: int = 0
    trajectories_seen: int = 0
    unique_trajectories: int = 0
    nonfinite_streak: int = 0
    tracker: PerPromptStatTracker = dataclasses.field(default_factory=PerPromptStatTracker)
    history: b2.RewardHistory = dataclasses.field(default_factory=b2.RewardHistory)

    def extra(self) -> dict:
        """Return the JSON-serialisable part of the state."""
        return {
            "epoch": self.epoch,
            "updates": self.updates,
            "trajectories_seen": self.trajectories_seen,
            "unique_trajectories": self.unique_trajectories,
            "nonfinite_streak": self.nonfinite_streak,
            "tracker": self.tracker.state_dict(),
            "history": self.history.state_dict(),
        }

    def load_extra(self, extra: dict) -> None:
        """Restore the JSON-serialisable part of the state."""
        for name in ("epoch", "updates", "trajectories_seen", "unique_trajectories"):
            setattr(self, name, int(extra[name]))
        self.nonfinite_streak = int(extra.get("nonfinite_streak", 0))
        self.tracker.load_state_dict(extra["tracker"])
        self.history.load_state_dict(extra["history"])


def host_rng(config, epoch: int, purpose: int) -> np.random.Generator:
    """Return the host RNG of one epoch and purpose (same on every host and every restart)."""
    return np.random.default_rng([config.seed, epoch, purpose])


def score(model: Model, phases: Phases, images: jax.Array, prompt_idx: np.ndarray, mesh):
    """Return (B,) fp32 rewards on the host (JAX rewards jitted, host ones on gathered images)."""
    if model.reward.jittable:
        out = phases.reward(model.reward.params, images, _put(mesh, prompt_idx))
        return np.asarray(parallel.gather(out), np.float32)
    prompts = [model.prompts[i] for i in prompt_idx]
    return np.asarray(model.reward(np.asarray(parallel.gather(images)), prompts), np.float32)


def _concat(trajs: list[Trajectory]) -> Trajectory:
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *trajs)


def _rows(traj: Trajectory, index: np.ndarray) -> Trajectory:
    """Return the trajectories at ``index`` (a host int array)."""
    idx = jnp.asarray(index)
    return dataclasses.replace(
        traj,
        latents=traj.latents[idx],
        log_probs=traj.log_probs[idx],
        eps=traj.eps[idx],
        context=traj.context[idx],
        x0_cond=None if traj.x0_cond is None else traj.x0_cond[idx],
    )


@dataclasses.dataclass
class Collected:
    """An epoch's trajectories with their per-trajectory host data."""

    traj: Trajectory  # (N, K+1, ...) global arrays
    prompt_idx: np.ndarray  # (N,)
    rewards: np.ndarray  # (N,) reward of each final image
    advantage: np.ndarray  # (N,)
    weight: np.ndarray  # (N,) 1 = trained
    unique: int


def sample_scored(model: Model, phases: Phases, mesh, trainable, prompt_idx, ekey, chunk: int):
    """Return (trajectories, (N,) rewards) of sample indices 0..N−1 of ``prompt_idx``, by chunk."""
    trajs, rewards_ = [], []
    for lo in range(0, prompt_idx.size, chunk):
        idx = np.arange(lo, lo + chunk, dtype=np.int32)
        ids = _put(mesh, model.prompt_ids[prompt_idx[idx]])
        traj, images = phases.sample(model.frozen, trainable, ids, _put(mesh, idx), ekey)
        trajs.append(traj)
        rewards_.append(score(model, phases, images, prompt_idx[idx], mesh))
    return _concat(trajs), np.concatenate(rewards_)


def group_advantages(rewards_: np.ndarray, group: int, scale: str = "group") -> np.ndarray:
    """Return (N,) rewards standardised within consecutive groups of ``group``.

    The groups of ``sample.group`` share their prompt and initial noise x_T, so the baseline
    removes what x_T decides (most of a short sampler's reward variance) without bias: x_T is
    not an action of the policy. Each group's mean is subtracted; ``scale`` "group" divides by
    each group's own std (+ 1e-6), "pooled" by one std over every group's deviations (the
    root mean square of the groups' stds, + 1e-6), which keeps the groups' relative spreads.
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"scale must be one of {GROUP_SCALES}, got {scale!r}")
    r = np.asarray(rewards_, np.float64).reshape(-1, group)
    d = r - r.mean(1, keepdims=True)
    std = d.std(1, keepdims=True) if scale == "group" else np.sqrt(np.mean(d**2))
    return (d / (std + 1e-6)).reshape(-1).astype(np.float32)


def collect(model: Model, phases: Phases, config, mesh, state: LoopState, ekey) -> Collected:
    """Return the epoch's trajectories (plain sampling) with rewards and DDPO advantages."""
    c = config
    n, chunk = c.sample.trajectories, c.sample.chunk
    g = c.sample.group
    prompt_idx = np.repeat(host_rng(c, state.epoch, 0).integers(0, len(model.prompts), n // g), g)
    traj, r = sample_scored(model, phases, mesh, state.trainable, prompt_idx, ekey, chunk)
    adv = np.zeros(n, np.float32)
    if _objective(c) == "ddpo" and g > 1:  # standardised within each shared-x_T group
        adv = group_advantages(r, g, c.ddpo.group_scale)
    elif _objective(c) == "ddpo":  # DDPO's per-prompt running statistics (release)
        adv = np.asarray(state.tracker.update(prompt_idx.tolist(), r), np.float32)
    keys = jax.random.key_data(sample_keys(ekey, jnp.arange(n)))
    unique = parallel.count_unique(np.asarray(keys))
    return Collected(traj, prompt_idx, r, adv, np.ones(n, np.float32), unique)


def collect_b2(model: Model, phases: Phases, config, mesh, state: LoopState, ekey) -> Collected:
    """Return one B² stage: prefixes to the interval start, branches over the interval."""
    c = config
    length = b2.interval_length(state.epoch, c.b2.stages, c.b2.low, c.b2.high)
    start = c.sample.steps - length
    p, chunk, nb = c.b2.prefixes, min(c.sample.chunk, c.b2.prefixes), c.b2.branches
    prompt_idx = host_rng(c, state.epoch, 0).integers(0, len(model.prompts), p)
    trajs, rewards_ = [], []
    for lo in range(0, p, chunk):
        idx = np.arange(lo, lo + chunk, dtype=np.int32)
        ids = _put(mesh, model.prompt_ids[prompt_idx[idx]])
        x, ctx, keys = phases.prefix(
            model.frozen, state.trainable, ids, _put(mesh, idx), ekey, start
        )
        traj, images = phases.branches(model.frozen, state.trainable, x, ctx, keys, start, length)
        trajs.append(traj)
        rewards_.append(score(model, phases, images, np.repeat(prompt_idx[idx], nb), mesh))
    r = np.concatenate(rewards_).reshape(p, nb)
    state.history.add_stage(prompt_idx.tolist(), r)
    if c.b2.baseline == "prefix":  # within the branches of one prefix
        z = group_advantages(r.reshape(-1), nb, c.ddpo.group_scale)
        z = z.reshape(p, nb).astype(np.float64)
    else:  # against the prompt's pooled history (release)
        z = b2.group_zscores(prompt_idx.tolist(), r, state.history)
    if c.b2.objective != "ddpo":  # DAG objectives need no advantages: train every branch
        mask, adv = np.ones(z.shape, bool), np.zeros(z.shape)
    elif c.b2.select:
        sel = b2.select(z, c.b2.threshold, c.b2.adv_clip)
        mask, adv = sel.mask, sel.advantages
    else:  # PPO on every branch with its clipped z-score
        mask, adv = np.ones(z.shape, bool), np.clip(z, -c.b2.adv_clip, c.b2.adv_clip)
    return Collected(
        _concat(trajs),
        np.repeat(prompt_idx, nb),
        r.reshape(-1),
        adv.reshape(-1).astype(np.float32),
        mask.reshape(-1).astype(np.float32),
        p * nb,  # every branch has its own noise keys
    )


def train_on(
    model: Model, phases: Phases, config, mesh, state: LoopState, data: Collected, beta: float
) -> list[dict]:
    """Run the epoch's updates over windows of trajectories; return per-update metrics."""
    c = config
    kept = np.flatnonzero(data.weight > 0)
    if kept.size == 0:
        log.info("epoch %d: empty selection, no update", state.epoch)
        return []
    passes = c.b2.passes if c.algo == "b2" else (c.ddpo.inner_epochs if c.algo == "ddpo" else 1)
    w = c.train.trajectories_per_step
    out = []
    for p in range(passes):
        rng = host_rng(c, state.epoch, 10 + p)
        if _step_baseline(c):  # windows of whole trajectory groups (DAG keeps every row)
            groups = kept.reshape(-1, _trajectory_group(c))
            order = groups[rng.permutation(len(groups))].reshape(-1)
        else:
            order = kept[rng.permutation(kept.size)]
        for lo in range(0, order.size, w):
            window = order[lo : lo + w]
            out.append(update_window(model, phases, config, mesh, state, data, window, beta))
    return out


def context_table(mesh, contexts: jax.Array, rows: int) -> jax.Array:
    """Return a window's (N, L, D) context table padded to ``rows`` rows and replicated.

    One fixed shape for every window (B² windows are ragged), so the train step compiles once;
    replicated, so each device gathers its rows' contexts locally inside the step.
    """
    pad = rows - contexts.shape[0]
    if pad > 0:
        contexts = jnp.concatenate(
            [contexts, jnp.zeros((pad,) + contexts.shape[1:], contexts.dtype)]
        )
    return jax.device_put(contexts, parallel.replicated(mesh))


def micro_batch_shardings(mesh, batch: Transitions) -> Transitions:
    """Return the shardings of a micro-batch: rows split over all devices, tables replicated."""
    shardings = jax.tree.map(lambda a: parallel.batch_sharding(mesh, a.ndim), batch)
    return shardings.replace(**{name: parallel.replicated(mesh) for name in SHARED_FIELDS})


def padded_rows(rows: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (``rows`` padded to a multiple of ``size`` with its first row, 1/0 weights)."""
    pad = (-rows.size) % size
    weight = np.concatenate([np.ones(rows.size), np.zeros(pad)]).astype(np.float32)
    return np.concatenate([rows, np.full(pad, rows[0])]).astype(np.int32), weight


def flow_vjp(phases, mesh, trainable, batch, cotangent, grad_sum, chunk: int) -> dict:
    """Return ``grad_sum`` with φ's gradient Σ_states ∂L/∂F̃ · ∇_φ F̃ added, ``chunk`` at a time.

    ``batch``'s x_t rows are the window's states (``from_trajectory``), ``cotangent`` (B·K,)
    their accumulated ∂L/∂F̃; a ragged last chunk is padded with zero cotangents.
    """
    rows, keep = padded_rows(np.arange(batch.size), chunk)
    for lo in range(0, rows.size, chunk):
        index = jnp.asarray(rows[lo : lo + chunk])
        states = take(batch, index)
        states = jax.device_put(states, micro_batch_shardings(mesh, states))
        cot = cotangent[index] * jnp.asarray(keep[lo : lo + chunk])
        cot = jax.device_put(cot, parallel.batch_sharding(mesh, 1))
        grad_sum = phases.flow_grad(trainable, states, cot, grad_sum)
    return grad_sum


def update_window(model, phases, config, mesh, state, data: Collected, window, beta) -> dict:
    """Accumulate the gradients of a window's transitions; apply one optimizer update."""
    c = config
    traj = _rows(data.traj, window)
    state_rewards = None
    if _objective(c).startswith("dag"):
        state_rewards = phases.fl_rewards(
            model.frozen,
            state.trainable,
            model.reward.params,
            traj,
            _put(mesh, data.prompt_idx[window]),
        )
    batch = from_trajectory(
        traj,
        model.schedule,
        jnp.asarray(data.prompt_idx[window]),
        advantage=jnp.asarray(data.advantage[window]),
        state_rewards=state_rewards,
        weight=jnp.asarray(data.weight[window]),
    )
    batch = batch.replace(
        contexts=context_table(mesh, batch.contexts, c.train.trajectories_per_step)
    )
    mb = c.train.micro_batch
    rng = host_rng(c, state.epoch, 1000 + state.updates)
    if _step_baseline(c):  # blocks of one step of baseline_group trajectories
        steps = traj.log_probs.shape[1]
        rows = step_group_order(window.size, steps, c.dag.baseline_group, rng)
    else:
        rows = rng.permutation(batch.size)
    rows, weight = padded_rows(rows, mb)
    grad_sum = jax.tree.map(jnp.zeros_like, state.trainable)
    per_state = flow_per_state(c, model.schedule, traj.start, traj.log_probs.shape[1])
    if per_state:  # F̃ of every state once, forward only; ∂L/∂F̃ gathered per state
        rep = parallel.replicated(mesh)
        state_flow = jax.device_put(phases.state_flows(state.trainable, traj).reshape(-1), rep)
        cotangent = jax.device_put(jnp.zeros_like(state_flow), rep)
    metrics, count = [], 0
    for lo in range(0, rows.size, mb):
        index = jnp.asarray(rows[lo : lo + mb], jnp.int32)
        sub = take(batch, index)
        sub = sub.replace(weight=sub.weight * jnp.asarray(weight[lo : lo + mb]))
        sub = jax.device_put(sub, micro_batch_shardings(mesh, sub))
        args = (state.trainable, model.frozen, sub, jnp.float32(beta), grad_sum)
        if per_state:
            index = jax.device_put(index, rep)
            grad_sum, m, cotangent = phases.grad_step_per_state(*args, state_flow, index, cotangent)
        else:
            grad_sum, m = phases.grad_step(*args)
        metrics.append(m)
        count += 1
    if per_state:  # φ's gradient: one VJP of F̃ over the window's states
        grad_sum = flow_vjp(phases, mesh, state.trainable, batch, cotangent, grad_sum, 2 * mb)
    metrics = {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0]}
    finite = bool(np.isfinite(metrics["loss"]))
    if "flow" in state.trainable and state.epoch < c.dag.flow_warmup_epochs:
        # flow warm-up: the flow (and log Z) learn the current policy's flows first
        grad_sum = {**grad_sum, "lora": jax.tree.map(jnp.zeros_like, grad_sum["lora"])}
        metrics["policy_frozen"] = 1.0
    state.trainable, state.opt_state = phases.apply(
        state.trainable, state.opt_state, grad_sum, jnp.float32(count), jnp.bool_(finite)
    )
    state.updates += 1
    state.nonfinite_streak = 0 if finite else state.nonfinite_streak + 1
    if not finite:
        log.warning("update %d: non-finite loss, update skipped", state.updates)
        if state.nonfinite_streak >= c.train.max_nonfinite:
            raise NonFiniteLoss(
                f"{state.nonfinite_streak} consecutive updates had a non-finite loss "
                f"(train.max_nonfinite={c.train.max_nonfinite}); stopping. Lower the learning "
                "rate or check the reward for NaNs."
            )
    metrics["skipped_nonfinite"] = float(not finite)
    return metrics


# --------------------------------------------------------------------------- the run


def num_epochs(config) -> int:
    """Return the number of epochs (B²: stages) of the run."""
    return config.b2.stages if config.algo == "b2" else config.train.epochs


def write_grid(model, phases, config, mesh, state, writer) -> None:
    """Write a sample grid of fixed prompts × seeds (η = 0) to the workdir."""
    c = config
    p = min(c.log.grid_prompts, len(model.prompts))
    n = p * c.log.grid_seeds
    pidx = np.repeat(np.arange(p), c.log.grid_seeds)
    ids = _put(mesh, model.prompt_ids[pidx], batch_axis=False)
    idx = _put(mesh, np.arange(n, dtype=np.int32), batch_axis=False)
    images = parallel.gather(phases.grid(model.frozen, state.trainable, ids, idx))
    writer.write_images(state.epoch, "grid", np.asarray(images), rows=p)


class _Preemption:
    """Remembers a SIGTERM (TPU preemption) so the loop can save and stop cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._old = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint and stopping after the current window")
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> LoopState:
    """Run (or resume) the training run of ``config`` in ``workdir``; return the final state."""
    parallel.initialize_distributed()
    xla_cpu.tune_for_cpu()
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    validate(config, mesh.size)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    model = load_model(config, mesh)
    key = jax.random.key(config.seed)
    # committed, replicated from the start: the arrays the jitted phases return look the same,
    # so epoch 2 reuses epoch 1's programs instead of compiling them again
    replicate = functools.partial(_replicate, mesh)
    trainable = replicate(init_trainable(model, config, jax.random.fold_in(key, 1 << 31)))
    tx = make_tx(config, trainable)
    state = LoopState(
        epoch=0,
        trainable=trainable,
        opt_state=replicate(tx.init(trainable)),
        tracker=PerPromptStatTracker(config.ddpo.tracker_buffer, config.ddpo.tracker_min_count),
        history=b2.RewardHistory(config.b2.history),
    )
    phases = build_phases(model, config, tx)
    total = num_epochs(config)
    with Checkpointer(workdir / "checkpoints", config.checkpoint.max_to_keep) as ckpt:
        restored = ckpt.restore({"trainable": state.trainable, "opt_state": state.opt_state})
        if restored is not None:
            _, arrays, extra = restored
            state.trainable, state.opt_state = arrays["trainable"], arrays["opt_state"]
            state.load_extra(extra)
            log.info("resumed from epoch %d in %s", state.epoch, workdir)
        writer = MetricsWriter(workdir)
        writer.truncate_after(state.epoch)  # drop lines of epochs the checkpoint does not hold
        progress = ProgressLine(total, start_epoch=state.epoch)
        saved_epoch = state.epoch
        with _Preemption() as preempt:
            while state.epoch < total and not preempt.requested:
                start_state = (state.trainable, state.opt_state, state.extra())
                t0 = time.time()
                ekey = jax.random.fold_in(key, state.epoch)
                gather = collect_b2 if config.algo == "b2" else collect
                data = gather(model, phases, config, mesh, state, ekey)
                beta = dag.annealed_beta(
                    config.dag.beta, state.epoch, total, config.dag.anneal_fraction
                )
                updates = train_on(model, phases, config, mesh, state, data, beta)
                if preempt.requested:  # the epoch is incomplete: keep its start
                    state.trainable, state.opt_state, extra = start_state
                    state.load_extra(extra)
                    break
                state.trajectories_seen += int(data.rewards.size)
                state.unique_trajectories += int(data.unique)
                state.epoch += 1
                scalars = epoch_scalars(state, data, updates, beta, time.time() - t0)
                writer.write_scalars(state.epoch, scalars)
                line = progress.update(
                    state.epoch,
                    scalars["reward_mean"],
                    scalars["reward_std"],
                    scalars["loss"],
                    int(data.rewards.size),
                )
                if jax.process_index() == 0:
                    print(line, flush=True)
                if config.log.grid_every_epochs and state.epoch % config.log.grid_every_epochs == 0:
                    write_grid(model, phases, config, mesh, state, writer)
                if state.epoch % config.checkpoint.every_epochs == 0 or state.epoch == total:
                    ckpt.save(state.epoch, _arrays(state), state.extra())
                    saved_epoch = state.epoch
            if saved_epoch != state.epoch:
                ckpt.save(state.epoch, _arrays(state), state.extra())
            ckpt.wait_until_finished()
        writer.close()
    return state


def _replicate(mesh, tree):
    """Return ``tree`` as arrays replicated over ``mesh``."""
    rep = parallel.replicated(mesh)
    return parallel.put(tree, jax.tree.map(lambda _: rep, tree))


def _arrays(state: LoopState) -> dict:
    return {"trainable": state.trainable, "opt_state": state.opt_state}


def epoch_scalars(state: LoopState, data: Collected, updates: list[dict], beta, seconds) -> dict:
    """Return the metrics.jsonl record of an epoch."""
    out = {
        "epoch": state.epoch,
        "optimizer_updates": state.updates,
        "trajectories_seen": state.trajectories_seen,
        "unique_trajectories": state.unique_trajectories,
        "reward_mean": float(np.mean(data.rewards)),
        "reward_std": float(np.std(data.rewards)),
        "beta": float(beta),
        "epoch_updates": len(updates),
        "trained_fraction": float(np.mean(data.weight > 0)),
        "epoch_seconds": float(seconds),
        "trajectories_per_s": float(data.rewards.size / max(seconds, 1e-9)),
    }
    keys = sorted({k for u in updates for k in u})
    for k in keys:
        out[k] = float(np.mean([u[k] for u in updates if k in u]))
    out.setdefault("loss", float("nan"))
    return out


# --------------------------------------------------------------------------- CLI


def define_flags() -> None:
    """Define --config (ml_collections config file with overrides) and --workdir."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "experiment config file, e.g. configs/aesthetic.py:tiny", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "run folder (checkpoints, metrics, samples)")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    """absl entry point."""
    from absl import flags

    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = flags.FLAGS.config
    try:
        train_and_evaluate(cfg, flags.FLAGS.workdir)
    except (ConfigError, rewards.RewardError, NonFiniteLoss, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    from absl import app

    hostmem.preload_tcmalloc()
    define_flags()
    app.run(main)
