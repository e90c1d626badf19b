"""One DDIM step with η and its Gaussian log-probabilities: pure functions of arrays (SPEC §2–3).

Per-sample ᾱ arrays of shape (B,) broadcast against latents (B, ...); scalars work too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
    a = jnp.asarray(a, jnp.float32)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def split_prediction(
    x_t: jax.Array, model_out: jax.Array, alpha_t: jax.Array, prediction_type: str = "epsilon"
) -> tuple[jax.Array, jax.Array]:
    """Return (x̂₀, ε̂) from the model output under ε-, v- or x₀-prediction."""
    a = _bcast(alpha_t, x_t)
    sa, s1a = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    if prediction_type == "epsilon":
        return (x_t - s1a * model_out) / sa, model_out
    if prediction_type == "v_prediction":
        return sa * x_t - s1a * model_out, sa * model_out + s1a * x_t
    if prediction_type == "sample":
        return model_out, (x_t - sa * model_out) / s1a
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def ddim_sigma(alpha_t: jax.Array, alpha_s: jax.Array, eta: float | jax.Array) -> jax.Array:
    """Return σ = η·√((1−ᾱ_s)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_s))."""
    alpha_t, alpha_s = jnp.asarray(alpha_t, jnp.float32), jnp.asarray(alpha_s, jnp.float32)
    var = (1.0 - alpha_s) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_s)
    return eta * jnp.sqrt(jnp.maximum(var, 0.0))


def ddim_mean(x0: jax.Array, eps: jax.Array, alpha_s: jax.Array, sigma: jax.Array) -> jax.Array:
    """Return μ = √ᾱ_s·x̂₀ + √(1−ᾱ_s−σ²)·ε̂."""
    a_s, sig = _bcast(alpha_s, x0), _bcast(sigma, x0)
    return jnp.sqrt(a_s) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_s - sig**2, 0.0)) * eps


def ddim_step(
    x_t: jax.Array,
    model_out: jax.Array,
    alpha_t: jax.Array,
    alpha_s: jax.Array,
    eta: float | jax.Array,
    noise: jax.Array | None = None,
    prediction_type: str = "epsilon",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Return (x_s, μ, σ, x̂₀) of one DDIM step; ``noise`` z gives x_s = μ + σ·z."""
    x0, eps = split_prediction(x_t, model_out, alpha_t, prediction_type)
    sigma = ddim_sigma(alpha_t, alpha_s, eta)
    mean = ddim_mean(x0, eps, alpha_s, sigma)
    x_s = mean if noise is None else mean + _bcast(sigma, x_t) * noise
    return x_s, mean, sigma, x0


def _reduce(elementwise: jax.Array, reduction: str) -> jax.Array:
    axes = tuple(range(1, elementwise.ndim))
    if reduction == "mean":
        return jnp.mean(elementwise, axis=axes)
    if reduction == "sum":
        return jnp.sum(elementwise, axis=axes)
    raise ValueError(f"logprob reduction must be 'mean' or 'sum', got {reduction!r}")


def gaussian_logprob(
    x: jax.Array, mean: jax.Array, std: jax.Array, reduction: str = "mean"
) -> jax.Array:
    """Return the (B,) log N(x; mean, std²I), reduced by mean or sum over elements."""
    std = _bcast(std, x)
    lp = -((x - mean) ** 2) / (2 * std**2) - jnp.log(std) - _HALF_LOG_2PI
    return _reduce(lp, reduction)


def policy_logprob(
    x_s: jax.Array, mean: jax.Array, sigma: jax.Array, reduction: str = "mean"
) -> jax.Array:
    """Return log p_θ(x_s | x_t) for the DDIM policy N(μ, σ²I) (SPEC §2), shape (B,).

    The gradient flows only through μ: x_s and σ are treated as constants, so the result is the
    score-function log-prob even when x_s = μ + σz was built inside the differentiated function.
    A deterministic step (σ = 0: η = 0, or the last step with ``set_alpha_to_one``) has no
    density; its log-prob is 0 (no gradient), as for η = 0 rollouts, instead of NaN.
    """
    x_s = jax.lax.stop_gradient(x_s.astype(jnp.float32))
    sigma = jax.lax.stop_gradient(jnp.asarray(sigma, jnp.float32))
    stochastic = sigma > 0
    lp = gaussian_logprob(
        x_s, mean.astype(jnp.float32), jnp.where(stochastic, sigma, 1.0), reduction
    )
    return jnp.where(stochastic, lp, 0.0)


def backward_logprob(
    x_t: jax.Array,
    x_s: jax.Array,
    alpha_t: jax.Array,
    alpha_s: jax.Array,
    reduction: str = "mean",
) -> jax.Array:
    """Return log P_B(x_t | x_s) = log N(x_t; √(ᾱ_t/ᾱ_s)·x_s, (1−ᾱ_t/ᾱ_s)I) (SPEC §3)."""
    ratio = jnp.asarray(alpha_t, jnp.float32) / jnp.asarray(alpha_s, jnp.float32)
    mean = _bcast(jnp.sqrt(ratio), x_s) * x_s
    return jax.lax.stop_gradient(gaussian_logprob(x_t, mean, jnp.sqrt(1.0 - ratio), reduction))
