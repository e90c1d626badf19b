"""models/layers: GroupNorm against torch.nn.GroupNorm and Flax's GroupNorm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dag_jax.models.layers import GroupNorm, Upsample2D


@pytest.mark.parametrize(
    "shape,groups", [((2, 8, 8, 64), 32), ((3, 5, 7, 96), 32), ((2, 12, 6), 3)]
)
def test_group_norm_matches_torch_and_flax(shape, groups):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)  # an offset tests two-pass
    c = shape[-1]
    params = {"scale": rng.standard_normal(c).astype(np.float32), "bias": rng.standard_normal(c)}
    params["bias"] = params["bias"].astype(np.float32)
    ours = GroupNorm(num_groups=groups, epsilon=1e-5).apply({"params": params}, x)
    flax_ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False).apply(
        {"params": params}, x
    )
    tnorm = torch.nn.GroupNorm(groups, c, eps=1e-5)
    with torch.no_grad():
        tnorm.weight.copy_(torch.from_numpy(params["scale"]))
        tnorm.bias.copy_(torch.from_numpy(params["bias"]))
        xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
        torch_ref = np.moveaxis(tnorm(xt).numpy(), 1, -1)
    np.testing.assert_allclose(ours, torch_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ours, flax_ref, atol=2e-5, rtol=1e-5)
    # Same parameter tree as Flax's, so converted weights load into either.
    shapes = jax.tree.map(jnp.shape, GroupNorm(groups).init(jax.random.key(0), x)["params"])
    assert shapes == {"scale": (c,), "bias": (c,)}


@pytest.mark.parametrize(
    "shape,groups", [((2, 8, 8, 64), 32), ((3, 5, 7, 96), 32), ((2, 12, 6), 3)]
)
def test_group_norm_gradient_matches_flax_autodiff(shape, groups):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 2, jnp.float32)
    c = shape[-1]
    params = {
        "scale": jnp.asarray(rng.standard_normal(c), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(c), jnp.float32),
    }
    weights = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    ref_norm = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False)

    def loss(norm, params, x):  # a non-linear head, so every VJP term matters
        return jnp.sum(jnp.tanh(norm.apply({"params": params}, x)) * weights)

    ours = jax.grad(loss, argnums=(1, 2))(GroupNorm(num_groups=groups), params, x)
    ref = jax.grad(loss, argnums=(1, 2))(ref_norm, params, x)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_group_norm_computes_stats_in_fp32_and_returns_its_dtype():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 32)) * 50 + 1000)
    norm = GroupNorm(num_groups=8, dtype=jnp.bfloat16)
    params = norm.init(jax.random.key(0), x)
    y = norm.apply(params, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    ref = GroupNorm(num_groups=8).apply(params, x.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.02)


def test_group_norm_rejects_channels_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
        GroupNorm(num_groups=32).init(jax.random.key(0), jnp.zeros((1, 2, 2, 48)))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_subpixel_upsample_conv_is_upsample_then_conv(dtype, tol):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 5, 7, 6)), jnp.float32)
    up = Upsample2D(out_channels=8, dtype=dtype)
    params = up.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape), params)
    plain = nn.Conv(8, (3, 3), padding=1).apply(
        {"params": params["params"]["conv"]}, jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    )
    out = up.apply(params, x.astype(dtype))
    assert out.shape == (2, 10, 14, 8) and out.dtype == dtype
    scale = np.abs(np.asarray(plain)).max()
    np.testing.assert_allclose(np.asarray(out, np.float32), plain, atol=tol * scale)
    shapes = jax.tree.map(jnp.shape, params["params"])
    assert shapes == {"conv": {"kernel": (3, 3, 6, 8), "bias": (8,)}}
