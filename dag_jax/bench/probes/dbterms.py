"""What the DB residual is made of, step by step: ``python -m dag_jax.bench dbterms``.

    python -m dag_jax.bench dbterms --tasks=compressibility,alignment --batch=128 --groups=8 \
        --json=dbterms.json

A diagnostic of the tiny world (``configs/<task>.py:demo``'s model, reward and sampler) that
needs no training run. ``--batch`` trajectories of the base model, in groups of G (the last of
``--groups``) sharing prompt and x_T, are split per denoising step k into the two parts of the
DB residual Δ = log F(x_t) + log p_θ(x_s|x_t) − log P_B(x_t|x_s) − log F(x_s) that exist before
any flow is learnt (SPEC §4; log-probs reduced as ``dag.reduction``):

  logratio_mean_kK, logratio_std_kK   log p_θ − log P_B: its mean and spread at step K
  reward_change_mean_kK               r(x̂₀(x_s)) − r(x̂₀(x_t)), the forward-looking reward's
  reward_change_std_kK                change (times β in Δ), its mean, spread, and spread
  reward_change_std_within_group_kK   within a shared-x_T group

Per-step means far above the spreads are offsets a flow has to learn before DB's policy
gradient 2Δ·∇log p_θ carries the reward (``dag.baseline`` = "step" removes them from it).
Records: ``impl`` = ``groupG``, ``config`` has the task.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.bench.common import Settings, machine_info, record
from dag_jax.bench.tinyworld import base_world, demo_config
from dag_jax.diffusion import ddim
from dag_jax.train.collect import sample_scored


def dbterms(task: str, group: int, batch: int, seed: int) -> dict[str, float]:
    """Return the per-step metrics of one task (see the module docstring)."""
    config = demo_config(task, "dag_db", seed)
    config.sample.group = group
    chunk = min(64, batch)
    if batch % chunk or chunk % group or group < 2:
        raise ValueError(
            f"--batch ({batch}) must split into chunks of {chunk} and groups of {group} >= 2"
        )
    config.sample.chunk = chunk
    ctx, trainable = base_world(config)
    model = ctx.model
    rng = np.random.default_rng(seed)
    prompt_idx = np.repeat(rng.integers(0, len(model.prompts), batch // group), group)
    traj, _ = sample_scored(ctx, trainable, prompt_idx, jax.random.key(seed), chunk)
    state_rewards = ctx.phases.fl_rewards(
        model.frozen, trainable, model.reward.params, traj, jnp.asarray(prompt_idx)
    )
    state_rewards = np.asarray(state_rewards, np.float64)  # (B, K+1)
    schedule, latents = model.schedule, traj.latents
    out = {}
    for k in range(traj.log_probs.shape[1]):
        log_pb = ddim.backward_logprob(
            latents[:, k],
            latents[:, k + 1],
            schedule.alpha_t[k],
            schedule.alpha_s[k],
            config.dag.reduction,
        )
        ratio = np.asarray(traj.log_probs[:, k], np.float64) - np.asarray(log_pb, np.float64)
        change = state_rewards[:, k + 1] - state_rewards[:, k]
        out[f"logratio_mean_k{k}"] = float(ratio.mean())
        out[f"logratio_std_k{k}"] = float(ratio.std())
        out[f"reward_change_mean_k{k}"] = float(change.mean())
        out[f"reward_change_std_k{k}"] = float(change.std())
        within = change.reshape(-1, group).std(axis=1).mean()
        out[f"reward_change_std_within_group_k{k}"] = float(within)
    return out


def bench_dbterms(settings: Settings) -> list[dict]:
    """Return the per-step DB-term records of every task of ``settings``."""
    tasks = [t for t in settings.tasks.split(",") if t]
    group = int(settings.groups.split(",")[-1])  # default "1,8": 8
    records = []
    for task in tasks:
        metrics = dbterms(task, group, settings.batch, settings.seed)
        config = {"task": task, "group": group, "batch": settings.batch, **machine_info()}
        for name, value in metrics.items():
            records.append(record("dbterms", f"group{group}", name, value, "", config))
        steps = sum(name.startswith("logratio_mean_k") for name in metrics)
        print(f"[dbterms] {task}, groups of {group}:")
        print("  k  log p − log P_B (mean ± std)  reward change (mean ± std, within group)")
        for k in range(steps):
            print(
                f"  {k:<2d} {metrics[f'logratio_mean_k{k}']:+.4f} ± "
                f"{metrics[f'logratio_std_k{k}']:.4f}"
                f"            {metrics[f'reward_change_mean_k{k}']:+.4f} ± "
                f"{metrics[f'reward_change_std_k{k}']:.4f}, "
                f"{metrics[f'reward_change_std_within_group_k{k}']:.4f}",
                flush=True,
            )
    return records
