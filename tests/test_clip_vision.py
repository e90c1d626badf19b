"""Parity of the Linen CLIP vision tower and two-tower CLIPModel with transformers (tiny, fp32)."""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dag_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from dag_jax.weights.clip_loader import (
    build_clip,
    clip_param_shapes,
    clip_state_dict,
    load_clip,
    save_clip,
)
from dag_jax.weights.convert import WeightsError, linen_to_torch, torch_to_linen

TOL = 1e-4
LENGTH = 77
IMAGE = 32
# Text and vision differ in width, depth and activation so that a mixed-up config shows.
TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=LENGTH,
    vocab_size=1000,
    hidden_act="quick_gelu",
    bos_token_id=998,
    eos_token_id=2,  # argmax pooling (EOT = 999 is the highest id)
    pad_token_id=0,
)
VISION = dict(
    hidden_size=48,
    intermediate_size=53,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=IMAGE,
    patch_size=8,
    hidden_act="gelu",
)
PROJECTION = 16
EOS_AT = (9, 40)


def tiny_config() -> transformers.CLIPConfig:
    """Return the tiny transformers CLIPConfig."""
    return transformers.CLIPConfig(
        text_config=TEXT, vision_config=VISION, projection_dim=PROJECTION
    )


@functools.cache
def torch_model() -> transformers.CLIPModel:
    """Return the tiny transformers CLIPModel (eval mode) with every weight perturbed."""
    torch.manual_seed(0)
    model = transformers.CLIPModel(tiny_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Return the model's state dict as numpy arrays."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@functools.cache
def linen_setup() -> tuple[transformers.CLIPModel, CLIPModel, dict]:
    """Return (torch model, Linen CLIPModel, converted params)."""
    tm = torch_model()
    module, shapes = build_clip(tm.config.to_dict())
    return tm, module, torch_to_linen(numpy_state_dict(tm), shapes)


def pixels(seed: int = 0, batch: int = 2) -> np.ndarray:
    """Return random NCHW pixel values."""
    return np.random.default_rng(seed).normal(size=(batch, 3, IMAGE, IMAGE)).astype(np.float32)


def token_ids(seed: int = 0) -> np.ndarray:
    """Return (2, 77) ids: BOS, random tokens, EOT (999) at EOS_AT, then 0-padding."""
    ids = np.random.default_rng(seed).integers(3, 998, (2, LENGTH))
    ids[:, 0] = 998
    for row, pos in enumerate(EOS_AT):
        ids[row, pos] = 999
        ids[row, pos + 1 :] = 0
    return ids


def assert_close(got, want, what: str, tol: float = TOL) -> float:
    """Assert max |got - want| <= tol and return it."""
    got = np.asarray(got, np.float32)
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(np.max(np.abs(got - want)))
    assert err <= tol, f"{what}: max abs err {err:.3g} > {tol}"
    return err


def apply(module, params, *args, method=None, **kwargs):
    """Return ``module.apply`` on params (``method`` a name of CLIPModel, or None)."""
    return module.apply({"params": params}, *args, method=method, **kwargs)


def check_features(module: CLIPModel, params: dict, tm: transformers.CLIPModel) -> None:
    """Assert image and text features of the Linen model match the torch model."""
    px, ids = pixels(), token_ids()
    with torch.no_grad():
        want_img = tm.get_image_features(torch.from_numpy(px)).pooler_output
        want_txt = tm.get_text_features(torch.from_numpy(ids)).pooler_output
    img = apply(module, params, jnp.asarray(px), method="get_image_features")
    txt = apply(module, params, jnp.asarray(ids), method="get_text_features")
    assert_close(img, want_img, "image features")
    assert_close(txt, want_txt, "text features")


def test_param_tree_matches_transformers_keys():
    tm, _, params = linen_setup()
    want = {k: v for k, v in numpy_state_dict(tm).items() if not k.endswith("position_ids")}
    got = clip_state_dict(params)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert params["logit_scale"].shape == ()
    assert params["vision_model"]["embeddings"]["patch_embedding"]["kernel"].shape == (8, 8, 3, 48)
    assert params["visual_projection"]["kernel"].shape == (48, PROJECTION)
    fresh = transformers.CLIPModel(tm.config)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in got.items()}, strict=True)


