"""Parity of the Linen LAION aesthetic head with the PyTorch module, its loaders and errors."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from dag_jax.rewards.aesthetic_head import (
    AestheticHead,
    AestheticHeadError,
    aesthetic_score,
    expected_shapes,
    head_state_dict,
    load_aesthetic_head,
    params_from_state_dict,
    save_head_safetensors,
)
from dag_jax.rewards.base import RewardError

HEAD_PTH = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "weights"
    / "sac+logos+ava1-l14-linearMSE.pth"
)
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def torch_state() -> dict[str, torch.Tensor]:
    """Return the real head's PyTorch state dict (skips when ../shared is absent)."""
    if not HEAD_PTH.is_file():
        pytest.skip(f"aesthetic head weights not found at {HEAD_PTH}")
    return torch.load(HEAD_PTH, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def torch_head(torch_state) -> torch.nn.Module:
    """Return LAION's PyTorch head (nn.Sequential with Dropouts) loaded strictly, eval mode."""
    layers = torch.nn.Sequential(
        torch.nn.Linear(768, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )
    module = torch.nn.Module()
    module.layers = layers
    module.load_state_dict(torch_state, strict=True)
    return module.eval()


@pytest.fixture(scope="module")
def params():
    """Return the real head loaded through load_aesthetic_head (the .pth)."""
    if not HEAD_PTH.is_file():
        pytest.skip(f"aesthetic head weights not found at {HEAD_PTH}")
    return load_aesthetic_head(HEAD_PTH)


def random_embeds(n: int = 16, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Return (n, 768) float32 Gaussian embeddings (not normalised) times ``scale``."""
    return (np.random.default_rng(seed).standard_normal((n, 768)) * scale).astype(np.float32)


def torch_scores(head: torch.nn.Module, embeds: np.ndarray) -> np.ndarray:
    """Return the reference scores: L2-normalise in torch, then the head."""
    x = torch.from_numpy(embeds).double()
    x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    with torch.no_grad():
        return head.double().layers(x)[:, 0].numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Return max |a - b| / max |b|."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_keys_and_shapes_match_the_pth(torch_state, params):
    assert {k: tuple(v.shape) for k, v in torch_state.items()} == expected_shapes()
    target = jax.eval_shape(AestheticHead().init, jax.random.key(0), np.zeros((1, 768)))
    got = jax.tree.map(lambda x: x.shape, params)
    assert got == jax.tree.map(lambda x: x.shape, target["params"])
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))


def test_parity_with_torch(torch_head, params):
    embeds = random_embeds(16)
    want = torch_scores(torch_head, embeds)
    got = np.asarray(jax.jit(aesthetic_score)(params, embeds))
    assert got.shape == (16,) and got.dtype == np.float32
    err = rel_err(got, want)
    print(f"\naesthetic head parity: max rel err {err:.2e}, scores {want[:4].round(4)}")
    assert err <= REL_TOL


def test_embeddings_are_normalised_first(params):
    embeds = random_embeds(4, seed=1)
    a = np.asarray(aesthetic_score(params, embeds))
    b = np.asarray(aesthetic_score(params, embeds * 37.5))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_safetensors_round_trip(tmp_path, params, torch_head):
    path = tmp_path / "head" / "aesthetic.safetensors"
    save_head_safetensors(params, path)
    again = load_aesthetic_head(path)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    # The copy keeps the original keys: PyTorch loads it strictly.
    from safetensors.torch import load_file

    state = load_file(str(path))
    module = torch.nn.Module()
    module.layers = torch_head.layers
    module.load_state_dict(state, strict=True)
    embeds = random_embeds(4, seed=2)
    np.testing.assert_allclose(
        np.asarray(aesthetic_score(again, embeds)),
        torch_scores(module, embeds),
        rtol=REL_TOL,
        atol=1e-5,
    )


def test_params_wrapped_in_collection(params):
    embeds = random_embeds(3, seed=3)
    a = aesthetic_score(params, embeds)
    b = aesthetic_score({"params": params}, embeds)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(head_state_dict({"params": params})) == set(expected_shapes())


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(RewardError, match="nope.pth"):
        load_aesthetic_head(path)
    with pytest.raises(AestheticHeadError, match="not found"):
        load_aesthetic_head(tmp_path / "nope.safetensors")


def fake_state(seed: int = 0) -> dict[str, np.ndarray]:
    """Return a random state dict with the head's keys and shapes."""
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(s).astype(np.float32) * 0.05 for k, s in expected_shapes().items()
    }


def test_missing_key_pth(tmp_path):
    state = {k: torch.from_numpy(v) for k, v in fake_state().items()}
    del state["layers.4.bias"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(AestheticHeadError, match=r"broken\.pth[\s\S]*missing key layers\.4\.bias"):
        load_aesthetic_head(path)


def test_missing_key_safetensors(tmp_path):
    from safetensors.numpy import save_file

    state = fake_state()
    del state["layers.7.weight"]
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(AestheticHeadError, match=r"missing key layers\.7\.weight"):
        load_aesthetic_head(path)


def test_wrong_shape_and_unexpected_key():
    state = fake_state()
    state["layers.2.weight"] = state["layers.2.weight"][:, :512]
    state["layers.9.weight"] = np.zeros((1, 1), np.float32)
    with pytest.raises(AestheticHeadError) as info:
        params_from_state_dict(state, "my_head.bin")
    msg = str(info.value)
    assert "my_head.bin" in msg
    assert "layers.2.weight: expected (128, 1024), got (128, 512)" in msg
    assert "unexpected key layers.9.weight" in msg


def test_corrupt_files(tmp_path):
    for name in ("bad.safetensors", "bad.pth"):
        path = tmp_path / name
        path.write_bytes(b"not a weight file")
        with pytest.raises(AestheticHeadError, match=name.replace(".", r"\.")):
            load_aesthetic_head(path)


def test_wrong_embedding_width(params):
    with pytest.raises(RewardError, match="768"):
        aesthetic_score(params, np.zeros((2, 1024), np.float32))
