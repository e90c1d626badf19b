"""models/attention: the xla formulation against the textbook softmax(q kᵀ/√d) v, and the
Pallas TPU (splash) kernel against the xla formulation in Pallas interpret mode."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

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


# ----------------------------------------------------------------------------------------------
# pallas_tpu: the splash kernel in interpret mode against the xla path


@functools.partial(jax.jit, static_argnums=(0, 1))
def _value_and_vjp(impl, heads, q, k, v, cotangent):
    """Return (attention output, its (dq, dk, dv) for ``cotangent``)."""
    attend = lambda *a: dot_product_attention(*a, heads, impl=impl, interpret=True)
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(cotangent)


def _inputs(rng, b, lq, lk, width, dtype=jnp.float32):
    q = rng.standard_normal((b, lq, width)) * 2
    k = rng.standard_normal((b, lk, width)) * 2
    v = rng.standard_normal((b, lk, width))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _max_rel(ours, ref) -> float:
    """Return max |ours − ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize(
    "b, lq, lk, heads, d",
    [
        (1, 128, 128, 8, 40),  # SD1.5 head dims, padded to 128, 128, 256 lanes; SD2's 64
        (1, 128, 128, 8, 80),
        (1, 128, 128, 8, 160),
        (1, 128, 128, 8, 64),
        (1, 256, 77, 8, 40),  # cross-attention: 77 keys padded to 128 and masked
        (2, 384, 300, 2, 40),  # 3 × 3 tiles of 128: the online softmax, a part-masked tile
    ],
)
def test_pallas_tpu_matches_xla_values_and_gradients(b, lq, lk, heads, d):
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, b, lq, lk, heads * d)
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    out, grads = _value_and_vjp("pallas_tpu", heads, q, k, v, cotangent)
    ref, ref_grads = _value_and_vjp("xla", heads, q, k, v, cotangent)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert _max_rel(out, ref) < 1e-5  # measured ≤ 5.2e-7 (0 where both run the same ops)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        assert _max_rel(g, r) < 1e-5  # measured ≤ 7.2e-7


def test_pallas_tpu_in_bf16_returns_bf16_as_close_as_xla():
    rng = np.random.default_rng(6)
    q, k, v = _inputs(rng, 1, 128, 77, 2 * 40)
    ref = dot_product_attention(q, k, v, 2)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    for upcast in (False, True):
        out = dot_product_attention(*bf, 2, upcast, "pallas_tpu", interpret=True)
        xla = dot_product_attention(*bf, 2, upcast, "xla")
        assert out.dtype == jnp.bfloat16
        assert _max_rel(out, ref) < max(2 * _max_rel(xla, ref), 1e-3)


def _fake_mesh(sizes, types=(AxisType.Auto, AxisType.Auto)):
    return AbstractMesh(sizes, ("data", "fsdp"), axis_types=types)


def test_auto_is_pallas_on_tpu_for_long_sequences_with_a_splittable_batch(monkeypatch):
    assert attention.auto_impl(2, 4096, 4096) == "xla"  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert attention.auto_impl(2, 4096, 4096) == "pallas_tpu"
    assert attention.auto_impl(2, 1024, 1024) == "pallas_tpu"
    assert attention.auto_impl(2, 4096, 77) == "xla"  # cross-attention
    assert attention.auto_impl(2, 256, 256) == "xla"
    monkeypatch.setattr(jax, "device_count", lambda: 8)  # no mesh to split the batch with
    assert attention.auto_impl(8, 4096, 4096) == "xla"
    monkeypatch.setattr(jax.sharding, "get_abstract_mesh", lambda: _fake_mesh((4, 2)))
    assert attention.batch_mesh_axes(8) == ("data", "fsdp")
    assert attention.auto_impl(8, 4096, 4096) == "pallas_tpu"
    assert attention.batch_mesh_axes(6) == ()
    assert attention.auto_impl(6, 4096, 4096) == "xla"
    manual = _fake_mesh((4, 2), (AxisType.Manual, AxisType.Auto))  # inside a shard_map
    monkeypatch.setattr(jax.sharding, "get_abstract_mesh", lambda: manual)
    assert attention.batch_mesh_axes(6) == ("fsdp",)


def test_auto_on_cpu_is_the_xla_path():
    q, k, v = _inputs(np.random.default_rng(7), 1, 16, 9, 8)
    auto = dot_product_attention(q, k, v, 2, impl="auto")
    np.testing.assert_array_equal(auto, dot_product_attention(q, k, v, 2))


def test_pallas_tpu_names_what_it_does_not_take():
    q, k, v = _inputs(np.random.default_rng(8), 1, 16, 9, 8)
    with pytest.raises(ValueError, match="needs a TPU backend"):
        dot_product_attention(q, k, v, 2, impl="pallas_tpu")
    pallas = functools.partial(dot_product_attention, impl="pallas_tpu", interpret=True)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        pallas(*(a.astype(jnp.float16) for a in (q, k, v)), 2)
    with pytest.raises(ValueError, match="divisible by heads=3"):
        pallas(q, k, v, 3)
    with pytest.raises(ValueError, match="equal"):
        pallas(q, k, v[:, :4], 2)


_SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from dag_jax.models.attention import dot_product_attention

mesh = jax.make_mesh((2, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
rng = np.random.default_rng(9)
args = [jnp.asarray(rng.standard_normal((4, 128, 80)), jnp.float32) for _ in range(4)]
args = [jax.device_put(a, NamedSharding(mesh, PartitionSpec(("data", "fsdp")))) for a in args]


def grads(impl):
    attend = lambda q, k, v: dot_product_attention(q, k, v, 2, impl=impl, interpret=True)
    return jax.jit(jax.grad(lambda q, k, v, w: (attend(q, k, v) * w).sum(), argnums=(0, 1, 2)))


with jax.set_mesh(mesh):
    hlo = grads("pallas_tpu").lower(*args).compile().as_text()
    ours = grads("pallas_tpu")(*args)
ref = grads("xla")(*args)
assert "all-gather" not in hlo, "the batch was gathered"
for g, r in zip(ours, ref):
    assert g.sharding.spec == PartitionSpec(("data", "fsdp")), g.sharding
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_pallas_tpu_runs_per_shard_under_a_context_mesh():
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SHARDED_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
