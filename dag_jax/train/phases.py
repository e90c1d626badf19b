"""The compiled phases of a run: sampling, B² prefixes and branches, FL rewards, grad steps."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from dag_jax.algos import dag
from dag_jax.algos.transitions import (
    Transitions,
    row_flows,
    scatter_state_cotangents,
)
from dag_jax.diffusion.sampler import Trajectory, branch_rollout, rollout, sample_keys
from dag_jax.train import objectives
from dag_jax.train.config import fl_from_sampling, noise_group
from dag_jax.train.objectives.base import Objective
from dag_jax.train.run import Model
from dag_jax.train.state import ema_update

log = logging.getLogger("dag_jax.train")


@dataclasses.dataclass
class Phases:
    """The compiled functions of a run (built once; shapes are fixed by the config)."""

    sample: Any
    prefix: Any
    branches: Any
    fl_rewards: Any
    grad_step: Any  # (trainable, frozen, batch, beta, grad_sum) -> (grad_sum, metrics)
    # (trainable, opt_state, grad_sum, count, finite[, ema]) -> (…, …, finite, ema or None)
    apply: Any
    grid: Any
    reward: Any  # (reward params, images, prompt_idx) -> (B,) for JAX-native rewards
    # objectives with a flow, where states chain (``config.flow_per_state``): F̃ of a window's
    # states, the micro-batch step on those values (also returning per-state ∂L/∂F̃), and φ's
    # VJP over the states
    state_flows: Any = None  # (trainable, traj) -> (B, K)
    grad_step_per_state: Any = None  # (… grad_sum, state_flow, rows, cotangent) -> (+ cotangent)
    flow_grad: Any = None  # (trainable, state rows, cotangent, grad_sum) -> grad_sum


@dataclasses.dataclass
class Context:
    """What every phase of the loop computes with: model, config, mesh, compiled functions."""

    model: Model
    config: Any
    mesh: Any
    objective: Objective
    phases: Phases


def all_finite(tree) -> jax.Array:
    """Return whether every floating-point element of ``tree`` is finite (one fused reduction)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else True


def mesh_of(tree) -> Mesh | None:
    """Return the mesh of the first leaf of ``tree`` with a NamedSharding on one, else None.

    Arrays and ShapeDtypeStructs alike: the run's mesh, read off its frozen params.
    """
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            return sharding.mesh
    return None


class OnMesh:
    """A jitted function that traces, lowers and runs under a context mesh (``jax.set_mesh``).

    Code that asks for the mesh while it is traced (``jax.sharding.get_abstract_mesh()``:
    ``models.attention``'s ``auto`` and its ``shard_map`` of the Pallas kernel) then sees the
    run's mesh instead of none. The mesh is set around each call, ``lower`` and ``trace`` only
    and restored after: nothing process-wide changes. Called with tracers (inside
    ``jax.make_jaxpr`` or another jit, where ``jax.set_mesh`` is refused), it runs in the
    caller's context. Anything else (``eval_shape``, ``__name__``) is the jitted function's.
    """

    def __init__(self, fn, mesh: Mesh | None):
        self.fn, self.mesh = fn, mesh
        functools.update_wrapper(self, fn)

    def context(self, *args, **kwargs):
        """Return the context to call ``fn`` in: the mesh, unless none or under a trace."""
        leaves = jax.tree.leaves((args, kwargs))
        if self.mesh is None or any(isinstance(x, jax.core.Tracer) for x in leaves):
            return contextlib.nullcontext()
        return jax.set_mesh(self.mesh)

    def __call__(self, *args, **kwargs):
        with self.context(*args, **kwargs):
            return self.fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with self.context(*args, **kwargs):
            return self.fn.lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        with self.context(*args, **kwargs):
            return self.fn.trace(*args, **kwargs)

    def __getattr__(self, name):
        if name in ("fn", "mesh"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.fn, name)


def on_mesh(phases: Phases, mesh: Mesh | None) -> Phases:
    """Return ``phases`` with every function an ``OnMesh`` of ``mesh`` (None: as they are)."""
    if mesh is None:
        return phases
    fns = {f.name: getattr(phases, f.name) for f in dataclasses.fields(phases)}
    return dataclasses.replace(
        phases, **{k: OnMesh(fn, mesh) for k, fn in fns.items() if callable(fn)}
    )


