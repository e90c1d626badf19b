"""GRPO: PPO-clip on group-standardised rewards with a per-step KL(π_θ ‖ π_ref) penalty.

G trajectories of one prompt form a group; each trajectory's advantage is its reward
standardised within the group, (r − mean_G) / (std_G + ε) (``stats.group_advantages``), and
every denoising step of it is trained with DDPO's clipped surrogate. The optional penalty
keeps the policy near a frozen reference π_ref (the base UNet): both DDIM steps are Gaussians
with the same σ_t (σ depends only on the schedule and η), so per latent element

    KL(N(μ_θ, σ²) ‖ N(μ_ref, σ²)) = (μ_θ − μ_ref)² / (2σ²),

reduced over the elements like the log-probabilities (``reduction``: "mean", as Flow-GRPO's
per-element mean, or "sum"). A deterministic step (σ = 0) has no density: its KL is taken as
0, as its log-probability is (``ddim.policy_logprob``); a config with η = 0 and a KL
coefficient > 0 is refused before it compiles (``train.config``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dag_jax.algos.ddpo import ppo_surrogate
from dag_jax.algos.transitions import Transitions, weighted_mean
from dag_jax.diffusion import ddim
from dag_jax.diffusion.sampler import guided_eps


def gaussian_kl_same_std(
    mean: jax.Array, ref_mean: jax.Array, sigma: jax.Array, reduction: str = "mean"
) -> jax.Array:
    """Return the (B,) KL(N(mean, σ²I) ‖ N(ref_mean, σ²I)), reduced over elements.

    Per element (mean − ref_mean)² / (2σ²); rows with σ = 0 (a deterministic step) give 0.
    ``sigma`` is (B,) or a scalar; ``mean``/``ref_mean`` are (B, *x).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    sig = sigma.reshape(sigma.shape + (1,) * (mean.ndim - sigma.ndim))
    stochastic = sig > 0
    diff = mean.astype(jnp.float32) - ref_mean.astype(jnp.float32)
    kl = jnp.where(stochastic, diff**2 / (2 * jnp.where(stochastic, sig, 1.0) ** 2), 0.0)
    axes = tuple(range(1, kl.ndim))
    if reduction == "mean":
        return jnp.mean(kl, axis=axes)
    if reduction == "sum":
        return jnp.sum(kl, axis=axes)
    raise ValueError(f"KL reduction must be 'mean' or 'sum', got {reduction!r}")


def step_means(
    eps_fn: Callable,
    params,
    batch: Transitions,
    uncond: jax.Array | None,
    *,
    guidance: float,
    eta: float,
    prediction_type: str = "epsilon",
) -> tuple[jax.Array, jax.Array]:
    """Return (μ (B, *x), σ (B,)) of the guided DDIM step x_t → x_s under ``params``."""
    eps = guided_eps(eps_fn, params, batch.x_t, batch.t, batch.context, uncond, guidance)
    _, mean, sigma, _ = ddim.ddim_step(
        batch.x_t, eps, batch.alpha_t, batch.alpha_s, eta, None, prediction_type
    )
    return mean, sigma


def grpo_loss(
    eps_fn: Callable,
    params,
    ref_params,
    batch: Transitions,
    uncond: jax.Array | None,
    *,
    guidance: float,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    reduction: str = "mean",
    clip_range: float = 1e-4,
    adv_clip: float = 5.0,
    kl_coef: float = 0.0,
) -> tuple[jax.Array, dict]:
    """Return (mean over kept rows of PPO-clip + kl_coef · KL(π_θ ‖ π_ref), metrics).

    ``batch.advantage`` holds the group-standardised advantages; ``ref_params`` are the
    reference policy's params (the base UNet: the same tree with the LoRA switched off), used
    only when ``kl_coef`` > 0 (a Python number: with 0 no reference pass is traced and the
    loss is DDPO's clipped surrogate exactly).
    """
    kw = dict(guidance=guidance, eta=eta, prediction_type=prediction_type)
    mean, sigma = step_means(eps_fn, params, batch, uncond, **kw)
    log_prob = ddim.policy_logprob(batch.x_s, mean, sigma, reduction)
    advantage = jnp.clip(batch.advantage, -adv_clip, adv_clip)
    per_sample, metrics = ppo_surrogate(log_prob, batch.log_prob, advantage, clip_range)
    if kl_coef:
        ref_mean, _ = step_means(eps_fn, ref_params, batch, uncond, **kw)
        kl = gaussian_kl_same_std(mean, jax.lax.stop_gradient(ref_mean), sigma, reduction)
        policy_loss = weighted_mean(per_sample, batch.weight)
        metrics.update(policy_loss=policy_loss, kl_ref=weighted_mean(kl, batch.weight))
        per_sample = per_sample + kl_coef * kl
    loss = weighted_mean(per_sample, batch.weight)
    metrics.update(
        loss=loss, log_prob=jnp.mean(log_prob), advantage_abs=jnp.mean(jnp.abs(advantage))
    )
    return loss, metrics
