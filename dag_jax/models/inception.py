"""Inception-v3 in Flax Linen, inference only: the 2048-d pool features FID is defined on.

Two variants share one parameter layout, torchvision's ``Inception3`` state-dict keys
(``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch_pool.bn.running_var``, ...):

- ``"fid"``: the TensorFlow graph FID was defined with (``pt_inception-2015-12-05``, as ported
  by pytorch-fid): the 3×3 average pools of the A, C and first E blocks exclude the zero
  padding from their mean, and the last E block (``Mixed_7c``) max-pools its pool branch;
- ``"torchvision"``: torchvision's ImageNet ``inception_v3`` (average pools count the padding).

Each ``BasicConv`` is a bias-free convolution, an eval-mode BatchNorm (ε = 1e-3, its running
statistics held as params ``running_mean`` / ``running_var``) and a ReLU. The module takes NHWC
images already scaled to [-1, 1] (``preprocess``) and returns the global average pool of
``Mixed_7c``, (N, 2048); the classifier (``fc``) and the auxiliary head are not built.
Both variants see ``2x − 1`` of [0, 1] pixels: pytorch-fid normalises so, and torchvision's
``transform_input`` maps ImageNet-normalised input to the same values.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

VARIANTS = ("fid", "torchvision")
FEATURES = 2048  # width of the pool features
INPUT_SIZE = 299
BN_EPS = 1e-3


def check_variant(variant: str) -> str:
    """Return ``variant`` if it is one of VARIANTS, else raise ValueError naming them."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown Inception-v3 variant {variant!r}; expected one of {VARIANTS}")
    return variant


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BatchNormEval(nn.Module):
    """BatchNorm with frozen running statistics (torch ``BatchNorm2d`` in eval mode)."""

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("running_mean", nn.initializers.zeros, (c,))
        var = self.param("running_var", nn.initializers.ones, (c,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv(nn.Module):
    """Bias-free conv → eval BatchNorm → ReLU (torchvision's ``BasicConv2d``)."""

    features: int
    kernel: int | Sequence[int]
    stride: int = 1
    padding: int | Sequence[int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(
            self.features,
            _pair(self.kernel),
            strides=_pair(self.stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            name="conv",
        )(x)
        return nn.relu(BatchNormEval(name="bn")(x))


def _avg3(x: jax.Array, count_pad: bool) -> jax.Array:
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=count_pad)


def _max3(x: jax.Array, stride: int = 2, pad: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    pool_features: int
    count_pad: bool = True

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, 1, name="branch1x1")(x)
        b5 = BasicConv(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, 1, name="branch_pool")(_avg3(x, self.count_pad))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max3(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    count_pad: bool = True

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv(192, 1, name="branch1x1")(x)
        b7 = BasicConv(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, 1, name="branch_pool")(_avg3(x, self.count_pad))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max3(x)], axis=-1)


class InceptionE(nn.Module):
    """``pool``: ``avg`` (torchvision), ``avg_valid`` (FID, padding excluded) or ``max``."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = BasicConv(320, 1, name="branch1x1")(x)
        b3 = BasicConv(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv(384, **row, name="branch3x3_2a")(b3),
                BasicConv(384, **col, name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv(384, **row, name="branch3x3dbl_3a")(bd),
                BasicConv(384, **col, name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        pooled = _max3(x, stride=1, pad=1) if self.pool == "max" else _avg3(x, self.pool == "avg")
        bp = BasicConv(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """Inception-v3 up to the global average pool: (N, H, W, 3) in [-1, 1] → (N, 2048).

    H and W must be at least 75 (the stem and the stride-2 blocks need it); FID uses 299.
    """

    variant: str = "fid"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_variant(self.variant)
        if min(x.shape[1:3]) < 75:
            raise ValueError(
                f"Inception-v3 needs images of at least 75×75 pixels, got {x.shape[1:3]}"
            )
        tv = self.variant == "torchvision"
        x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max3(x)
        x = BasicConv(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max3(x)
        x = InceptionA(32, tv, name="Mixed_5b")(x)
        x = InceptionA(64, tv, name="Mixed_5c")(x)
        x = InceptionA(64, tv, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, tv, name="Mixed_6b")(x)
        x = InceptionC(160, tv, name="Mixed_6c")(x)
        x = InceptionC(160, tv, name="Mixed_6d")(x)
        x = InceptionC(192, tv, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg" if tv else "avg_valid", name="Mixed_7b")(x)
        x = InceptionE("avg" if tv else "max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))  # (N, FEATURES)


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """Return (N, size, size, 3) network input from (N, H, W, 3) images in [0, 1].

    Bilinear resize without antialiasing (PyTorch ``interpolate(mode="bilinear",
    align_corners=False)``, pytorch-fid's resize), then ``2x − 1``.
    """
    x = jnp.asarray(images, jnp.float32)
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "linear", antialias=False)
    return 2.0 * x - 1.0
