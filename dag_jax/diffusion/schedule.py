"""Noise schedules and DDIM timestep grids read from a diffusers scheduler config (SPEC §1)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def betas_from_config(config: Mapping) -> np.ndarray:
    """Return the (num_train_timesteps,) float64 betas a scheduler config describes."""
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    kind = config.get("beta_schedule", "scaled_linear")
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float64)
    if kind == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        )
    raise ValueError(
        f"scheduler config: unsupported beta_schedule {kind!r} "
        "(known: linear, scaled_linear, squaredcos_cap_v2)"
    )


def alphas_cumprod_from_config(config: Mapping) -> np.ndarray:
    """Return ᾱ_t for t = 0..T−1 as float32, computed in float64."""
    return np.cumprod(1.0 - betas_from_config(config)).astype(np.float32)


def ddim_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> np.ndarray:
    """Return the (num_steps,) int32 DDIM timesteps, descending, as diffusers' DDIMScheduler."""
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        ts = (np.arange(num_steps) * ratio).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / num_steps
        ts = np.round(np.arange(num_train_timesteps, 0, -ratio)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
    else:
        raise ValueError(f"unsupported timestep_spacing {spacing!r} (leading, trailing, linspace)")
    return ts.astype(np.int32)


@flax.struct.dataclass
class Schedule:
    """A DDIM grid: per-step t, previous time s and their ᾱ (all fp32 except the ints)."""

    alphas_cumprod: jax.Array  # (T,) fp32
    timesteps: jax.Array  # (N,) int32, descending
    prev_timesteps: jax.Array  # (N,) int32, clamped at 0
    alpha_t: jax.Array  # (N,) ᾱ_t
    alpha_s: jax.Array  # (N,) ᾱ_s (final_alpha_cumprod at the last step)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")

    @property
    def num_steps(self) -> int:
        """Return N, the number of DDIM steps."""
        return self.timesteps.shape[0]


def make_schedule(config: Mapping, num_steps: int) -> Schedule:
    """Return the DDIM grid for ``num_steps`` from a diffusers scheduler config dict."""
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}: {PREDICTION_TYPES}")
    n_train = int(config.get("num_train_timesteps", 1000))
    acp = alphas_cumprod_from_config(config)
    ts = ddim_timesteps(
        n_train,
        num_steps,
        config.get("timestep_spacing", "leading"),
        int(config.get("steps_offset", 0)),
    )
    prev = ts - n_train // num_steps
    final = np.float32(1.0) if config.get("set_alpha_to_one", True) else acp[0]
    alpha_s = np.where(prev >= 0, acp[np.clip(prev, 0, None)], final).astype(np.float32)
    return Schedule(
        alphas_cumprod=jnp.asarray(acp),
        timesteps=jnp.asarray(ts),
        prev_timesteps=jnp.asarray(np.clip(prev, 0, None).astype(np.int32)),
        alpha_t=jnp.asarray(acp[ts]),
        alpha_s=jnp.asarray(alpha_s),
        prediction_type=prediction_type,
    )