def test_image_and_text_features_match_torch():
    tm, module, params = linen_setup()
    check_features(module, params, tm)


def test_vision_outputs_match_torch():
    tm, module, params = linen_setup()
    px = pixels(seed=1)
    with torch.no_grad():
        ref = tm.vision_model(torch.from_numpy(px), output_hidden_states=True)
    out = apply(module, params, jnp.asarray(px), True, method="vision_outputs")
    assert_close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
    assert_close(out.pooler_output, ref.pooler_output, "pooler_output")
    assert len(out.hidden_states) == len(ref.hidden_states) == VISION["num_hidden_layers"] + 1
    for i, (got, want) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(got, want, f"hidden_states[{i}]")
    assert out.last_hidden_state.shape == (2, (IMAGE // 8) ** 2 + 1, 48)


def test_text_pools_at_argmax_and_padding_mask_matches():
    tm, module, params = linen_setup()
    ids = token_ids(seed=2)
    mask = (np.arange(LENGTH)[None, :] <= np.array(EOS_AT)[:, None]).astype(np.int64)
    with torch.no_grad():
        ref = tm.text_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    out = apply(module, params, jnp.asarray(ids), jnp.asarray(mask), method="text_outputs")
    assert_close(out.last_hidden_state, ref.last_hidden_state, "text last_hidden_state")
    assert_close(out.pooler_output, ref.pooler_output, "text pooler_output")
    np.testing.assert_array_equal(
        np.asarray(out.pooler_output), np.asarray(out.last_hidden_state)[[0, 1], list(EOS_AT)]
    )


def test_forward_logits_match_torch():
    tm, module, params = linen_setup()
    px, ids = pixels(seed=3, batch=3), token_ids(seed=3)
    with torch.no_grad():
        ref = tm(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(px))
    out = apply(module, params, jnp.asarray(ids), jnp.asarray(px))
    assert out.logits_per_image.shape == (3, 2)
    assert_close(out.logits_per_image, ref.logits_per_image, "logits_per_image")
    assert_close(out.logits_per_text, ref.logits_per_text, "logits_per_text")
    assert_close(out.image_embeds, ref.image_embeds, "image_embeds")
    assert_close(out.text_embeds, ref.text_embeds, "text_embeds")


def test_vision_model_with_projection_matches_torch():
    tm, _, params = linen_setup()
    sub = {k: params[k] for k in ("vision_model", "visual_projection")}
    cfg = CLIPVisionConfig.from_dict(tm.config.to_dict())
    torch_vision = transformers.CLIPVisionModelWithProjection(tm.config.vision_config).eval()
    torch_vision.config.projection_dim = PROJECTION
    sd = {k: torch.from_numpy(v) for k, v in linen_to_torch(sub).items()}
    torch_vision.visual_projection = torch.nn.Linear(48, PROJECTION, bias=False)
    torch_vision.load_state_dict(sd, strict=True)  # the same keys as transformers' model
    px = pixels(seed=4)
    with torch.no_grad():
        want = torch_vision(torch.from_numpy(px)).image_embeds
    out = CLIPVisionModelWithProjection(cfg).apply({"params": sub}, jnp.asarray(px))
    assert_close(out.image_embeds, want, "image_embeds")


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    """Return the folder where transformers saved the tiny CLIPModel."""
    path = tmp_path_factory.mktemp("clip") / "model"
    torch_model().save_pretrained(path)
    return path


def test_load_clip_from_save_pretrained(saved_folder):
    module, params, config = load_clip(saved_folder)
    assert config["projection_dim"] == PROJECTION
    assert isinstance(module, CLIPModel) and module.config.vision.hidden_act == "gelu"
    assert all(v.dtype == np.float32 for v in jax.tree_util.tree_leaves(params))
    check_features(module, params, torch_model())


def test_load_clip_from_pytorch_bin(tmp_path, saved_folder):
    (tmp_path / "config.json").write_text((saved_folder / "config.json").read_text())
    sd = dict(torch_model().state_dict())
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # old buffer, dropped
    torch.save(sd, tmp_path / "pytorch_model.bin")
    module, params, _ = load_clip(tmp_path)
    check_features(module, params, torch_model())


def test_save_clip_round_trips_through_transformers(tmp_path):
    tm, module, params = linen_setup()
    save_clip(tmp_path, params, tm.config.to_dict())
    back = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    check_features(module, params, back)


def test_load_clip_errors_name_the_path(tmp_path, saved_folder):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_clip(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty / "config.json"))):
        load_clip(empty)
    (empty / "config.json").write_text((saved_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=f"no weight file in {re.escape(str(empty))}"):
        load_clip(empty)
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps(TEXT))
    with pytest.raises(ValueError, match="vision_config"):
        load_clip(text_only)


