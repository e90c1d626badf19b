"""Sampling and scoring an epoch: trajectories, rewards, advantages (DDPO, B² selection)."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.algos import b2
from dag_jax.diffusion.sampler import Trajectory, sample_keys
from dag_jax.infra import parallel
from dag_jax.train.config import GROUP_SCALES, objective_of
from dag_jax.train.phases import Phases
from dag_jax.train.run import Model, put_batch
from dag_jax.train.state import LoopState, host_rng

log = logging.getLogger("dag_jax.train")


def score(model: Model, phases: Phases, images: jax.Array, prompt_idx: np.ndarray, mesh):
    """Return (B,) fp32 rewards on the host (JAX rewards jitted, host ones on gathered images)."""
    if model.reward.jittable:
        out = phases.reward(model.reward.params, images, put_batch(mesh, prompt_idx))
        return np.asarray(parallel.gather(out), np.float32)
    prompts = [model.prompts[i] for i in prompt_idx]
    return np.asarray(model.reward(np.asarray(parallel.gather(images)), prompts), np.float32)


def concat_trajectories(trajs: list[Trajectory]) -> Trajectory:
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
        ids = put_batch(mesh, model.prompt_ids[prompt_idx[idx]])
        traj, images = phases.sample(model.frozen, trainable, ids, put_batch(mesh, idx), ekey)
        trajs.append(traj)
        rewards_.append(score(model, phases, images, prompt_idx[idx], mesh))
    return concat_trajectories(trajs), np.concatenate(rewards_)


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
    if objective_of(c) == "ddpo" and g > 1:  # standardised within each shared-x_T group
        adv = group_advantages(r, g, c.ddpo.group_scale)
    elif objective_of(c) == "ddpo":  # DDPO's per-prompt running statistics (release)
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
        ids = put_batch(mesh, model.prompt_ids[prompt_idx[idx]])
        x, ctx, keys = phases.prefix(
            model.frozen, state.trainable, ids, put_batch(mesh, idx), ekey, start
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
        concat_trajectories(trajs),
        np.repeat(prompt_idx, nb),
        r.reshape(-1),
        adv.reshape(-1).astype(np.float32),
        mask.reshape(-1).astype(np.float32),
        p * nb,  # every branch has its own noise keys
    )
