"""Parity of the Linen CLIP text encoder with transformers' PyTorch CLIPTextModel (tiny, fp32)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dag_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTextOutput,
    with_text_model_prefix,
)
from dag_jax.weights.convert import WeightsError, linen_to_torch, torch_to_linen

TOL = 1e-4
LENGTH = 77
TINY = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=5,
    num_attention_heads=4,
    max_position_embeddings=LENGTH,
    vocab_size=1000,
    bos_token_id=1,
    pad_token_id=0,
)
# Two pooling rules: eos_token_id != 2 pools at the first EOS id (SD pads with EOS, so the EOS id
# repeats); the legacy eos_token_id == 2 pools at the argmax id (CLIP's EOT is the highest id).
EOS_FIRST = dict(eos_token_id=999, pad=999, eot=999)
EOS_ARGMAX = dict(eos_token_id=2, pad=0, eot=999)
EOS_AT = (9, 40)  # EOS position per batch row


@functools.cache
def torch_model(projection: bool = False, hidden_act: str = "quick_gelu", eos_token_id: int = 999):
    """Return a tiny transformers CLIP text model (eval mode) with every weight perturbed."""
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(
        **TINY, hidden_act=hidden_act, eos_token_id=eos_token_id, projection_dim=16
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Return the model's state dict as numpy, with transformers-5 keys under ``text_model.``."""
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return with_text_model_prefix(sd)


def token_ids(eos: dict, seed: int = 0) -> np.ndarray:
    """Return (2, 77) random ids with an EOS token at EOS_AT followed by padding."""
    ids = np.random.default_rng(seed).integers(3, 998, (2, LENGTH))
    for row, pos in enumerate(EOS_AT):
        ids[row, pos] = eos["eot"]
        ids[row, pos + 1 :] = eos["pad"]
    return ids


def padding_mask() -> np.ndarray:
    """Return the (2, 77) attention mask that hides everything after each EOS."""
    return (np.arange(LENGTH)[None, :] <= np.array(EOS_AT)[:, None]).astype(np.int64)


@functools.cache
def linen_setup(projection: bool = False, hidden_act: str = "quick_gelu", eos_token_id: int = 999):
    """Return (torch model, Linen module, converted params) for one tiny configuration."""
    tm = torch_model(projection, hidden_act, eos_token_id)
    cfg = CLIPTextConfig.from_dict(tm.config.to_dict())
    module = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    dummy = jnp.zeros((1, LENGTH), jnp.int32)
    target = jax.eval_shape(module.init, jax.random.key(0), dummy)["params"]
    params = torch_to_linen(numpy_state_dict(tm), target)
    return tm, module, params


def run_torch(model, ids: np.ndarray, mask: np.ndarray | None = None):
    """Return the PyTorch model's outputs with hidden states."""
    with torch.no_grad():
        return model(
            torch.from_numpy(ids),
            attention_mask=None if mask is None else torch.from_numpy(mask),
            output_hidden_states=True,
        )


def assert_close(got, want, what: str, tol: float = TOL) -> None:
    got, want = np.asarray(got, np.float32), want.detach().numpy()
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(np.max(np.abs(got - want)))
    assert err <= tol, f"{what}: max abs err {err:.3g} > {tol}"


def check_outputs(out: CLIPTextOutput, ref, pooled: bool = True) -> None:
    assert_close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
    if pooled:
        assert_close(out.pooler_output, ref.pooler_output, "pooler_output")
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for i, (got, want) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(got, want, f"hidden_states[{i}]")


@pytest.mark.parametrize(
    "hidden_act, eos",
    [("quick_gelu", EOS_FIRST), ("gelu", EOS_ARGMAX)],
    ids=["quick_gelu-first_eos", "gelu-argmax_eos"],
)
def test_matches_torch(hidden_act, eos):
    tm, module, params = linen_setup(False, hidden_act, eos["eos_token_id"])
    ids = token_ids(eos)
    out = module.apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)
    check_outputs(out, run_torch(tm, ids))
    assert out.text_embeds is None
    # The pooled token is the EOS position under either rule.
    np.testing.assert_array_equal(
        np.asarray(out.pooler_output), np.asarray(out.last_hidden_state)[[0, 1], list(EOS_AT)]
    )


def test_matches_torch_with_padding_mask():
    tm, module, params = linen_setup()
    ids, mask = token_ids(EOS_FIRST, seed=1), padding_mask()
    out = module.apply(
        {"params": params}, jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True
    )
    check_outputs(out, run_torch(tm, ids, mask))
    # The mask changes the padded positions only: causal attention never looks ahead of EOS.
    plain = module.apply({"params": params}, jnp.asarray(ids))
    row, pos = 1, EOS_AT[1]
    masked, unmasked = (
        np.asarray(out.last_hidden_state[row]),
        np.asarray(plain.last_hidden_state[row]),
    )
    np.testing.assert_allclose(masked[: pos + 1], unmasked[: pos + 1], atol=1e-6)
    assert np.max(np.abs(masked[pos + 1 :] - unmasked[pos + 1 :])) > 1e-3


