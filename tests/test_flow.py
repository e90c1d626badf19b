"""The DAG flow network: shapes, fp32 output, dependence on each input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dag_jax.models.flow import FlowConfig, FlowNetwork

SMALL = FlowConfig(
    in_channels=4,
    cross_attention_dim=32,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    attention_heads=4,
)


@pytest.fixture(scope="module")
def flow():
    net = FlowNetwork(SMALL)
    rng = np.random.RandomState(0)
    x = rng.randn(3, 4, 16, 16).astype(np.float32)
    ctx = rng.randn(3, 7, 32).astype(np.float32)
    t = np.array([1, 500, 981])
    params = net.init(jax.random.PRNGKey(0), x, t, ctx)["params"]
    return net, params, x, t, ctx


def test_flow_is_one_fp32_scalar_per_sample(flow):
    net, params, x, t, ctx = flow
    out = net.apply({"params": params}, x, t, ctx)
    assert out.shape == (3,) and out.dtype == jnp.float32
    bf16 = FlowNetwork(SMALL, dtype=jnp.bfloat16).apply({"params": params}, x, t, ctx)
    assert bf16.dtype == jnp.float32


def test_flow_depends_on_latent_timestep_and_prompt(flow):
    net, params, x, t, ctx = flow
    f = lambda *a: np.asarray(net.apply({"params": params}, *a))
    base = f(x, t, ctx)
    assert not np.allclose(base, f(x + 1.0, t, ctx))
    assert not np.allclose(base, f(x, t[::-1], ctx))
    assert not np.allclose(base, f(x, t, ctx[::-1]))


def test_release_default_shape_builds():
    cfg = FlowConfig()
    assert cfg.block_out_channels == (64, 128, 256, 256) and cfg.layers_per_block == 1
    shapes = jax.eval_shape(
        FlowNetwork(cfg).init,
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, 4, 64, 64), jnp.float32),
        jnp.zeros((1,), jnp.int32),
        jax.ShapeDtypeStruct((1, 77, 768), jnp.float32),
    )
    n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    assert 1e6 < n < 3e7
    with pytest.raises(ValueError, match="divide"):
        FlowConfig(block_out_channels=(30,), down_block_types=("DownBlock2D",))
