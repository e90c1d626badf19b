"""models/layers: GroupNorm and attention against plain references (torch, Flax, textbook)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dag_jax.models.layers import GroupNorm, dot_product_attention


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


def _textbook_attention(q, k, v, heads):
    b, lq, inner = q.shape
    d = inner // heads
    q, k, v = (a.reshape(b, a.shape[1], heads, d) for a in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(
        q.shape[0], lq, inner
    )


@pytest.mark.parametrize("lk", [9, 16])
def test_attention_matches_the_textbook_form_and_its_gradient(lk):
    rng = np.random.default_rng(2)
    heads, d = 4, 8
    q = jnp.asarray(rng.standard_normal((2, 16, heads * d)) * 3, jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, lk, heads * d)) * 3, jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, lk, heads * d)), jnp.float32)
    ours = dot_product_attention(q, k, v, heads)
    np.testing.assert_allclose(ours, _textbook_attention(q, k, v, heads), atol=1e-5, rtol=1e-5)
    weights = jnp.asarray(rng.standard_normal(ours.shape), jnp.float32)
    grads = [
        jax.grad(lambda *a, f=f: (f(*a, heads) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
        for f in (dot_product_attention, _textbook_attention)
    ]
    for g, ref in zip(*grads):
        np.testing.assert_allclose(g, ref, atol=1e-4, rtol=1e-4)


def test_attention_in_bf16_returns_bf16_close_to_fp32():
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 32, 16)) * 4, jnp.float32) for _ in range(3))
    ref = _textbook_attention(q, k, v, 2)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    for upcast in (False, True):
        out = dot_product_attention(*bf, heads=2, upcast=upcast)
        assert out.dtype == jnp.bfloat16
        err = np.abs(np.asarray(out, np.float32) - np.asarray(ref)).max()
        assert err < 0.1 * np.abs(np.asarray(ref)).max()