def test_with_projection_matches_torch():
    tm, module, params = linen_setup(projection=True)
    assert params["text_projection"]["kernel"].shape == (32, 16)
    ids = token_ids(EOS_FIRST, seed=2)
    out = module.apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)
    ref = run_torch(tm, ids)
    check_outputs(out, ref, pooled=False)
    assert_close(out.text_embeds, ref.text_embeds, "text_embeds")


@pytest.mark.parametrize("projection", [False, True], ids=["text_model", "with_projection"])
def test_linen_to_torch_round_trip(projection):
    tm, _, params = linen_setup(projection=projection)
    want = {k: v for k, v in numpy_state_dict(tm).items() if not k.endswith("position_ids")}
    got = linen_to_torch(params)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    if projection:  # already transformers' own key names: loads strictly with no renaming
        fresh = transformers.CLIPTextModelWithProjection(tm.config)
        fresh.load_state_dict({k: torch.from_numpy(v) for k, v in got.items()}, strict=True)


def test_bad_weights_are_named():
    tm, module, _ = linen_setup()
    target = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32))
    sd = numpy_state_dict(tm)
    bad = "text_model.encoder.layers.3.mlp.fc1.weight"
    sd[bad] = np.zeros((36, 32), np.float32)
    with pytest.raises(WeightsError, match=re.escape(bad)):
        torch_to_linen(sd, target["params"])
    sd = numpy_state_dict(tm)
    gone = "text_model.final_layer_norm.bias"
    del sd[gone]
    with pytest.raises(WeightsError, match=re.escape(gone)):
        torch_to_linen(sd, target["params"])
    # A transformers-5 bare CLIPTextModel state dict (no "text_model." prefix) is rejected as is.
    raw = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    with pytest.raises(WeightsError, match="missing keys"):
        torch_to_linen(raw, target["params"])


def test_skip_last_layer_matches_torch_penultimate():
    tm, module, params = linen_setup()
    ids = token_ids(EOS_FIRST, seed=3)
    out = module.apply(
        {"params": params}, jnp.asarray(ids), output_hidden_states=True, skip_last_layers=1
    )
    ref = run_torch(tm, ids)
    with torch.no_grad():
        want = tm.final_layer_norm(ref.hidden_states[-2])
    assert_close(out.last_hidden_state, want, "skip_last_layers=1")
    assert_close(out.pooler_output, want[[0, 1], list(EOS_AT)], "skip pooler_output")
    assert len(out.hidden_states) == TINY["num_hidden_layers"]  # the last layer is not run
    with pytest.raises(ValueError, match="skip_last_layers"):
        module.apply({"params": params}, jnp.asarray(ids), skip_last_layers=5)


def test_init_with_skip_builds_every_layer():
    cfg = CLIPTextConfig.from_dict(torch_model().config.to_dict())
    ids = jnp.zeros((1, LENGTH), jnp.int32)
    init = functools.partial(CLIPTextModel(cfg).init, skip_last_layers=2)  # a static argument
    shapes = jax.eval_shape(init, jax.random.key(0), ids)
    assert sorted(shapes["params"]["text_model"]["encoder"]["layers"]) == list("01234")


def test_bfloat16_compute_is_close():
    _, module, params = linen_setup()
    ids = jnp.asarray(token_ids(EOS_FIRST, seed=4))
    ref = module.apply({"params": params}, ids)
    bf16 = CLIPTextModel(module.config, dtype=jnp.bfloat16)
    out = bf16.apply({"params": params}, ids)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    err = np.max(np.abs(np.asarray(out.last_hidden_state, np.float32) - ref.last_hidden_state))
    assert err < 0.1, err


def test_config_from_dict():
    text = transformers.CLIPTextConfig(**TINY, projection_dim=16, eos_token_id=2).to_dict()
    cfg = CLIPTextConfig.from_dict(text)
    assert cfg == CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        eos_token_id=2,
        projection_dim=16,
    )
    full = transformers.CLIPConfig(text_config=text, projection_dim=24).to_dict()
    nested = CLIPTextConfig.from_dict(full)
    assert nested.hidden_size == 32 and nested.projection_dim == 24
    del text["num_hidden_layers"]
    with pytest.raises(ValueError, match="num_hidden_layers"):
        CLIPTextConfig.from_dict(text)
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig.from_dict({**text, "num_hidden_layers": 2, "num_attention_heads": 5})
