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
from dag_jax.rewards.mix import MixReward
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
    # a mix's unweighted part scores, part name -> (N,) (logged as reward/<name>); else empty
    parts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def score(ctx: Context, images: jax.Array, prompt_idx: np.ndarray) -> np.ndarray:
    """Return the (B,) fp32 rewards of every row, on every process."""
    return score_parts(ctx, images, prompt_idx)[0]


def score_parts(
    ctx: Context, images: jax.Array, prompt_idx: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return ((B,) fp32 rewards, {part name: (B,) part scores}) of every row, on every process.

    JAX rewards run jitted on the sharded images (each device its rows); a host reward is
    called by each process on its own rows only (``parallel.local_rows``), and only the
    per-row scalars are gathered. A weighted mix (``rewards.mix``) scores each part once and
    returns them beside their weighted sum; other rewards have no parts ({}).
    """
    model = ctx.model
    if isinstance(model.reward, MixReward):
        return _score_mix(ctx, model.reward, images, prompt_idx)
    if model.reward.jittable:
        fn = scorer(model.reward, model.prompts, to_host=parallel.gather, jitted=ctx.phases.reward)
        return fn(images, put_batch(ctx.mesh, prompt_idx)), {}
    rows, local = parallel.local_rows(images)
    values = scorer(model.reward, model.prompts)(local, prompt_idx[rows]) if rows.size else []
    values = parallel.rows_to_global(rows, np.asarray(values, np.float32), prompt_idx.size)
    return values, {}


def _score_mix(
    ctx: Context, reward: MixReward, images: jax.Array, prompt_idx: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return (weighted sums, part scores) of a mix: in the graph, or on each process's rows."""
    prompts = ctx.model.prompts
    if reward.jittable:
        fn = reward.parts_scorer(prompts, to_host=parallel.gather)
        table = fn(images, put_batch(ctx.mesh, prompt_idx))
    else:
        rows, local = parallel.local_rows(images)
        n = len(reward.part_names)
        values = reward.parts_scorer(prompts)(local, prompt_idx[rows]) if rows.size else None
        values = np.zeros((0, n), np.float32) if values is None else values
        table = np.stack(
            [parallel.rows_to_global(rows, values[:, i], prompt_idx.size) for i in range(n)],
            axis=-1,
        ).astype(np.float32)
    parts = {name: table[:, i] for i, name in enumerate(reward.part_names)}
    return np.asarray(reward.combine(table), np.float32), parts


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
    return sample_scored_parts(ctx, trainable, prompt_idx, ekey, chunk)[:2]


def sample_scored_parts(
    ctx: Context, trainable: dict, prompt_idx: np.ndarray, ekey: jax.Array, chunk: int
) -> tuple[Trajectory, np.ndarray, dict[str, np.ndarray]]:
    """Return ``sample_scored``'s (trajectories, rewards) and a mix's (N,) part scores."""
    model, mesh = ctx.model, ctx.mesh
    trajs, rewards, parts = [], [], []
    for lo in range(0, prompt_idx.size, chunk):
        idx = np.arange(lo, lo + chunk, dtype=np.int32)
        ids = put_batch(mesh, model.prompt_ids[prompt_idx[idx]])
        traj, images = ctx.phases.sample(model.frozen, trainable, ids, put_batch(mesh, idx), ekey)
        trajs.append(traj)
        total, part = score_parts(ctx, images, prompt_idx[idx])
        rewards.append(total)
        parts.append(part)
    return concat_trajectories(trajs), np.concatenate(rewards), concat_parts(parts)


def concat_parts(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Return the part scores of a list of chunks, each part's rows concatenated."""
    return {k: np.concatenate([c[k] for c in chunks]) for k in (chunks[0] if chunks else {})}


def branch_sampled(
    ctx: Context, trainable: dict, prompt_idx: np.ndarray, ekey: jax.Array, length: int
) -> tuple[Trajectory, np.ndarray]:
    """Return (branch trajectories over the last ``length`` steps, (P·Nb,) rewards).

    Each prompt's prefix runs x_T to the interval start; ``b2.branches`` branches finish it
    with their own noise. Rows are prefix-major (a prefix's branches are consecutive).
    """
    return branch_sampled_parts(ctx, trainable, prompt_idx, ekey, length)[:2]


def branch_sampled_parts(
    ctx: Context, trainable: dict, prompt_idx: np.ndarray, ekey: jax.Array, length: int
) -> tuple[Trajectory, np.ndarray, dict[str, np.ndarray]]:
    """Return ``branch_sampled``'s (trajectories, rewards) and a mix's (P·Nb,) part scores."""
    c, model, mesh = ctx.config, ctx.model, ctx.mesh
    start, nb = c.sample.steps - length, c.b2.branches
    chunk = min(c.sample.chunk, prompt_idx.size)
    trajs, rewards, parts = [], [], []
    for lo in range(0, prompt_idx.size, chunk):
        idx = np.arange(lo, lo + chunk, dtype=np.int32)
        ids = put_batch(mesh, model.prompt_ids[prompt_idx[idx]])
        x, context, keys = ctx.phases.prefix(
            model.frozen, trainable, ids, put_batch(mesh, idx), ekey, start
        )
        traj, images = ctx.phases.branches(model.frozen, trainable, x, context, keys, start, length)
        trajs.append(traj)
        total, part = score_parts(ctx, images, np.repeat(prompt_idx[idx], nb))
        rewards.append(total)
        parts.append(part)
    return concat_trajectories(trajs), np.concatenate(rewards), concat_parts(parts)
