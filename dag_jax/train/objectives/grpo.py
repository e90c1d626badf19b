"""GRPO: G trajectories per prompt, group-standardised advantages, PPO-clip per denoising step,
an optional per-step KL(π_θ ‖ π_ref) to the base UNet (``algos.grpo``).

The groups are ``grpo.group`` consecutive trajectories of one prompt; with
``grpo.share_noise`` they also share x_T (``config.noise_group``, used by the sampler).
"""

from __future__ import annotations

import numpy as np

from dag_jax.algos import grpo
from dag_jax.algos.stats import group_advantages
from dag_jax.train.collect import Collected, sample_scored_parts, unique_count
from dag_jax.train.objectives.base import Objective, no_trackers, permuted_rows, shuffled_windows
from dag_jax.train.state import host_rng


def draw_group_prompts(config, num_prompts: int, epoch: int) -> np.ndarray:
    """Return the epoch's (N,) prompt indices: ``grpo.group`` consecutive rows share one."""
    n, g = config.sample.trajectories, config.grpo.group
    return np.repeat(host_rng(config, epoch, 0).integers(0, num_prompts, n // g), g)


def collect(ctx, state, ekey):
    """Return the epoch's trajectories with advantages standardised within each group."""
    c, n = ctx.config, ctx.config.sample.trajectories
    prompt_idx = draw_group_prompts(c, len(ctx.model.prompts), state.epoch)
    traj, rewards, parts = sample_scored_parts(
        ctx, state.trainable, prompt_idx, ekey, c.sample.chunk
    )
    advantage = group_advantages(rewards, c.grpo.group, "group")
    ones = np.ones(n, np.float32)
    data = Collected(traj, prompt_idx, rewards, advantage, ones, unique_count(ekey, n), parts)
    return data, state


def windows(config, epoch, data):
    """Return one pass of shuffled windows (advantages are per trajectory: no group windows)."""
    return shuffled_windows(config, epoch, data, 1)


def reference_policy(policy: dict) -> dict:
    """Return the reference policy π_ref: the same base UNet params with the LoRA switched off.

    An empty ``lora`` collection adds no delta to any projection (``models.layers``), so the
    reference costs one more forward of the frozen UNet and no copy of its weights.
    """
    return {**policy, "lora": {}}


def loss(model, config, params, batch, beta):
    """Return GRPO's PPO-clip loss (+ grpo.kl · KL to the base UNet) and its metrics."""
    del beta
    c = config
    return grpo.grpo_loss(
        model.eps_fn,
        params["policy"],
        reference_policy(params["policy"]),
        batch,
        model.uncond,
        guidance=c.sample.guidance,
        eta=c.sample.eta,
        prediction_type=model.schedule.prediction_type,
        reduction="mean",
        clip_range=c.grpo.clip_range,
        adv_clip=c.grpo.adv_clip,
        kl_coef=float(c.grpo.kl),
    )


def objective(config) -> Objective:
    """Return GRPO."""
    return Objective(
        name="grpo",
        uses_flow=False,
        reduction="mean",
        trackers=no_trackers,
        collect=collect,
        windows=windows,
        row_order=permuted_rows,
        loss=loss,
    )
