"""Trajectory rollouts: DDIM steps with CFG and log-probabilities inside ``lax.scan`` (SPEC §2).

Model-agnostic: everything takes ``eps_fn(params, x, t, context) -> model output`` (ε, v or x₀
per the schedule's prediction type), so the same code drives the SD UNet and a 2-D toy MLP.

Randomness is explicit: each sample owns a key (fold its *global* index into the epoch key,
see ``sample_keys``); the noise of step i is drawn from ``fold_in(sample_key, i)`` and branch b
of a sample uses ``fold_in(sample_key, BRANCH_SALT + b)``, so results do not depend on the batch
layout or the device mesh.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from dag_jax.diffusion import ddim
from dag_jax.diffusion.schedule import Schedule

EpsFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]
BRANCH_SALT = 1 << 20  # branch keys live far from step keys in fold_in space


@flax.struct.dataclass
class Trajectory:
    """A batch of denoising trajectories over steps [start, start + K), all fp32.

    latents[:, k] is the state before step start+k, latents[:, K] the final state.
    """

    latents: jax.Array  # (B, K+1, *x) fp32
    timesteps: jax.Array  # (K,) int32, t of each step
    log_probs: jax.Array  # (B, K) fp32, log p(x_s | x_t) of the sampled x_s (0 when η = 0)
    eps: jax.Array  # (B, K, *x) fp32 guided model output ε̃ (what the step used)
    context: jax.Array  # (B, L, D) conditional prompt embeddings
    # (B, K, *x) fp32 x̂₀ of each state from the conditional branch alone (no CFG), kept only
    # when the rollout asks for it (``keep_x0_cond``): DAG's forward-looking rewards from the
    # sampling pass (``dag.fl_source = "sampling"``, SPEC §4) need no extra UNet call
    x0_cond: jax.Array | None = None
    start: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def final(self) -> jax.Array:
        """Return the last state (x_0 when the rollout ran to the end)."""
        return self.latents[:, -1]


def sample_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
    """Return one key per sample, folding each *global* sample index into ``key``."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))


def branch_keys(keys: jax.Array, num_branches: int) -> jax.Array:
    """Return (B, num_branches) keys: branch b of sample i is fold_in(keys[i], SALT + b)."""
    salts = BRANCH_SALT + jnp.arange(num_branches, dtype=jnp.uint32)
    return jax.vmap(lambda k: jax.vmap(lambda s: jax.random.fold_in(k, s))(salts))(keys)


def step_noise(keys: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Return (B, *shape) N(0, 1) noise of one step, drawn from fold_in(keys[b], step)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape))(keys)


def guided_eps(
    eps_fn: EpsFn,
    params,
    x: jax.Array,
    t: jax.Array,
    context: jax.Array,
    uncond: jax.Array | None,
    guidance: float,
) -> jax.Array:
    """Return ε̃ = ε(∅) + w·(ε(c) − ε(∅)) from one model call on the [uncond; cond] batch."""
    return guided_and_cond_eps(eps_fn, params, x, t, context, uncond, guidance)[0]


def guided_and_cond_eps(
    eps_fn: EpsFn,
    params,
    x: jax.Array,
    t: jax.Array,
    context: jax.Array,
    uncond: jax.Array | None,
    guidance: float,
) -> tuple[jax.Array, jax.Array]:
    """Return (ε̃, ε(c)): the guided output and the conditional branch of the same call."""
    b = x.shape[0]
    t = jnp.broadcast_to(t, (b,))
    if uncond is None or guidance == 1.0:
        out = eps_fn(params, x, t, context).astype(jnp.float32)
        return out, out
    uncond = jnp.broadcast_to(uncond, context.shape)
    out = eps_fn(
        params,
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jnp.concatenate([uncond.astype(context.dtype), context]),
    ).astype(jnp.float32)
    e_u, e_c = out[:b], out[b:]
    return e_u + guidance * (e_c - e_u), e_c


