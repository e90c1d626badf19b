"""The benches' UNets: diffusers configs of ``--model`` (random weights), Linen modules, inputs.

``tiny`` is the built-in tiny world's UNet; ``sd15-random`` has Stable Diffusion 1.5's shapes.
The sampler and train benches build their UNets, and draw their initial latents and random
text contexts, from here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.bench.common import Settings
from dag_jax.models.unet import UNet2DConditionModel, UNetConfig
from dag_jax.tinyworld import random_tiny as tiny

CONTEXT_LEN = 77  # CLIP text tokens

SD15_UNET_CONFIG = dict(
    tiny.UNET_CONFIG,
    sample_size=64,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
MODELS = {"tiny": tiny.UNET_CONFIG, "sd15-random": SD15_UNET_CONFIG}


def unet_config(settings: Settings) -> dict:
    """Return the diffusers UNet config of ``settings.model`` (a ValueError if unknown)."""
    if settings.model not in MODELS:
        raise ValueError(f"--model must be one of {sorted(MODELS)}, got {settings.model!r}")
    return MODELS[settings.model]


def latent_side(settings: Settings) -> int:
    """Return the latent side length: ``settings.resolution``, else the model's sample_size."""
    return settings.resolution or int(unet_config(settings)["sample_size"])


def linen_unet(config: dict, dtype: str, attention: str = "xla") -> UNet2DConditionModel:
    """Return the Linen UNet of a diffusers config with the given compute dtype."""
    return UNet2DConditionModel(
        UNetConfig.from_dict(config), dtype=jnp.dtype(dtype), attention_impl=attention
    )


def default_init_params(unet: UNet2DConditionModel, seed: int) -> dict:
    """Return Flax-default random fp32 UNet params (used when torch is missing)."""
    cfg = unet.config
    side = 2 ** len(cfg.block_out_channels)
    x = jnp.zeros((1, cfg.in_channels, side, side), jnp.float32)
    ctx = jnp.zeros((1, 1, cfg.cross_attention_dim), jnp.float32)
    return jax.jit(unet.init)(jax.random.key(seed), x, jnp.zeros((1,), jnp.int32), ctx)["params"]


def abstract_params(unet: UNet2DConditionModel) -> dict:
    """Return the UNet's params as ShapeDtypeStructs (nothing allocated)."""
    cfg = unet.config
    side = 2 ** len(cfg.block_out_channels)
    return jax.eval_shape(
        unet.init,
        jax.random.key(0),
        jnp.zeros((1, cfg.in_channels, side, side)),
        jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, 1, cfg.cross_attention_dim)),
    )["params"]


@dataclasses.dataclass(frozen=True)
class SamplerInputs:
    """Host arrays a rollout starts from (the same for every implementation)."""

    x_T: np.ndarray  # (B, C, H, W) fp32 initial latents
    context: np.ndarray  # (B, 77, D) fp32 random "prompt embeddings"
    uncond: np.ndarray  # (B, 77, D) fp32 random "empty prompt" embeddings (rows equal)


def sampler_inputs(settings: Settings) -> SamplerInputs:
    """Return seeded random initial latents and text contexts of ``--batch`` rollouts."""
    config = unet_config(settings)
    rng = np.random.default_rng(settings.seed)
    side, d = latent_side(settings), int(config["cross_attention_dim"])
    x_T = rng.standard_normal((settings.batch, config["in_channels"], side, side))
    context = rng.standard_normal((settings.batch, CONTEXT_LEN, d))
    uncond = np.broadcast_to(rng.standard_normal((1, CONTEXT_LEN, d)), context.shape)
    f32 = lambda a: np.ascontiguousarray(a, np.float32)
    return SamplerInputs(f32(x_T), f32(context), f32(uncond))
