"""Building blocks shared by the UNet, the VAE and the flow network (NHWC inside).

Parameter names follow diffusers' legacy Flax port (``resnets_0/conv1/kernel``) so that
``weights/convert.py`` maps them to PyTorch keys by rule; numerics follow diffusers' PyTorch
modules (exact GELU in GEGLU, GroupNorm without fast variance, softmax in fp32).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.models.attention import dot_product_attention

Dtype = jnp.dtype


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Return the (B, dim) fp32 sinusoidal embedding of timesteps, as diffusers' Timesteps."""
    timesteps = jnp.asarray(timesteps, jnp.float32).reshape(-1)
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on NHWC (or (B, L, C)) input: two-pass statistics in fp32.

    Same parameters (``scale``, ``bias``) and numerics as ``flax.linen.GroupNorm`` with
    ``use_fast_variance=False``, formulated for speed (``group_norm_nlc``).
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        flat = x.reshape(x.shape[0], -1, c).astype(jnp.float32)
        y = group_norm_nlc(flat, scale, bias, self.num_groups, self.epsilon)
        return y.reshape(x.shape).astype(self.dtype)


def _group_mean(channel_sums: jax.Array, groups: int, count: int) -> jax.Array:
    """Return (B, C): each channel's group total of ``channel_sums`` (B, C), over ``count``.

    Folded with two small one-hot products, (B, C)·(C, G) then (B, G)·(G, C), so the
    result is a materialised (B, C) array: as a broadcast of (B, G), XLA:CPU fuses the
    channel → group index division into every full-size elementwise pass (2× slower
    GroupNorm at 96 channels). HIGHEST precision keeps TPU/GPU dots in full fp32.
    """
    c = channel_sums.shape[-1]
    onehot = jnp.asarray(np.eye(groups, dtype=np.float32)[np.arange(c) // (c // groups)])
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    return dot(dot(channel_sums, onehot) / count, onehot.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm_nlc(
    x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float
) -> jax.Array:
    """Return GroupNorm of fp32 ``x`` (B, L, C) with per-channel ``scale`` and ``bias``.

    Channel sums over L come first (a reduction along the leading axes with channels
    contiguous), and only those (B, C) sums are folded into groups: Flax's reshape to
    (…, groups, C/groups) makes XLA:CPU reduce over strided axes, 3–9× slower at the
    UNet's shapes (BENCHMARKS.md, "Where the CPU time goes"). The custom VJP keeps x and
    the (B, C) mean and 1/std, and its backward is two passes over x and the output
    gradient (their channel sums, then dx), where autodiff of the forward made five.
    """
    return _group_norm_fwd(x, scale, bias, groups, eps)[0]


def _group_norm_fwd(x, scale, bias, groups, eps):
    count = x.shape[1] * (x.shape[-1] // groups)
    mean = _group_mean(x.sum(1), groups, count)  # (B, C)
    centred = x - mean[:, None, :]
    rstd = jax.lax.rsqrt(_group_mean(jnp.square(centred).sum(1), groups, count) + eps)
    y = centred * (rstd * scale)[:, None, :] + bias
    return y, (x, scale, mean, rstd)


def _group_norm_bwd(groups, eps, residuals, dy):
    x, scale, mean, rstd = residuals
    count = x.shape[1] * (x.shape[-1] // groups)
    centred = x - mean[:, None, :]
    sum_dy = dy.sum(1)  # (B, C)
    sum_dy_xhat = (dy * centred).sum(1) * rstd
    # dx = rstd·(g − mean_group(g) − x̂·mean_group(g·x̂)) with g = dy·scale
    mean_g = _group_mean(sum_dy * scale, groups, count)
    mean_gx = _group_mean(sum_dy_xhat * scale, groups, count)
    dx = (
        dy * (rstd * scale)[:, None, :]
        - (rstd * mean_g)[:, None, :]
        - centred * (rstd * rstd * mean_gx)[:, None, :]
    )
    return dx, sum_dy_xhat.sum(0), sum_dy.sum(0)


group_norm_nlc.defvjp(_group_norm_fwd, _group_norm_bwd)


def group_norm(groups: int, eps: float, dtype: Dtype, name: str | None = None) -> GroupNorm:
    """Return a GroupNorm that matches torch.nn.GroupNorm (two-pass variance)."""
    return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


def activation(name: str):
    """Return the activation function a diffusers/transformers config names."""
    table = {
        "silu": nn.silu,
        "swish": nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": nn.relu,
        "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(table)}")
    return table[name]


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal embedding (``linear_1``, act, ``linear_2``)."""

    dim: int
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> jax.Array:
        emb = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(emb)
        emb = activation(self.act_fn)(emb)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(emb)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D: norm-act-conv twice, optional timestep shift, 1x1 shortcut."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    use_temb: bool = True
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = activation(self.act_fn)
        h = act(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)
        if self.use_temb:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(act(temb))
            h = h + t[:, None, None, :]
        h = act(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; ``padding=0`` is the VAE's asymmetric (0, 1) zero pad."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            pad = "VALID"
        else:
            pad = self.padding
        return nn.Conv(
            self.out_channels, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype, name="conv"
        )(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (parameters ``conv/kernel``, ``conv/bias``)."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return SubpixelUpsampleConv(self.out_channels, dtype=self.dtype, name="conv")(x)


def _fold_taps(kernel: jax.Array, phase: int, axis: int) -> jax.Array:
    """Fold a 3-tap kernel axis into the 2 taps one output phase of a x2 upsampling reads."""
    w0, w1, w2 = jnp.split(kernel, 3, axis=axis)
    return jnp.concatenate([w0, w1 + w2] if phase == 0 else [w0 + w1, w2], axis=axis)


class SubpixelUpsampleConv(nn.Module):
    """conv3x3(nearest_upsample_x2(x)), computed as four 2x2 convs at the input resolution.

    Output pixel (2i + a, 2j + b) reads input rows {i − 1, i} (a = 0) or {i, i + 1} (a = 1), and
    likewise for columns. Each phase (a, b) is therefore a 2x2 conv whose taps are sums of
    the 3x3 kernel's, and the four phases interleave into the upsampled map. It is the same
    linear map with 16 instead of 36 multiply-adds per input pixel and channel pair, and the
    upsampled input is never materialised. Results match the plain form to fp32 rounding
    (tests/test_layers.py). It is 2.2–2.6× faster on XLA:CPU (BENCHMARKS.md, "Where the CPU
    time goes"). Parameters are ``nn.Conv``'s: ``kernel`` (3, 3, C, out), ``bias`` (out,).
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        rows = []
        for a in (0, 1):
            per_row = _fold_taps(kernel, a, axis=0)
            cols = []
            for b in (0, 1):
                k = _fold_taps(per_row, b, axis=1).astype(self.dtype)
                cols.append(
                    jax.lax.conv_general_dilated(
                        x,
                        k,
                        window_strides=(1, 1),
                        padding=((1 - a, a), (1 - b, b)),
                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                    )
                )
            rows.append(jnp.stack(cols, axis=3))  # (B, H, W, 2 [b], out)
        y = jnp.stack(rows, axis=2)  # (B, H, 2 [a], W, 2 [b], out)
        b, h, _, w, _, _ = y.shape
        return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class Attention(nn.Module):
    """Multi-head attention with diffusers' names ``to_q``, ``to_k``, ``to_v``, ``to_out_0``.

    A projection with an entry ``{"A": (in, r), "B": (r, out)}`` in the ``lora`` variable
    collection adds ``lora_scale · (x A) B`` to its output (see models/lora.py).
    """

    query_dim: int
    heads: int
    dim_head: int
    qkv_bias: bool = False
    upcast: bool = False
    lora_scale: float = 1.0
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32

    def _proj(self, name: str, features: int, x: jax.Array, bias: bool) -> jax.Array:
        y = nn.Dense(features, use_bias=bias, dtype=self.dtype, name=name)(x)
        if self.has_variable("lora", name):
            ab = self.get_variable("lora", name)
            a, b = ab["A"].astype(self.dtype), ab["B"].astype(self.dtype)
            y = y + self.lora_scale * ((x.astype(self.dtype) @ a) @ b)
        return y

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        inner = self.heads * self.dim_head
        context = x if context is None else context
        q = self._proj("to_q", inner, x, self.qkv_bias)
        k = self._proj("to_k", inner, context, self.qkv_bias)
        v = self._proj("to_v", inner, context, self.qkv_bias)
        out = dot_product_attention(q, k, v, self.heads, self.upcast, self.attention_impl)
        return self._proj("to_out_0", self.query_dim, out, True)


class GEGLU(nn.Module):
    """Linear to 2·inner, then value · exact-GELU(gate) (diffusers GEGLU)."""

    inner_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.inner_dim * 2, dtype=self.dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``net_0`` (GEGLU) then ``net_2`` (Linear)."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm + residual."""

    dim: int
    heads: int
    dim_head: int
    only_cross_attention: bool = False
    upcast_attention: bool = False
    lora_scale: float = 1.0
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def ln(name):
            return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name=name)

        attn = dict(
            query_dim=self.dim,
            heads=self.heads,
            dim_head=self.dim_head,
            upcast=self.upcast_attention,
            lora_scale=self.lora_scale,
            attention_impl=self.attention_impl,
            dtype=self.dtype,
        )
        h = ln("norm1")(x)
        x = x + Attention(**attn, name="attn1")(h, context if self.only_cross_attention else None)
        x = x + Attention(**attn, name="attn2")(ln("norm2")(x), context)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(ln("norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6), proj_in (1x1 conv or linear), blocks, proj_out, residual."""

    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    lora_scale: float = 1.0
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            x = nn.Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = nn.Conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(x).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            x = BasicTransformerBlock(
                inner,
                self.heads,
                self.dim_head,
                only_cross_attention=self.only_cross_attention,
                upcast_attention=self.upcast_attention,
                lora_scale=self.lora_scale,
                attention_impl=self.attention_impl,
                dtype=self.dtype,
                name=f"transformer_blocks_{i}",
            )(x, context)
        if self.use_linear_projection:
            x = nn.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = nn.Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(x.reshape(b, h, w, inner))
        return x + residual


def as_tuple(value, n: int, what: str) -> tuple:
    """Return ``value`` repeated n times if scalar, else checked to have length n."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"{what} has {len(value)} entries, expected {n} (one per block)")
        return tuple(value)
    return (value,) * n
