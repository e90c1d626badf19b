"""models/attention: the xla formulation against the textbook softmax(q kᵀ/√d) v."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dag_jax.models import attention
from dag_jax.models.attention import dot_product_attention


def _textbook_attention(q, k, v, heads):
    b, lq, inner = q.shape
    d = inner // heads
    q, k, v = (a.reshape(b, a.shape[1], heads, d) for a in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(
        q.shape[0], lq, inner
    )


@pytest.mark.parametrize("lk", [9, 16])
@pytest.mark.parametrize("blocks", [None, (3, 5)])
def test_attention_matches_the_textbook_form_and_its_gradient(lk, blocks, monkeypatch):
    if blocks is not None:  # the value in blocks of 3 slices, its gradient in 5; last short
        monkeypatch.setattr(attention, "CPU_SCORE_BLOCK", blocks[0] * 16 * lk)
        monkeypatch.setattr(attention, "CPU_GRAD_SCORE_BLOCK", blocks[1] * 16 * lk)
        assert attention.score_block(8, 16, lk) == 3
        assert attention.score_block(8, 16, lk, attention.CPU_GRAD_SCORE_BLOCK) == 5
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
        loss = lambda *a, up=upcast: dot_product_attention(*a, heads=2, upcast=up).sum()
        grads = jax.grad(loss, argnums=(0, 1, 2))(*bf)
        refs = jax.grad(lambda *a: _textbook_attention(*a, 2).sum(), argnums=(0, 1, 2))(q, k, v)
        for g, r in zip(grads, refs):
            assert g.dtype == jnp.bfloat16
            r = np.asarray(r)
            assert np.abs(np.asarray(g, np.float32) - r).max() < 0.1 * np.abs(r).max()


def test_blocking_is_for_a_single_cpu_device_only(monkeypatch):
    monkeypatch.setattr(attention, "CPU_SCORE_BLOCK", 1000)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert attention.score_block(64, 10, 10) == 10
    assert attention.score_block(64, 100, 100) == 1  # never below one slice
    assert attention.score_block(64, 10, 10, entries=500) == 5
    monkeypatch.setattr(jax, "device_count", lambda: 8)  # a sharded batch: no lax.map over it
    assert attention.score_block(64, 10, 10) == 64
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.score_block(64, 10, 10) == 64


def test_unknown_impl_is_named():
    x = jnp.zeros((1, 4, 8))
    with pytest.raises(ValueError, match="attention impl must be one of"):
        dot_product_attention(x, x, x, heads=2, impl="flash")
