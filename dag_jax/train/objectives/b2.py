"""B²-DiffuRL: backward progressive intervals and branch sampling (SPEC §7).

Its loss, row order and flow come from ``b2.objective`` (the release: DDPO's PPO surrogate
with ε = 0.1; or DAG-DB / DAG-KL, which train every branch without selection).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from dag_jax.algos import b2
from dag_jax.algos.stats import group_advantages
from dag_jax.algos.transitions import release_windows
from dag_jax.train.collect import Collected, branch_sampled_parts
from dag_jax.train.config import step_baseline
from dag_jax.train.objectives import dag_db, dag_kl, ddpo
from dag_jax.train.objectives.base import Objective, shuffled_windows
from dag_jax.train.state import host_rng

log = logging.getLogger("dag_jax.train")
INNER = {"ddpo": ddpo.objective, "dag_db": dag_db.objective, "dag_kl": dag_kl.objective}


def trackers(config) -> dict:
    """Return B²'s empty reward history (``b2.history`` stages back)."""
    return {"history": b2.RewardHistory(config.b2.history).state_dict()}


def collect(ctx, state, ekey):
    """Return one stage: prefixes to the interval start, branches over it, z-scores, selection."""
    c = ctx.config
    length = b2.interval_length(state.epoch, c.b2.stages, c.b2.low, c.b2.high)
    p, nb = c.b2.prefixes, c.b2.branches
    prompt_idx = host_rng(c, state.epoch, 0).integers(0, len(ctx.model.prompts), p)
    traj, r, parts = branch_sampled_parts(ctx, state.trainable, prompt_idx, ekey, length)
    r = r.reshape(p, nb)
    history = b2.RewardHistory(c.b2.history)
    history.load_state_dict(state.trackers["history"])
    history.add_stage(prompt_idx.tolist(), r)
    if c.b2.baseline == "prefix":  # within the branches of one prefix (an improvement)
        z = group_advantages(r.reshape(-1), nb, c.ddpo.group_scale)
        z = z.reshape(p, nb).astype(np.float64)
    else:  # against the prompt's pooled history (release)
        z = b2.group_zscores(prompt_idx.tolist(), r, history)
    if c.b2.objective != "ddpo":  # DAG objectives need no advantages: train every branch
        mask, adv = np.ones(z.shape, bool), np.zeros(z.shape)
    elif c.b2.select:
        sel = b2.select(z, c.b2.threshold, c.b2.adv_clip)
        mask, adv = sel.mask, sel.advantages
    else:  # PPO on every branch with its clipped z-score (an improvement)
        mask, adv = np.ones(z.shape, bool), np.clip(z, -c.b2.adv_clip, c.b2.adv_clip)
    data = Collected(
        traj,
        np.repeat(prompt_idx, nb),
        r.reshape(-1),
        adv.reshape(-1).astype(np.float32),
        mask.reshape(-1).astype(np.float32),
        p * nb,  # every branch has its own noise keys
        parts,
    )
    return data, state.replace(trackers={**state.trackers, "history": history.state_dict()})


def windows(config, epoch, data):
    """Return the stage's update windows over ``b2.passes`` passes.

    With its released objective, the passes are one stream of windows of
    ``train.trajectories_per_step`` trajectories and only full windows update (a pass's
    leftover joins the next pass's first window; the last partial window and each pass's odd
    last sample are dropped, SPEC §7). The DAG objectives (no release to match) keep windows
    within each pass, the last one partial, so every transition trains and no window holds a
    trajectory twice (per-state flows and DAG-KL's groups need distinct trajectories).
    """
    c = config
    if c.b2.objective != "ddpo":
        group = c.b2.branches if step_baseline(c) else 1
        return shuffled_windows(c, epoch, data, c.b2.passes, group)
    kept = np.flatnonzero(data.weight > 0)
    orders = [kept[host_rng(c, epoch, 10 + p).permutation(kept.size)] for p in range(c.b2.passes)]
    full, dropped = release_windows(orders, c.train.trajectories_per_step)
    if dropped:
        log.info(
            "epoch %d: %d trajectory passes dropped (B² steps on full windows)", epoch, dropped
        )
    return full, dropped


def objective(config) -> Objective:
    """Return B² around the loss of ``b2.objective`` (DDPO's with B²'s clip settings)."""
    inner = INNER[config.b2.objective](config)
    if config.b2.objective == "ddpo":
        inner = dataclasses.replace(
            inner, loss=ddpo.ppo_loss(config.b2.clip_range, config.b2.adv_clip)
        )
    return dataclasses.replace(
        inner, name="b2", trackers=trackers, collect=collect, windows=windows
    )
