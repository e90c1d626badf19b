"""UNet2DConditionModel for Stable Diffusion 1.x and 2.x, in Linen, built from a diffusers config.

The public call takes NCHW latents as diffusers does; inside everything is NHWC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dag_jax.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    activation,
    as_tuple,
    group_norm,
    timestep_embedding,
)

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# Config keys we read, and keys whose only supported value is the SD1/SD2 one.
_UNSUPPORTED_UNLESS = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",),
    "dual_cross_attention": (False,),
    "num_class_embeds": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "addition_time_embed_dim": (None,),
    "attention_type": ("default",),
    "reverse_transformer_layers_per_block": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0, 1),
    "timestep_post_act": (None,),
    "cross_attention_norm": (None,),
    "mid_block_only_cross_attention": (None,),
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The subset of a diffusers UNet2DConditionModel config that SD1.x/SD2.x use."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    transformer_layers_per_block: tuple | int = 1
    attention_head_dim: tuple | int = 8
    num_attention_heads: tuple | int | None = None
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: tuple | bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    center_input_sample: bool = False
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0

    @classmethod
    def from_dict(cls, config: Mapping) -> UNetConfig:
        """Return the config from a diffusers ``unet/config.json`` dict; reject what SD lacks."""
        for key, allowed in _UNSUPPORTED_UNLESS.items():
            if key in config and config[key] not in allowed:
                raise ValueError(
                    f"unet config: {key}={config[key]!r} is not supported "
                    f"(dag_jax ports the SD1.x/SD2.x UNet; supported: {allowed})"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key in names:
            if key in config:
                value = config[key]
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key not in config:
                raise ValueError(f"unet config is missing required key {key!r}")
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError if block types or per-block lists are inconsistent."""
        n = len(self.block_out_channels)
        for key, types, known in (
            ("down_block_types", self.down_block_types, DOWN_TYPES),
            ("up_block_types", self.up_block_types, UP_TYPES),
        ):
            if len(types) != n:
                raise ValueError(f"unet config: {key} has {len(types)} entries, expected {n}")
            for t in types:
                if t not in known:
                    raise ValueError(f"unet config: unsupported block type {t!r} in {key}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"unet config: block channels {c} not divisible by norm_num_groups "
                    f"{self.norm_num_groups}"
                )
        self.heads_per_block()
        as_tuple(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        as_tuple(self.only_cross_attention, n, "only_cross_attention")

    def heads_per_block(self) -> tuple[int, ...]:
        """Return the number of attention heads of each down block (diffusers' naming quirk)."""
        n = len(self.block_out_channels)
        heads = self.num_attention_heads or self.attention_head_dim
        return as_tuple(heads, n, "attention_head_dim / num_attention_heads")


@flax.struct.dataclass
class UNetOutput:
    """The UNet's prediction, NCHW like diffusers' ``UNet2DConditionOutput``."""

    sample: jax.Array


class DownBlock(nn.Module):
    """Resnets (each followed by a Transformer2D when ``cross_attn``), then a downsampler."""

    out_channels: int
    num_layers: int
    resnet: Mapping
    transformer: Mapping | None = None
    add_downsample: bool = True
    downsample_padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, **self.resnet, name=f"resnets_{j}")(x, temb)
            if self.transformer is not None:
                x = Transformer2DModel(**self.transformer, name=f"attentions_{j}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0"
            )(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(nn.Module):
    """Resnet, Transformer2D, resnet (UNetMidBlock2DCrossAttn)."""

    channels: int
    resnet: Mapping
    transformer: Mapping

    @nn.compact
    def __call__(self, x, temb, context):
        x = ResnetBlock2D(self.channels, **self.resnet, name="resnets_0")(x, temb)
        x = Transformer2DModel(**self.transformer, name="attentions_0")(x, context)
        return ResnetBlock2D(self.channels, **self.resnet, name="resnets_1")(x, temb)


class UpBlock(nn.Module):
    """Resnets on [x; skip] (each followed by a Transformer2D when ``cross_attn``), upsampler."""

    out_channels: int
    num_layers: int
    resnet: Mapping
    transformer: Mapping | None = None
    add_upsample: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, context):
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = ResnetBlock2D(self.out_channels, **self.resnet, name=f"resnets_{j}")(x, temb)
            if self.transformer is not None:
                x = Transformer2DModel(**self.transformer, name=f"attentions_{j}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class UNet2DConditionModel(nn.Module):
    """SD UNet: ε (or v) prediction from NCHW latents, timesteps and text context.

    ``remat`` wraps each down, mid and up block in ``nn.remat`` (gradient checkpointing).
    A ``lora`` variable collection (models/lora.py) adapts the attention projections, scaled
    by ``lora_scale`` (α/r). ``attention_impl`` picks the attention formulation
    (``attention.dot_product_attention``: "xla", "jax" or "cudnn" for the fused GPU kernel).
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    lora_scale: float = 1.0
    attention_impl: str = "xla"

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,  # (B, C, H, W)
        timesteps: jax.Array,  # (), (B,) int or float
        encoder_hidden_states: jax.Array,  # (B, L, cross_attention_dim)
    ) -> UNetOutput:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(
                f"unet expects NCHW latents with {cfg.in_channels} channels, got {sample.shape}"
            )
        if (
            encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[-1] != cfg.cross_attention_dim
        ):
            raise ValueError(
                f"unet expects text context (B, L, {cfg.cross_attention_dim}), "
                f"got {encoder_hidden_states.shape}"
            )
        b = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
        n = len(cfg.block_out_channels)
        heads = cfg.heads_per_block()
        tlayers = as_tuple(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
        only_cross = as_tuple(cfg.only_cross_attention, n, "only_cross_attention")
        context = encoder_hidden_states.astype(self.dtype)
        wrap = nn.remat if self.remat else (lambda cls: cls)

        temb = timestep_embedding(
            timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift
        )
        temb = TimestepEmbedding(
            cfg.block_out_channels[0] * 4, cfg.act_fn, self.dtype, name="time_embedding"
        )(temb.astype(self.dtype))

        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = nn.Conv(cfg.block_out_channels[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(
            x
        )

        resnet = dict(
            groups=cfg.norm_num_groups, eps=cfg.norm_eps, act_fn=cfg.act_fn, dtype=self.dtype
        )

        def transformer(i: int, channels: int) -> dict:
            return dict(
                heads=heads[i],
                dim_head=channels // heads[i],
                num_layers=tlayers[i],
                groups=cfg.norm_num_groups,
                use_linear_projection=cfg.use_linear_projection,
                only_cross_attention=only_cross[i],
                upcast_attention=cfg.upcast_attention,
                lora_scale=self.lora_scale,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
            )

        skips = [x]
        for i, block_type in enumerate(cfg.down_block_types):
            ch = cfg.block_out_channels[i]
            x, block_skips = wrap(DownBlock)(
                ch,
                cfg.layers_per_block,
                resnet,
                transformer(i, ch) if block_type == "CrossAttnDownBlock2D" else None,
                add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding,
                dtype=self.dtype,
                name=f"down_blocks_{i}",
            )(x, temb, context)
            skips.extend(block_skips)

        mid_ch = cfg.block_out_channels[-1]
        x = wrap(MidBlock)(
            mid_ch,
            dict(resnet, output_scale_factor=cfg.mid_block_scale_factor),
            transformer(n - 1, mid_ch),
            name="mid_block",
        )(x, temb, context)

        for i, block_type in enumerate(cfg.up_block_types):
            ch = cfg.block_out_channels[n - 1 - i]
            k = n - 1 - i  # the mirrored down block: heads and layer counts are reversed
            num = cfg.layers_per_block + 1
            block_skips = tuple(skips[-num:])
            del skips[-num:]
            x = wrap(UpBlock)(
                ch,
                num,
                resnet,
                transformer(k, ch) if block_type == "CrossAttnUpBlock2D" else None,
                add_upsample=i < n - 1,
                dtype=self.dtype,
                name=f"up_blocks_{i}",
            )(x, block_skips, temb, context)

        x = group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(x)
        x = activation(cfg.act_fn)(x)
        x = nn.Conv(cfg.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(x)
        return UNetOutput(sample=jnp.transpose(x, (0, 3, 1, 2)).astype(jnp.float32))
