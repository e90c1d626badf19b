"""Per-group clipping, frozen base, and gradient accumulation of the optimiser."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dag_jax.algos.optim import GroupConfig, make_optimizer


def _params():
    return {"lora": {"a": jnp.ones(3)}, "flow": {"w": jnp.ones(2)}}


def test_each_group_is_clipped_by_its_own_norm():
    cfg = GroupConfig(learning_rate=1.0, weight_decay=0.0, max_grad_norm=1.0, b1=0.5)
    tx = make_optimizer({"lora": cfg, "flow": cfg})
    grads = {"lora": {"a": jnp.full(3, 100.0)}, "flow": {"w": jnp.full(2, 0.1)}}
    _, state = tx.update(grads, tx.init(_params()), _params())
    # Adam's first moment after one step is (1 − b1)·(clipped gradient) per group
    mus = [mu for _, mu in optax.tree_utils.tree_get_all_with_path(state, "mu")]
    by_group = {}
    for mu in mus:
        by_group.update({k: v for k, v in mu.items() if not isinstance(v, optax.MaskedNode)})
    assert np.isclose(float(jnp.linalg.norm(by_group["lora"]["a"])), 0.5, rtol=1e-5)
    np.testing.assert_allclose(by_group["flow"]["w"], 0.05, rtol=1e-5)  # under the clip


def test_accumulation_applies_the_mean_gradient_every_k_steps():
    cfg = GroupConfig(learning_rate=0.1, weight_decay=0.0, max_grad_norm=None)
    params = {"lora": {"a": jnp.zeros(2)}}
    tx = make_optimizer({"lora": cfg}, accumulate_steps=2)
    state = tx.init(params)
    g1 = {"lora": {"a": jnp.array([1.0, 3.0])}}
    g2 = {"lora": {"a": jnp.array([3.0, 1.0])}}
    u1, state = tx.update(g1, state, params)
    assert float(jnp.abs(u1["lora"]["a"]).max()) == 0.0
    u2, state = tx.update(g2, state, params)
    ref = make_optimizer({"lora": cfg})
    expected, _ = ref.update({"lora": {"a": jnp.array([2.0, 2.0])}}, ref.init(params), params)
    np.testing.assert_allclose(u2["lora"]["a"], expected["lora"]["a"], rtol=1e-6)


def test_unknown_group_is_an_error():
    tx = make_optimizer({"lora": GroupConfig()})
    with pytest.raises(ValueError, match="flow"):
        tx.init(_params())
    with pytest.raises(ValueError, match="accumulate_steps"):
        make_optimizer({"lora": GroupConfig()}, accumulate_steps=0)
    jax.block_until_ready(tx.init({"lora": {"a": jnp.ones(1)}}))