def build_phases(model: Model, config, tx, mesh: Mesh | None = None) -> Phases:
    """Return the jitted phase functions, closed over the static model and config.

    Each traces, compiles and runs under ``mesh`` (``OnMesh``; default: the mesh the frozen
    params live on, ``mesh_of``), so mesh-aware code inside sees it (``attention="auto"``).
    The steps that consume their input state donate it (``donate_argnames``): ``apply`` its
    trainable tree, optimizer state and EMA, the gradient steps their running gradient sum
    (and per-state cotangent). A caller must not use those arrays after the call; the
    non-finite rollback selects the kept values inside ``apply``, so it needs nothing donated.
    """
    c = config
    mesh = mesh_of(model.frozen) if mesh is None else mesh
    objective = objectives.get(c)
    schedule = model.schedule
    bound = model.reward.bound_with_params(model.prompts)
    policy_kw = dict(guidance=c.sample.guidance, eta=c.sample.eta, reduction=objective.reduction)
    keep = fl_from_sampling(c)  # rollouts keep x̂₀^cond of every state for the FL rewards
    # what the steps return stays where the trainable tree lives (train.trainable=unet: the
    # gradient sum, params and optimizer state sharded on fsdp, the gradients reduce-scattered)
    layout = model.trainable_layout
    shared = noise_group(c)  # consecutive trajectories that share x_T

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
        # sample.group (GRPO: grpo.group, config.noise_group) consecutive trajectories share
        # x_T (the key of their group's first index); every trajectory keeps its own step
        # noise. group 1: x_T of its own key.
        noise_keys = sample_keys(ekey, idx // shared * shared)
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
        return objective.loss(model, c, params, batch, beta)

    @functools.partial(jax.jit, donate_argnames="grad_sum")
    def grad_step(trainable, frozen, batch, beta, grad_sum):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, frozen, batch, beta
        )
        return layout.constrain(jax.tree.map(jnp.add, grad_sum, grads)), metrics

    @jax.jit
    def state_flows(trainable, traj: Trajectory):
        flow = trainable["flow"]
        return dag.state_flows(model.flow_fn, flow, traj.latents, traj.timesteps, traj.context)

    @functools.partial(jax.jit, donate_argnames=("grad_sum", "cot"))
    def grad_step_per_state(trainable, frozen, batch, beta, grad_sum, state_flow, rows, cot):
        grad = jax.value_and_grad(loss_fn, argnums=(0, 4), has_aux=True)
        values = row_flows(state_flow, rows)
        (_, metrics), (grads, (g_t, g_s)) = grad(trainable, frozen, batch, beta, values)
        cot = scatter_state_cotangents(cot, rows, g_t, g_s)
        return layout.constrain(jax.tree.map(jnp.add, grad_sum, grads)), metrics, cot

    @functools.partial(jax.jit, donate_argnames="grad_sum")
    def flow_grad(trainable, states: Transitions, cotangent, grad_sum):
        vjp = lambda flow: dag.flow_vjp_loss(model.flow_fn, flow, states, cotangent)
        g = jax.grad(vjp)(trainable["flow"])
        return layout.constrain({**grad_sum, "flow": jax.tree.map(jnp.add, grad_sum["flow"], g)})

    @functools.partial(jax.jit, donate_argnames=("trainable", "opt_state", "ema"))
    def apply(trainable, opt_state, grad_sum, count, finite, ema=None):
        # the new state is kept only when the loss and every new array are finite; the EMA
        # (train.ema_decay, None: off) moves only with an accepted update
        grads = jax.tree.map(lambda g: g / count, grad_sum)
        updates, new_opt = tx.update(grads, opt_state, trainable)
        new = jax.tree.map(jnp.add, trainable, updates)
        finite = finite & all_finite((new, new_opt))
        keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)
        if ema is not None:
            ema = ema_update(ema, new, c.train.ema_decay, finite)
        new, new_opt = layout.constrain((keep(new, trainable), keep(new_opt, opt_state)))
        return new, new_opt, finite, layout.constrain(ema)

    @jax.jit
    def grid(frozen, trainable, ids, idx):
        keys = sample_keys(jax.random.key(c.seed + 12345), idx)
        traj, _ = from_noise(frozen, trainable, ids, keys, 0.0)
        return images_of(frozen, traj.final)

    phases = Phases(sample, prefix, branches, fl_rewards, grad_step, apply, grid, jax.jit(bound))
    if objective.uses_flow:
        phases.state_flows, phases.flow_grad = state_flows, flow_grad
        phases.grad_step_per_state = grad_step_per_state
    return on_mesh(phases, mesh)
