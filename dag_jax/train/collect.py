"""Sampling and scoring for an epoch: plain trajectories or B²'s prefixes and branches.

What the objectives build their epochs from (``objectives/``); advantages are theirs.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.diffusion.sampler import Trajectory, sample_keys
from dag_jax.infra import parallel
from dag_jax.rewards.base import scorer
from dag_jax.train.run import put_batch

if TYPE_CHECKING:
    from dag_jax.train.phases import Context


@dataclasses.dataclass
class Collected:
    """An epoch's trajectories with their per-trajectory host data."""

    traj: Trajectory  # (N, K+1, ...) global arrays
    prompt_idx: np.ndarray  # (N,)
    rewards: np.ndarray  # (N,) reward of each final image
    advantage: np.ndarray  # (N,)
    weight: np.ndarray  # (N,) 1 = trained
    unique: int


def score(ctx: Context, images: jax.Array, prompt_idx: np.ndarray) -> np.ndarray:
    """Return the (B,) fp32 rewards of every row, on every process.

    JAX rewards run jitted on the sharded images (each device its rows); a host reward is
    called by each process on its own rows only (``parallel.local_rows``), and only the
    per-row scalars are gathered.
    """
    model = ctx.model
    if model.reward.jittable:
        fn = scorer(model.reward, model.prompts, to_host=parallel.gather, jitted=ctx.phases.reward)
        return fn(images, put_batch(ctx.mesh, prompt_idx))
    rows, local = parallel.local_rows(images)
    values = scorer(model.reward, model.prompts)(local, prompt_idx[rows]) if rows.size else []
    return parallel.rows_to_global(rows, np.asarray(values, np.float32), prompt_idx.size)


def concat_trajectories(trajs: list[Trajectory]) -> Trajectory:
    """Return the trajectories of a list of chunks as one batch."""
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *trajs)


def take_rows(traj: Trajectory, index: np.ndarray) -> Trajectory:
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


def unique_count(ekey: jax.Array, n: int) -> int:
    """Return how many of the epoch's sample indices 0..n−1 have distinct noise keys."""
    keys = jax.random.key_data(sample_keys(ekey, jnp.arange(n)))
    return parallel.count_unique(np.asarray(keys))


def sample_scored(
    ctx: Context, trainable: dict, prompt_idx: np.ndarray, ekey: jax.Array, chunk: int
) -> tuple[Trajectory, np.ndarray]:
    """Return (trajectories, (N,) rewards) of sample indices 0..N−1 of ``prompt_idx``, by chunk."""
    model, mesh = ctx.model, ctx.mesh
    trajs, rewards = [], []
    for lo in range(0, prompt_idx.size, chunk):
        idx = np.arange(lo, lo + chunk, dtype=np.int32)
        ids = put_batch(mesh, model.prompt_ids[prompt_idx[idx]])
        traj, images = ctx.phases.sample(model.frozen, trainable, ids, put_batch(mesh, idx), ekey)
        trajs.append(traj)
        rewards.append(score(ctx, images, prompt_idx[idx]))
    return concat_trajectories(trajs), np.concatenate(rewards)


def branch_sampled(
    ctx: Context, trainable: dict, prompt_idx: np.ndarray, ekey: jax.Array, length: int
) -> tuple[Trajectory, np.ndarray]:
    """Return (branch trajectories over the last ``length`` steps, (P·Nb,) rewards).

    Each prompt's prefix runs x_T to the interval start; ``b2.branches`` branches finish it
    with their own noise. Rows are prefix-major (a prefix's branches are consecutive).
    """
    c, model, mesh = ctx.config, ctx.model, ctx.mesh
    start, nb = c.sample.steps - length, c.b2.branches
    chunk = min(c.sample.chunk, prompt_idx.size)
    trajs, rewards = [], []
    for lo in range(0, prompt_idx.size, chunk):
        idx = np.arange(lo, lo + chunk, dtype=np.int32)
        ids = put_batch(mesh, model.prompt_ids[prompt_idx[idx]])
        x, context, keys = ctx.phases.prefix(
            model.frozen, trainable, ids, put_batch(mesh, idx), ekey, start
        )
        traj, images = ctx.phases.branches(model.frozen, trainable, x, context, keys, start, length)
        trajs.append(traj)
        rewards.append(score(ctx, images, np.repeat(prompt_idx[idx], nb)))
    return concat_trajectories(trajs), np.concatenate(rewards)