def rollout(
    eps_fn: EpsFn,
    params,
    x: jax.Array,
    context: jax.Array,
    uncond: jax.Array | None,
    schedule: Schedule,
    keys: jax.Array,
    *,
    guidance: float = 5.0,
    eta: float = 1.0,
    start: int = 0,
    num_steps: int | None = None,
    reduction: str = "mean",
    keep_x0_cond: bool = False,
) -> Trajectory:
    """Return the Trajectory of DDIM steps [start, start + num_steps) from states ``x``.

    ``start``, ``num_steps``, ``guidance``, ``eta``, ``reduction`` and ``keep_x0_cond`` are
    static (Python values); ``keys`` holds one key per sample (``sample_keys``). With η = 0 no
    noise is drawn and log-probs are 0 (the step is deterministic). ``keep_x0_cond`` also
    returns each state's x̂₀ from the conditional branch (``Trajectory.x0_cond``), which the
    guided call computes anyway.
    """
    n = schedule.num_steps if num_steps is None else num_steps
    if not (0 <= start and start + n <= schedule.num_steps and n > 0):
        raise ValueError(
            f"steps [{start}, {start + n}) are outside the {schedule.num_steps}-step schedule"
        )
    x = x.astype(jnp.float32)
    steps = jnp.arange(start, start + n)

    def body(x_t, i):
        t = schedule.timesteps[i]
        a_t, a_s = schedule.alpha_t[i], schedule.alpha_s[i]
        eps, eps_c = guided_and_cond_eps(eps_fn, params, x_t, t, context, uncond, guidance)
        noise = step_noise(keys, i, x_t.shape[1:]) if eta > 0 else None
        x_s, mean, sigma, _ = ddim.ddim_step(
            x_t, eps, a_t, a_s, eta, noise, schedule.prediction_type
        )
        if eta > 0:
            logp = ddim.policy_logprob(x_s, mean, sigma, reduction)
        else:
            logp = jnp.zeros(x_t.shape[:1], jnp.float32)
        x0_c = None
        if keep_x0_cond:
            x0_c, _ = ddim.split_prediction(x_t, eps_c, a_t, schedule.prediction_type)
        return x_s, (x_t, logp, eps, x0_c)

    x_final, (states, logps, epss, x0s) = jax.lax.scan(body, x, steps)
    latents = jnp.concatenate([states, x_final[None]], axis=0)
    return Trajectory(
        latents=jnp.moveaxis(latents, 0, 1),
        timesteps=schedule.timesteps[start : start + n],
        log_probs=jnp.moveaxis(logps, 0, 1),
        eps=jnp.moveaxis(epss, 0, 1),
        context=context,
        x0_cond=None if x0s is None else jnp.moveaxis(x0s, 0, 1),
        start=start,
    )


def branch_rollout(
    eps_fn: EpsFn,
    params,
    x: jax.Array,
    context: jax.Array,
    uncond: jax.Array | None,
    schedule: Schedule,
    keys: jax.Array,
    num_branches: int,
    *,
    start: int,
    **kwargs,
) -> Trajectory:
    """Return (B·N_b)-row trajectories: each prefix state x[i] continued by N_b branches.

    Row i·N_b + b is branch b of sample i, with its own key ``branch_keys(keys)[i, b]``; the
    rollout covers steps [start, end) (``num_steps`` in kwargs), sharing x[i] as first state.
    """
    rep = lambda a: jnp.repeat(a, num_branches, axis=0)
    bkeys = branch_keys(keys, num_branches).reshape(-1, *keys.shape[1:])
    uncond_rep = None if uncond is None or uncond.shape[0] != x.shape[0] else rep(uncond)
    return rollout(
        eps_fn,
        params,
        rep(x),
        rep(context),
        uncond if uncond_rep is None else uncond_rep,
        schedule,
        bkeys,
        start=start,
        **kwargs,
    )
