"""The DAG flow network F̃_φ(x, t, c): a prompt-conditioned scalar on noisy latents (SPEC §4).

As in the DAG release: the down half of a small SD UNet (block channels (64, 128, 256, 256),
one resnet per block, cross-attention to the prompt), the sinusoidal embedding of the integer
timestep, global average pooling and a linear head to one number. The output is fp32 whatever
the compute dtype.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dag_jax.models.layers import TimestepEmbedding, activation, group_norm, timestep_embedding
from dag_jax.models.unet import DownBlock


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Shape of the flow network; defaults follow the DAG release."""

    in_channels: int = 4
    cross_attention_dim: int = 768
    block_out_channels: tuple[int, ...] = (64, 128, 256, 256)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    layers_per_block: int = 1
    attention_heads: int = 8
    norm_num_groups: int = 32

    def __post_init__(self):
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError("flow config: one down_block_type per block_out_channels entry")
        for t in self.down_block_types:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise ValueError(f"flow config: unsupported block type {t!r}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups or c % self.attention_heads:
                raise ValueError(
                    f"flow config: channels {c} must divide by norm_num_groups "
                    f"{self.norm_num_groups} and attention_heads {self.attention_heads}"
                )


class FlowNetwork(nn.Module):
    """Return F̃_φ(x, t, c) of shape (B,) fp32 for NCHW latents, timesteps and text context."""

    config: FlowConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        cfg = self.config
        b = x.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
        temb = timestep_embedding(timesteps, cfg.block_out_channels[0])
        temb = TimestepEmbedding(
            cfg.block_out_channels[0] * 4, dtype=self.dtype, name="time_embedding"
        )(temb.astype(self.dtype))
        h = jnp.transpose(x, (0, 2, 3, 1)).astype(self.dtype)
        h = nn.Conv(cfg.block_out_channels[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(
            h
        )
        context = context.astype(self.dtype)
        resnet = dict(groups=cfg.norm_num_groups, eps=1e-5, act_fn="silu", dtype=self.dtype)
        n = len(cfg.block_out_channels)
        for i, (ch, kind) in enumerate(zip(cfg.block_out_channels, cfg.down_block_types)):
            transformer = None
            if kind == "CrossAttnDownBlock2D":
                transformer = dict(
                    heads=cfg.attention_heads,
                    dim_head=ch // cfg.attention_heads,
                    groups=cfg.norm_num_groups,
                    dtype=self.dtype,
                )
            h, _ = DownBlock(
                ch,
                cfg.layers_per_block,
                resnet,
                transformer,
                add_downsample=i < n - 1,
                dtype=self.dtype,
                name=f"down_blocks_{i}",
            )(h, temb, context)
        h = activation("silu")(group_norm(cfg.norm_num_groups, 1e-5, self.dtype, "norm_out")(h))
        pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(1, dtype=jnp.float32, name="head")(pooled)[:, 0]