def test_wrong_shapes_and_missing_keys_are_named(tmp_path):
    tm, module, _ = linen_setup()
    shapes = clip_param_shapes(module)
    sd = numpy_state_dict(tm)
    bad = "vision_model.encoder.layers.1.mlp.fc1.weight"
    sd[bad] = np.zeros((52, 48), np.float32)
    del sd["vision_model.embeddings.class_embedding"]
    sd["visual.proj"] = np.zeros((48, 16), np.float32)
    with pytest.raises(WeightsError) as info:
        torch_to_linen(sd, shapes)
    msg = str(info.value)
    assert bad in msg and "vision_model.embeddings.class_embedding" in msg and "visual.proj" in msg
    # The same through the folder loader, with the file named.
    from safetensors.numpy import save_file

    sd = numpy_state_dict(tm)
    sd[bad] = np.zeros((52, 48), np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(tm.config.to_dict()))
    with pytest.raises(WeightsError, match=re.escape(str(tmp_path / "model.safetensors"))):
        load_clip(tmp_path)


def test_bad_image_shape_is_refused():
    _, module, params = linen_setup()
    with pytest.raises(ValueError, match="NCHW"):
        apply(module, params, jnp.zeros((1, IMAGE, IMAGE, 3)), method="get_image_features")


def test_bfloat16_compute_is_close():
    _, module, params = linen_setup()
    px = jnp.asarray(pixels(seed=5))
    ref = apply(module, params, px, method="get_image_features")
    bf16 = CLIPModel(module.config, dtype=jnp.bfloat16)
    out = apply(bf16, params, px, method="get_image_features")
    assert out.dtype == jnp.bfloat16
    err = np.max(np.abs(np.asarray(out, np.float32) - np.asarray(ref)))
    assert err < 0.1 * float(np.max(np.abs(np.asarray(ref)))), err


def test_configs_from_dict():
    full = tiny_config().to_dict()
    vision = CLIPVisionConfig.from_dict(full)
    assert vision == CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=53,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        num_channels=3,
        projection_dim=PROJECTION,  # the top-level value, not the sub-config's stale 512
    )
    assert vision.num_positions == 17
    bare = CLIPVisionConfig.from_dict(full["vision_config"])
    assert bare.projection_dim == 512 and bare.hidden_size == 48
    cfg = CLIPConfig.from_dict(full)
    assert cfg.text == CLIPTextConfig.from_dict(full) and cfg.vision == vision
    assert cfg.projection_dim == PROJECTION
    with pytest.raises(ValueError, match="patch_size"):
        CLIPVisionConfig.from_dict({k: v for k, v in VISION.items() if k != "patch_size"})
    with pytest.raises(ValueError, match="divisible by patch_size"):
        CLIPVisionConfig.from_dict({**VISION, "patch_size": 7})
    with pytest.raises(ValueError, match="text_config"):
        CLIPConfig.from_dict({"vision_config": VISION})
