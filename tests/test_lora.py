"""LoRA on the UNet attention projections: zero-start, gradients, merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dag_jax.models.lora import LoRAConfig, init_lora, merge, num_params, target_paths
from dag_jax.models.unet import UNet2DConditionModel
from dag_jax.tinyworld.random_tiny import random_tiny_pipeline


@pytest.fixture(scope="module")
def tiny():
    pipe = random_tiny_pipeline(0)
    rng = np.random.RandomState(0)
    x = rng.randn(2, 4, 16, 16).astype(np.float32)
    ctx = rng.randn(2, 77, 32).astype(np.float32)
    return pipe, x, np.array([5, 901]), ctx


def _with_random_b(lora, seed=1):
    flat = traverse_util.flatten_dict(lora)
    key = jax.random.PRNGKey(seed)
    return traverse_util.unflatten_dict(
        {
            k: 0.1 * jax.random.normal(jax.random.fold_in(key, i), v.shape) if k[-1] == "B" else v
            for i, (k, v) in enumerate(sorted(flat.items()))
        }
    )


def test_lora_targets_q_k_v_out_of_self_and_cross_attention(tiny):
    pipe = tiny[0]
    paths = target_paths(pipe.params["unet"])
    names = {(p[-2], p[-1]) for p in paths}
    assert names == {
        (a, n) for a in ("attn1", "attn2") for n in ("to_q", "to_k", "to_v", "to_out_0")
    }
    lora = init_lora(jax.random.PRNGKey(0), pipe.params["unet"], LoRAConfig(rank=4))
    a = traverse_util.flatten_dict(lora)[paths[0] + ("A",)]
    assert a.shape[1] == 4 and num_params(lora) > 0


def test_zero_b_gives_exactly_the_base_model(tiny):
    pipe, x, t, ctx = tiny
    lora = init_lora(jax.random.PRNGKey(0), pipe.params["unet"], LoRAConfig(rank=4))
    base = pipe.unet.apply({"params": pipe.params["unet"]}, x, t, ctx).sample
    adapted = pipe.unet.apply({"params": pipe.params["unet"], "lora": lora}, x, t, ctx).sample
    np.testing.assert_array_equal(np.asarray(base), np.asarray(adapted))


def test_merged_params_equal_the_adapted_forward(tiny):
    pipe, x, t, ctx = tiny
    cfg = LoRAConfig(rank=4, alpha=8.0)
    lora = _with_random_b(init_lora(jax.random.PRNGKey(0), pipe.params["unet"], cfg))
    unet = UNet2DConditionModel(pipe.unet.config, lora_scale=cfg.scale)
    adapted = unet.apply({"params": pipe.params["unet"], "lora": lora}, x, t, ctx).sample
    merged = merge(pipe.params["unet"], lora, cfg.scale)
    out = unet.apply({"params": merged}, x, t, ctx).sample
    base = unet.apply({"params": pipe.params["unet"]}, x, t, ctx).sample
    assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-3  # the adapter matters
    np.testing.assert_allclose(np.asarray(out), np.asarray(adapted), atol=1e-5)


def test_gradient_reaches_only_the_lora_tree(tiny):
    pipe, x, t, ctx = tiny
    lora = _with_random_b(init_lora(jax.random.PRNGKey(0), pipe.params["unet"], LoRAConfig()))

    def loss(lora_params):
        out = pipe.unet.apply({"params": pipe.params["unet"], "lora": lora_params}, x, t, ctx)
        return jnp.mean(out.sample**2)

    grads = jax.grad(loss)(lora)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(lora)
    norms = [float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0


def test_bad_lora_config_is_rejected():
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoRAConfig(targets=("to_z",))
