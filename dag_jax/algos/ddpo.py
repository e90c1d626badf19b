"""DDPO: the PPO-clip surrogate on stored transitions (SPEC §6), also used by DAG-KL and B²."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dag_jax.algos.transitions import Transitions, policy_terms, weighted_mean


def ppo_surrogate(
    log_prob: jax.Array,
    old_log_prob: jax.Array,
    advantage: jax.Array,
    clip_range: float,
) -> tuple[jax.Array, dict]:
    """Return (per-sample max(−A·ρ, −A·clip(ρ, 1±ε)), metrics) with ρ = exp(log p − log p_old)."""
    ratio = jnp.exp(log_prob - old_log_prob)
    unclipped = -advantage * ratio
    clipped = -advantage * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    metrics = {
        "ratio_mean": jnp.mean(ratio),
        "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)),
        "approx_kl": 0.5 * jnp.mean((log_prob - old_log_prob) ** 2),
    }
    return jnp.maximum(unclipped, clipped), metrics


def ddpo_loss(
    eps_fn: Callable,
    params,
    batch: Transitions,
    uncond: jax.Array | None,
    *,
    guidance: float,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    reduction: str = "mean",
    clip_range: float = 1e-4,
    adv_clip: float = 5.0,
) -> tuple[jax.Array, dict]:
    """Return (PPO-clip loss averaged over the batch's kept rows, metrics).

    Advantages come from ``batch.advantage``; rows with ``batch.weight`` 0 (B²'s unselected
    samples, padding) contribute nothing.
    """
    log_prob, _ = policy_terms(
        eps_fn,
        params,
        batch,
        uncond,
        guidance=guidance,
        eta=eta,
        prediction_type=prediction_type,
        reduction=reduction,
    )
    advantage = jnp.clip(batch.advantage, -adv_clip, adv_clip)
    per_sample, metrics = ppo_surrogate(log_prob, batch.log_prob, advantage, clip_range)
    loss = weighted_mean(per_sample, batch.weight)
    metrics.update(
        loss=loss, log_prob=jnp.mean(log_prob), advantage_abs=jnp.mean(jnp.abs(advantage))
    )
    return loss, metrics
