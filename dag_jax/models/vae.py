"""AutoencoderKL (the Stable Diffusion VAE) in Linen, built from a diffusers ``vae/config.json``.

The public methods take and return NCHW arrays as diffusers does; inside everything is NHWC.
Param names are diffusers' PyTorch names under ``weights/convert.py``'s rules
(``encoder/down_blocks_0/resnets_1/conv1/kernel``, mid-block attention ``to_q/to_k/to_v/to_out_0``),
so a diffusers state dict converts by rule. Params are fp32; ``dtype`` sets the compute dtype;
latents, moments and decoded images come back in fp32.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dag_jax.models.attention import dot_product_attention
from dag_jax.models.layers import (
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    activation,
    group_norm,
)

Dtype = jnp.dtype

DOWN_TYPES = ("DownEncoderBlock2D",)
UP_TYPES = ("UpDecoderBlock2D",)
# diffusers' Encoder/Decoder hard-code this eps for resnets, mid attention and output norms.
VAE_EPS = 1e-6
# Keys of an AutoencoderKL config.json that do not change the network we build.
_HARMLESS_KEYS = frozenset({"sample_size", "latents_mean", "latents_std"})
_REQUIRED_KEYS = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
)
_CLASS_NAMES = ("AutoencoderKL", "FlaxAutoencoderKL")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The diffusers AutoencoderKL config (defaults are diffusers' own)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True  # read for completeness; the port never upcasts by itself

    def __post_init__(self) -> None:
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            value = getattr(self, key)
            if isinstance(value, str) or not hasattr(value, "__len__"):
                raise ValueError(f"vae config: {key} must be a list, got {value!r}")
            object.__setattr__(self, key, tuple(value))
        self.validate()

    @classmethod
    def from_dict(cls, config: Mapping) -> VAEConfig:
        """Return the config from a diffusers ``vae/config.json`` dict; reject what we lack."""
        class_name = config.get("_class_name")
        if class_name is not None and class_name not in _CLASS_NAMES:
            raise ValueError(f"vae config: _class_name {class_name!r} is not AutoencoderKL")
        missing = [k for k in _REQUIRED_KEYS if k not in config]
        if missing:
            raise ValueError(f"vae config is missing required keys {missing}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(
            k for k in config if k not in names and k not in _HARMLESS_KEYS and k[:1] != "_"
        )
        if unknown:
            warnings.warn(f"vae config: ignoring unknown keys {unknown}", stacklevel=2)
        kwargs = {k: config[k] for k in names if k in config}
        return cls(**kwargs)

    def validate(self) -> None:
        """Raise ValueError if block types, per-block lists or group counts are inconsistent."""
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("vae config: block_out_channels is empty")
        for key, types, known in (
            ("down_block_types", self.down_block_types, DOWN_TYPES),
            ("up_block_types", self.up_block_types, UP_TYPES),
        ):
            bad = [t for t in types if t not in known]
            if bad:
                raise ValueError(
                    f"vae config: unsupported block type(s) {bad} in {key} (supported: {known})"
                )
            if len(types) != n:
                raise ValueError(f"vae config: {key} has {len(types)} entries, expected {n}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"vae config: block channels {c} not divisible by norm_num_groups "
                    f"{self.norm_num_groups}"
                )
        if self.layers_per_block < 1:
            raise ValueError(f"vae config: layers_per_block={self.layers_per_block} must be >= 1")
        activation(self.act_fn)  # raises ValueError naming an unknown activation

    @property
    def downsample_factor(self) -> int:
        """Return the spatial factor between image and latent (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)


@flax.struct.dataclass
class DiagonalGaussian:
    """The VAE posterior N(mean, exp(logvar)) over NCHW latents (fp32), as diffusers'."""

    mean: jax.Array  # (B, C, h, w)
    logvar: jax.Array  # (B, C, h, w), clipped to [-30, 20]

    @property
    def std(self) -> jax.Array:
        """Return the standard deviation exp(logvar / 2)."""
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        """Return the variance exp(logvar)."""
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """Return a reparameterised draw mean + std · ε with ε ~ N(0, I) from ``rng``."""
        eps = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        """Return the mode (the mean)."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> jax.Array:
        """Return the (B,) KL divergence to ``other`` (standard normal if None), summed over CHW."""
        axes = (1, 2, 3)
        if other is None:
            return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=axes)
        return 0.5 * jnp.sum(
            (self.mean - other.mean) ** 2 / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            axis=axes,
        )

    def nll(self, sample: jax.Array) -> jax.Array:
        """Return the (B,) negative log-likelihood of ``sample``, summed over CHW."""
        return 0.5 * jnp.sum(
            jnp.log(2.0 * jnp.pi) + self.logvar + (sample - self.mean) ** 2 / self.var,
            axis=(1, 2, 3),
        )


@flax.struct.dataclass
class EncoderOutput:
    """What ``encode`` returns, like diffusers' ``AutoencoderKLOutput``."""

    latent_dist: DiagonalGaussian


@flax.struct.dataclass
class DecoderOutput:
    """What ``decode`` and ``__call__`` return, like diffusers' ``DecoderOutput``."""

    sample: jax.Array  # (B, C, H, W) fp32


