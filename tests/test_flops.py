"""Model FLOPs on the jaxpr: XLA's count where it is right, loop bodies × their trip count."""

import jax
import jax.numpy as jnp
import pytest

from dag_jax.bench import flops
from dag_jax.models import attention

F32 = jnp.float32


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def conv(x, w, **kw):
    return jax.lax.conv_general_dilated(x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)


@pytest.mark.parametrize(
    "x, w, kw",
    [
        ((4, 8, 8, 16), (3, 3, 16, 32), dict(window_strides=(1, 1), padding=((1, 1), (1, 1)))),
        ((4, 9, 9, 16), (3, 3, 16, 32), dict(window_strides=(2, 2), padding=((1, 1), (1, 1)))),
        ((4, 8, 8, 16), (2, 2, 16, 32), dict(window_strides=(1, 1), padding=((0, 1), (0, 1)))),
        (
            (4, 8, 8, 16),
            (3, 3, 4, 32),
            dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), feature_group_count=4),
        ),
    ],
)
def test_convolutions_and_their_gradients_count_as_xla_counts_them(x, w, kw):
    x, w = jax.ShapeDtypeStruct(x, F32), jax.ShapeDtypeStruct(w, F32)
    fwd = lambda x, w: conv(x, w, **kw)
    assert flops.model_flops(fwd, x, w) == xla_flops(fwd, x, w)
    # the gradient of a sum: two convolutions (input and kernel), no elementwise arithmetic,
    # and the primal forward dropped as lowering drops it
    grad = jax.grad(lambda x, w: fwd(x, w).sum(), argnums=(0, 1))
    assert flops.model_flops(grad, x, w) == xla_flops(grad, x, w)


def test_matrix_products_count_two_flops_per_multiply_add():
    a = jax.ShapeDtypeStruct((3, 5, 7), F32)
    b = jax.ShapeDtypeStruct((3, 7, 11), F32)
    fn = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)
    assert flops.model_flops(fn, a, b) == 2 * 3 * 5 * 7 * 11 == xla_flops(fn, a, b)


def test_loop_bodies_count_once_per_iteration_where_xla_counts_them_once():
    x = jax.ShapeDtypeStruct((10, 32, 32), F32)
    one = 2 * 32**3
    mapped = lambda x: jax.lax.map(lambda y: y @ y, x)
    assert flops.model_flops(mapped, x) == 10 * one
    assert xla_flops(mapped, x) < 2 * one  # XLA: the body once (and the loop counter)
    scanned = lambda x: jax.lax.scan(lambda c, y: (c @ y, None), x[0], x)[0]
    assert flops.model_flops(scanned, x) == 10 * one
    nested = lambda x: jax.lax.map(lambda y: jax.lax.map(lambda r: r @ y, y[:4]), x)
    assert flops.model_flops(nested, x) == 10 * 4 * 2 * 32 * 32


def test_cond_counts_its_dearest_branch_and_while_loops_are_reported():
    x = jax.ShapeDtypeStruct((16, 16), F32)
    branchy = lambda x: jax.lax.cond(x[0, 0] > 0, lambda y: y @ y @ y, lambda y: y @ y, x)
    assert flops.model_flops(branchy, x) == 2 * (2 * 16**3)
    looped = lambda x: jax.lax.while_loop(lambda c: c[0, 0] < 10.0, lambda c: c @ c, x)
    got = flops.count(looped, x)
    assert got.total == 2 * 16**3 and got.loops == 1


def test_blocked_cpu_attention_counts_every_block():
    # 16 (batch · head) slices of 1024² scores run in lax.map blocks on one CPU device
    b, length, heads, d = 4, 1024, 4, 8
    assert attention.score_block(b * heads, length, length) < b * heads
    q = jax.ShapeDtypeStruct((b, length, heads * d), F32)
    fn = lambda q: attention.dot_product_attention(q, q, q, heads)
    want = 2 * (2 * b * heads * length * length * d)  # q·kᵀ and p·v
    assert flops.model_flops(fn, q) == want
    assert xla_flops(fn, q) < want / 2
