"""Key and layout rules between PyTorch state dicts and Linen params."""

import jax
import numpy as np
import pytest

from dag_jax.weights.convert import (
    WeightsError,
    check_tree,
    linen_to_torch,
    rename_legacy_attention,
    torch_key,
    torch_to_linen,
)


def test_indexed_segments_become_dotted_except_real_names():
    assert torch_key(("down_blocks_0", "resnets_1", "conv1", "kernel")) == (
        "down_blocks.0.resnets.1.conv1.weight"
    )
    assert torch_key(("time_embedding", "linear_1", "kernel")) == "time_embedding.linear_1.weight"
    path = ("up_blocks_1", "attentions_2", "transformer_blocks_0", "ff", "net_0", "proj", "bias")
    assert torch_key(path) == "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj.bias"
    assert torch_key(("attn1", "to_out_0", "kernel")) == "attn1.to_out.0.weight"
    assert torch_key(("text_model", "encoder", "layers", "3", "layer_norm1", "scale")) == (
        "text_model.encoder.layers.3.layer_norm1.weight"
    )
    assert torch_key(("token_embedding", "embedding")) == "token_embedding.weight"


def _spec(*shape):
    return jax.ShapeDtypeStruct(shape, np.float32)


def test_conv_and_linear_weights_are_transposed_and_embeddings_are_not():
    target = {
        "conv": {"kernel": _spec(3, 3, 2, 5), "bias": _spec(5)},
        "fc": {"kernel": _spec(2, 7)},
        "emb": {"embedding": _spec(7, 2)},
        "norm": {"scale": _spec(5)},
    }
    rng = np.random.default_rng(0)
    sd = {
        "conv.weight": rng.normal(size=(5, 2, 3, 3)),
        "conv.bias": rng.normal(size=5),
        "fc.weight": rng.normal(size=(7, 2)),
        "emb.weight": rng.normal(size=(7, 2)),
        "norm.weight": rng.normal(size=5),
    }
    params = torch_to_linen(sd, target)
    np.testing.assert_array_equal(params["conv"]["kernel"], sd["conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(params["emb"]["embedding"], sd["emb.weight"])
    back = linen_to_torch(params)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_errors_list_missing_unexpected_and_misshaped_keys_together():
    target = {"a": {"kernel": _spec(2, 3)}, "b": {"bias": _spec(4)}}
    sd = {"a.weight": np.zeros((4, 2)), "c.bias": np.zeros(1), "text_model.position_ids": 0}
    with pytest.raises(WeightsError) as err:
        torch_to_linen(sd, target, "toy")
    msg = str(err.value)
    assert "weights do not fit toy" in msg
    assert "1 missing keys" in msg and "b.bias (4,)" in msg
    assert "1 unexpected keys" in msg and "c.bias" in msg
    assert "1 shape mismatches" in msg and "a.weight" in msg and "(2, 3)" in msg
    assert "position_ids" not in msg  # non-persistent buffers are dropped silently


def test_legacy_attention_names_load_from_torch_and_msgpack_trees():
    target = {"attn": {"to_q": {"kernel": _spec(3, 3), "bias": _spec(3)}}}
    w = np.arange(9.0).reshape(3, 3)
    legacy_conv = {"attn.query.weight": w[:, :, None, None], "attn.query.bias": np.ones(3)}
    params = torch_to_linen(legacy_conv, target)
    np.testing.assert_array_equal(params["attn"]["to_q"]["kernel"], w.T)
    legacy_flax = {"attn": {"query": {"kernel": w.T, "bias": np.ones(3)}}}
    renamed = check_tree(rename_legacy_attention(legacy_flax), target)
    np.testing.assert_array_equal(renamed["attn"]["to_q"]["kernel"], w.T)
