"""UNet parity with diffusers' PyTorch UNet2DConditionModel (SD1- and SD2-style tiny configs)."""

import jax
import numpy as np
import pytest
import torch

from dag_jax.models.unet import UNet2DConditionModel, UNetConfig
from dag_jax.pipeline import unet_shapes
from dag_jax.weights.convert import linen_to_torch, torch_to_linen


def _inputs(batch=2, side=32, ctx_dim=32):
    rng = np.random.RandomState(0)
    x = rng.randn(batch, 4, side, side).astype(np.float32)
    ctx = rng.randn(batch, 77, ctx_dim).astype(np.float32)
    return x, np.array([10, 981][:batch]), ctx


def _convert(torch_unet):
    state = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(torch_unet.config)))
    return unet, torch_to_linen(state, unet_shapes(unet), "unet"), state


@pytest.mark.parametrize("fixture", ["torch_sd1", "torch_sd2"])
def test_unet_matches_pytorch(fixture, request):
    torch_unet = request.getfixturevalue(fixture)[0].unet
    unet, params, _ = _convert(torch_unet)
    x, t, ctx = _inputs()
    ours = jax.jit(unet.apply)({"params": params}, x, t, ctx).sample
    with torch.no_grad():
        ref = torch_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    assert np.abs(np.asarray(ours) - ref.numpy()).max() <= 1e-4


def test_sd2_config_has_per_block_heads_and_linear_projection(torch_sd2):
    unet, params, _ = _convert(torch_sd2[0].unet)
    assert unet.config.heads_per_block() == (2, 4)
    proj = params["down_blocks_1"]["attentions_0"]["proj_in"]["kernel"]
    assert proj.ndim == 2  # Linear, not a 1x1 conv
    assert unet.config.use_linear_projection


def test_params_map_back_to_the_same_state_dict(torch_sd1):
    _, params, state = _convert(torch_sd1[0].unet)
    back = linen_to_torch(params)
    assert set(back) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value)


def test_remat_gives_the_same_output(torch_sd1):
    unet, params, _ = _convert(torch_sd1[0].unet)
    remat = UNet2DConditionModel(unet.config, remat=True)
    x, t, ctx = _inputs(batch=1, side=16)
    a = unet.apply({"params": params}, x, t, ctx).sample
    b = remat.apply({"params": params}, x, t, ctx).sample
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    grad = jax.grad(lambda p: remat.apply({"params": p}, x, t, ctx).sample.sum())(params)
    assert np.isfinite(np.asarray(grad["conv_in"]["kernel"])).all()


def test_attention_through_jax_nn_gives_the_same_output(torch_sd1):
    unet, params, _ = _convert(torch_sd1[0].unet)
    fused = UNet2DConditionModel(unet.config, attention_impl="jax")
    x, t, ctx = _inputs(batch=1, side=16)
    a = unet.apply({"params": params}, x, t, ctx).sample
    b = fused.apply({"params": params}, x, t, ctx).sample
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    with pytest.raises(ValueError, match="attention impl"):
        UNet2DConditionModel(unet.config, attention_impl="flash").apply(
            {"params": params}, x, t, ctx
        )


def test_bfloat16_compute_is_close_to_float32(torch_sd1):
    unet, params, _ = _convert(torch_sd1[0].unet)
    x, t, ctx = _inputs(batch=1, side=16)
    ref = np.asarray(unet.apply({"params": params}, x, t, ctx).sample)
    bf16 = UNet2DConditionModel(unet.config, dtype=jax.numpy.bfloat16)
    out = np.asarray(bf16.apply({"params": params}, x, t, ctx).sample)
    assert out.dtype == np.float32
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 5e-2


def test_unsupported_config_is_rejected_with_its_key():
    with pytest.raises(ValueError, match="addition_embed_type"):
        UNetConfig.from_dict(
            {
                "down_block_types": ["DownBlock2D"],
                "up_block_types": ["UpBlock2D"],
                "block_out_channels": [32],
                "addition_embed_type": "text_time",
            }
        )
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetConfig.from_dict(
            {
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": [32, 64],
                "attention_head_dim": [2, 4, 8],
            }
        )


def test_wrong_input_shapes_name_the_problem(torch_sd1):
    unet, params, _ = _convert(torch_sd1[0].unet)
    x, t, ctx = _inputs(batch=1, side=16)
    with pytest.raises(ValueError, match="NCHW latents with 4 channels"):
        unet.apply({"params": params}, x.transpose(0, 2, 3, 1), t, ctx)
    with pytest.raises(ValueError, match="text context"):
        unet.apply({"params": params}, x, t, ctx[..., :16])