class VAEAttention(nn.Module):
    """VAE mid-block self-attention: GroupNorm, one head of size C, biased q/k/v/out, residual."""

    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = group_norm(self.groups, VAE_EPS, self.dtype, "group_norm")(x).reshape(b, h * w, c)
        q = nn.Dense(c, dtype=self.dtype, name="to_q")(t)
        k = nn.Dense(c, dtype=self.dtype, name="to_k")(t)
        v = nn.Dense(c, dtype=self.dtype, name="to_v")(t)
        t = dot_product_attention(q, k, v, heads=1, upcast=True)
        t = nn.Dense(c, dtype=self.dtype, name="to_out_0")(t)
        return t.reshape(b, h, w, c) + x


class VAEMidBlock(nn.Module):
    """diffusers UNetMidBlock2D without time embedding: resnet, attention, resnet."""

    channels: int
    groups: int = 32
    act_fn: str = "silu"
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def resnet(i: int) -> ResnetBlock2D:
            return ResnetBlock2D(
                self.channels,
                groups=self.groups,
                eps=VAE_EPS,
                use_temb=False,
                act_fn=self.act_fn,
                dtype=self.dtype,
                name=f"resnets_{i}",
            )

        x = resnet(0)(x)
        if self.add_attention:
            x = VAEAttention(self.groups, self.dtype, name="attentions_0")(x)
        return resnet(1)(x)


class DownEncoderBlock2D(nn.Module):
    """``num_layers`` resnets, then an optional stride-2 conv with the VAE's (0, 1) pad."""

    out_channels: int
    num_layers: int
    add_downsample: bool
    groups: int = 32
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                self.out_channels,
                groups=self.groups,
                eps=VAE_EPS,
                use_temb=False,
                act_fn=self.act_fn,
                dtype=self.dtype,
                name=f"resnets_{i}",
            )(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(
                x
            )
        return x


class UpDecoderBlock2D(nn.Module):
    """``num_layers`` resnets, then an optional nearest x2 upsample and 3x3 conv."""

    out_channels: int
    num_layers: int
    add_upsample: bool
    groups: int = 32
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                self.out_channels,
                groups=self.groups,
                eps=VAE_EPS,
                use_temb=False,
                act_fn=self.act_fn,
                dtype=self.dtype,
                name=f"resnets_{i}",
            )(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image (B, H, W, in) → moments (B, H/f, W/f, 2·latent) (mean then logvar), NHWC."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels
        groups, act = cfg.norm_num_groups, cfg.act_fn
        x = nn.Conv(channels[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(x)
        for i, c in enumerate(channels):
            x = DownEncoderBlock2D(
                c,
                cfg.layers_per_block,
                add_downsample=i < len(channels) - 1,
                groups=groups,
                act_fn=act,
                dtype=self.dtype,
                name=f"down_blocks_{i}",
            )(x)
        x = VAEMidBlock(
            channels[-1], groups, act, cfg.mid_block_add_attention, self.dtype, name="mid_block"
        )(x)
        x = activation(act)(group_norm(groups, VAE_EPS, self.dtype, "conv_norm_out")(x))
        return nn.Conv(
            2 * cfg.latent_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out"
        )(x)


class Decoder(nn.Module):
    """Latent (B, h, w, latent) → image (B, h·f, w·f, out), NHWC."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        channels = tuple(reversed(cfg.block_out_channels))
        groups, act = cfg.norm_num_groups, cfg.act_fn
        x = nn.Conv(channels[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(z)
        x = VAEMidBlock(
            channels[0], groups, act, cfg.mid_block_add_attention, self.dtype, name="mid_block"
        )(x)
        for i, c in enumerate(channels):
            x = UpDecoderBlock2D(
                c,
                cfg.layers_per_block + 1,
                add_upsample=i < len(channels) - 1,
                groups=groups,
                act_fn=act,
                dtype=self.dtype,
                name=f"up_blocks_{i}",
            )(x)
        x = activation(act)(group_norm(groups, VAE_EPS, self.dtype, "conv_norm_out")(x))
        return nn.Conv(cfg.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(x)


def _nchw_to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def _nhwc_to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL: ``encode`` images to a diagonal Gaussian, ``decode`` latents.

    Call a method with ``vae.apply({'params': p}, x, method=vae.encode)``. Latents passed to
    ``decode`` are already divided by ``scaling_factor`` (and shifted), as in diffusers.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        moments = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv(moments, (1, 1), dtype=self.dtype) if cfg.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)
            if cfg.use_post_quant_conv
            else None
        )

    @property
    def scaling_factor(self) -> float:
        """Return the config's latent scaling factor (0.18215 for SD1.x/2.x)."""
        return self.config.scaling_factor

    def encode(self, x: jax.Array) -> EncoderOutput:
        """Return the posterior over latents of NCHW images in [-1, 1] as ``.latent_dist``."""
        h = self.encoder(_nchw_to_nhwc(x).astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        h = _nhwc_to_nchw(h).astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=1)
        return EncoderOutput(DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0)))

    def decode(self, z: jax.Array) -> DecoderOutput:
        """Return the fp32 NCHW images decoded from NCHW latents, as ``.sample``."""
        h = _nchw_to_nhwc(z).astype(self.dtype)
        if self.post_quant_conv is not None:
            h = self.post_quant_conv(h)
        return DecoderOutput(_nhwc_to_nchw(self.decoder(h)).astype(jnp.float32))

    def __call__(
        self, x: jax.Array, sample_posterior: bool = False, rng: jax.Array | None = None
    ) -> DecoderOutput:
        """Return the reconstruction of NCHW images through the posterior's mode (or a sample)."""
        posterior = self.encode(x).latent_dist
        if sample_posterior:
            if rng is None:
                raise ValueError("sample_posterior=True needs an rng key")
            z = posterior.sample(rng)
        else:
            z = posterior.mode()
        return self.decode(z)
