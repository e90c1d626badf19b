"""Is the policy gradient an ascent direction, and how strong? ``python -m dag_jax.bench ascent``.

    python -m dag_jax.bench ascent --tasks=compressibility,alignment --batch=256 \
        --groups=1,8 --lrs=1e-3,3e-3,1e-2 --json=ascent.json

A diagnostic of the tiny world (``configs/<task>.py:demo``'s model, reward and sampler) that
needs no training run. For each task and each group size G (``sample.group``: G trajectories
share prompt and initial noise x_T):

1. two independent batches of ``--batch`` trajectories are sampled by the base model, their
   rewards standardised within each group (G = 1: over the batch), and the LoRA gradient of
   DDPO's surrogate at ratio 1 (i.e. REINFORCE with that baseline) computed on each;
2. their average g is turned into Adam's first step, ``−lr·sign(g)``, and for each ``--lrs``
   the step is added and subtracted; the mean reward of ``--batch`` evaluation samples is
   measured on the *same* noise and prompts for the base, +step and −step models (paired).

Records (``impl`` = ``groupG``, ``config`` has the task):
  reward_std, reward_std_within_group   spread of the rewards, and of them within groups
  grad_cosine          cosine of the two batches' gradients (≈ 0: the estimate is mostly noise)
  gain_plus_lrX, gain_minus_lrX   mean paired reward change of the ± step (se_… its std error)
  linear_gain_lrX      (plus − minus)/2: the first-order gain of the step
  curvature_loss_lrX   −(plus + minus)/2: what a step of that size costs whatever its direction
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.algos.stats import group_advantages
from dag_jax.algos.transitions import from_trajectory, take
from dag_jax.bench.common import Settings, machine_info, record
from dag_jax.bench.tinyworld import base_world, demo_config
from dag_jax.train.collect import sample_scored
from dag_jax.train.phases import build_phases
from dag_jax.train.run import make_tx


def _gradient(ctx, trainable, traj, prompt_idx, advantage, micro_batch: int):
    """Return the mean LoRA gradient of the surrogate over all transitions of ``traj``."""
    model = ctx.model
    batch = from_trajectory(
        traj,
        model.schedule,
        jnp.asarray(prompt_idx),
        advantage=jnp.asarray(advantage, jnp.float32),
        state_rewards=None,
        weight=jnp.ones(advantage.size, jnp.float32),
    )
    total = jax.tree.map(jnp.zeros_like, trainable)
    count = 0
    for lo in range(0, batch.size - micro_batch + 1, micro_batch):
        sub = take(batch, jnp.arange(lo, lo + micro_batch))
        total, _ = ctx.phases.grad_step(trainable, model.frozen, sub, jnp.float32(0.0), total)
        count += 1
    return jax.tree.map(lambda a: a / count, total["lora"])


def _flat(tree) -> np.ndarray:
    """Return the tree's leaves raveled into one vector."""
    return np.concatenate([np.asarray(a).ravel() for a in jax.tree.leaves(tree)])


def ascent(task: str, group: int, batch: int, lrs: list[float], seed: int) -> dict[str, float]:
    """Return the metrics of one (task, group) line search (see the module docstring)."""
    config = demo_config(task, "ddpo", seed)
    config.sample.group = group
    config.ddpo.clip_range = 1e9  # the ratio is 1 here; no clipping, plain REINFORCE
    chunk = min(64, batch)
    if batch % chunk or chunk % group:
        raise ValueError(
            f"--batch ({batch}) must split into chunks of {chunk} and groups of {group}"
        )
    config.sample.chunk = chunk
    ctx, trainable = base_world(config)
    rng = np.random.default_rng(seed)
    n_prompts = len(ctx.model.prompts)

    def key_of(salt: int) -> jax.Array:
        return jax.random.key(1000 * seed + salt)

    def prompts() -> np.ndarray:
        return np.repeat(rng.integers(0, n_prompts, batch // group), group)

    grads, spread = [], []
    for k in range(2):
        idx = prompts()
        traj, r = sample_scored(ctx, trainable, idx, key_of(100 + k), chunk)
        adv = group_advantages(r, group if group > 1 else r.size)
        grads.append(_gradient(ctx, trainable, traj, idx, adv, 64))
        spread.append((r.std(), r.reshape(-1, group).std(1).mean() if group > 1 else r.std()))
    a, b = _flat(grads[0]), _flat(grads[1])
    out = {
        "reward_std": float(np.mean([s[0] for s in spread])),
        "reward_std_within_group": float(np.mean([s[1] for s in spread])),
        "grad_cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)),
    }
    g = jax.tree.map(lambda x, y: (x + y) / 2, *grads)
    eval_idx = rng.integers(0, n_prompts, batch)
    eval_key = key_of(999)
    config.sample.group = 1  # evaluation: every sample its own x_T
    phases = build_phases(ctx.model, config, make_tx(config, trainable))  # group 1 sampling
    ctx = dataclasses.replace(ctx, phases=phases)
    _, r0 = sample_scored(ctx, trainable, eval_idx, eval_key, chunk)
    for lr in lrs:
        changes = []
        for sign in (1.0, -1.0):
            step = sign * lr
            lora = jax.tree.map(lambda p, d, s=step: p - s * jnp.sign(d), trainable["lora"], g)
            moved = {**trainable, "lora": lora}
            _, r = sample_scored(ctx, moved, eval_idx, eval_key, chunk)
            changes.append(r - r0)
        plus, minus = changes
        tag = f"lr{lr:g}"
        out[f"gain_plus_{tag}"] = float(plus.mean())
        out[f"se_plus_{tag}"] = float(plus.std() / np.sqrt(plus.size))
        out[f"gain_minus_{tag}"] = float(minus.mean())
        out[f"se_minus_{tag}"] = float(minus.std() / np.sqrt(minus.size))
        out[f"linear_gain_{tag}"] = float((plus.mean() - minus.mean()) / 2)
        out[f"curvature_loss_{tag}"] = float(-(plus.mean() + minus.mean()) / 2)
    return out


def bench_ascent(settings: Settings) -> list[dict]:
    """Return the line-search records of every task and group size of ``settings``."""
    tasks = [t for t in settings.tasks.split(",") if t]
    groups = [int(g) for g in settings.groups.split(",") if g]
    lrs = [float(x) for x in settings.lrs.split(",") if x]
    records = []
    for task in tasks:
        for group in groups:
            metrics = ascent(task, group, settings.batch, lrs, settings.seed)
            config = {"task": task, "group": group, "batch": settings.batch, **machine_info()}
            for name, value in metrics.items():
                records.append(record("ascent", f"group{group}", name, value, "", config))
            print(
                f"[ascent] {task} group {group}: "
                + ", ".join(f"{k} {v:+.4f}" for k, v in metrics.items() if not k.startswith("se_")),
                flush=True,
            )
    return records
