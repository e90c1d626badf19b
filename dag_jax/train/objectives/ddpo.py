"""DDPO (the RL baseline): PPO on per-prompt standardised rewards (or shared-x_T groups)."""

from __future__ import annotations

import numpy as np

from dag_jax.algos import ddpo
from dag_jax.algos.stats import PerPromptStatTracker, group_advantages
from dag_jax.train.objectives.base import Objective, permuted_rows, sample_epoch, shuffled_windows


def trackers(config) -> dict:
    """Return DDPO's empty per-prompt reward buffers (``ddpo.tracker_*``)."""
    tracker = PerPromptStatTracker(config.ddpo.tracker_buffer, config.ddpo.tracker_min_count)
    return {"tracker": tracker.state_dict()}


def collect(ctx, state, ekey):
    """Return the epoch's trajectories with DDPO advantages, and the updated trackers."""
    c = ctx.config
    data = sample_epoch(ctx, state, ekey)
    if c.sample.group > 1:  # standardised within each shared-x_T group (an improvement)
        data.advantage[:] = group_advantages(data.rewards, c.sample.group, c.ddpo.group_scale)
        return data, state
    tracker = PerPromptStatTracker(c.ddpo.tracker_buffer, c.ddpo.tracker_min_count)
    tracker.load_state_dict(state.trackers["tracker"])
    adv = tracker.update(data.prompt_idx.tolist(), data.rewards)  # the release
    data.advantage[:] = np.asarray(adv, np.float32)
    return data, state.replace(trackers={**state.trackers, "tracker": tracker.state_dict()})


def windows(config, epoch, data):
    """Return ``ddpo.inner_epochs`` passes of shuffled windows."""
    return shuffled_windows(config, epoch, data, config.ddpo.inner_epochs)


def ppo_loss(clip_range: float, adv_clip: float):
    """Return the PPO surrogate loss of DDPO with these clip settings."""

    def loss(model, config, params, batch, beta):
        del beta
        return ddpo.ddpo_loss(
            model.eps_fn,
            params["policy"],
            batch,
            model.uncond,
            clip_range=clip_range,
            adv_clip=adv_clip,
            guidance=config.sample.guidance,
            eta=config.sample.eta,
            reduction="mean",
        )

    return loss


def objective(config) -> Objective:
    """Return DDPO with the release's per-prompt tracker (or ``sample.group`` groups)."""
    return Objective(
        name="ddpo",
        uses_flow=False,
        reduction="mean",
        trackers=trackers,
        collect=collect,
        windows=windows,
        row_order=permuted_rows,
        loss=ppo_loss(config.ddpo.clip_range, config.ddpo.adv_clip),
    )
