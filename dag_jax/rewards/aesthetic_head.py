"""The LAION aesthetic predictor head ``sac+logos+ava1-l14-linearMSE`` as a Linen module.

The original PyTorch module (LAION's improved-aesthetic-predictor ``MLP``) is an
``nn.Sequential`` of Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64),
Dropout, Linear(64, 16), Linear(16, 1): no activations, and the Dropouts are identity at eval,
so its state dict holds ``layers.{0,2,4,6,7}.{weight,bias}``. The Linen module names its Dense
layers ``layers_0``, ``layers_2``, … so the keys map one to one (``kernel`` = ``weight``.T).

    params = load_aesthetic_head("sac+logos+ava1-l14-linearMSE.pth")   # or a .safetensors copy
    scores = aesthetic_score(params, image_embeds)   # (B, 768) CLIP ViT-L/14 embeds -> (B,)
    save_head_safetensors(params, "head.safetensors")                  # no torch needed

The score L2-normalises the embeddings first, as the references do (SPEC §8). The Dense layers
run at ``Precision.HIGHEST`` so GPUs do not drop to TF32 for this tiny head.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.rewards.base import RewardError

EMBED_DIM = 768
FEATURES = (1024, 128, 64, 16, 1)
# Index of each Linear in the PyTorch nn.Sequential (the Dropouts sit at 1, 3 and 5).
TORCH_INDICES = (0, 2, 4, 6, 7)
SAFETENSORS_SUFFIXES = (".safetensors",)


class AestheticHeadError(RewardError):
    """The aesthetic head's weight file is missing, unreadable, or has wrong keys or shapes."""


class AestheticHead(nn.Module):
    """768→1024→128→64→16→1 stack of Dense layers, no activations (LAION aesthetic head)."""

    features: tuple[int, ...] = FEATURES
    torch_indices: tuple[int, ...] = TORCH_INDICES

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Return (..., 1) head outputs of (..., 768) (already normalised) embeddings."""
        for feat, idx in zip(self.features, self.torch_indices, strict=True):
            x = nn.Dense(feat, name=f"layers_{idx}", precision=jax.lax.Precision.HIGHEST)(x)
        return x


def expected_shapes(embed_dim: int = EMBED_DIM) -> dict[str, tuple[int, ...]]:
    """Return the PyTorch state-dict keys of the head and their shapes."""
    shapes: dict[str, tuple[int, ...]] = {}
    fan_in = embed_dim
    for feat, idx in zip(FEATURES, TORCH_INDICES, strict=True):
        shapes[f"layers.{idx}.weight"] = (feat, fan_in)
        shapes[f"layers.{idx}.bias"] = (feat,)
        fan_in = feat
    return shapes


def _read_torch(path: Path) -> Mapping:
    try:
        import torch
    except ImportError as err:
        raise AestheticHeadError(
            f"{path} is a PyTorch checkpoint and torch is not installed; install torch or use a "
            "safetensors copy (save_head_safetensors)"
        ) from err
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise AestheticHeadError(f"cannot read {path} safely (weights_only=True): {err}") from err
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise AestheticHeadError(f"{path} holds a {type(state).__name__}, not a state dict")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise AestheticHeadError(f"{path}: entry {key!r} is not a tensor")
        out[key] = value.detach().cpu().float().numpy()
    return out


def _read_safetensors(path: Path) -> Mapping:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as err:
        raise AestheticHeadError(
            f"cannot read {path}: truncated or corrupt safetensors file ({err})"
        ) from err


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Return the flat PyTorch-named state dict of a ``.pth``/``.pt``/``.bin`` or ``.safetensors``.

    PyTorch files are read with ``torch.load(weights_only=True, map_location="cpu")`` (torch is
    imported only here); safetensors files need no torch.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise AestheticHeadError(f"aesthetic head weights not found: {path}")
    reader = _read_safetensors if path.suffix in SAFETENSORS_SUFFIXES else _read_torch
    return {k: np.asarray(v) for k, v in reader(path).items()}


def params_from_state_dict(
    state: Mapping[str, np.ndarray], source: str = "state dict"
) -> dict[str, dict[str, np.ndarray]]:
    """Return head params (float32 numpy, Linen layout) from a PyTorch-named state dict.

    Missing, unexpected and mis-shaped keys are all reported in one AestheticHeadError that
    names ``source`` (the file).
    """
    want = expected_shapes()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [
        f"{k}: expected {want[k]}, got {tuple(np.shape(state[k]))}"
        for k in want
        if k in state and tuple(np.shape(state[k])) != want[k]
    ]
    if missing or unexpected or wrong:
        lines = [f"{source} is not the LAION aesthetic head (768→1024→128→64→16→1):"]
        lines += [f"  missing key {k}" for k in missing]
        lines += [f"  unexpected key {k}" for k in unexpected]
        lines += [f"  wrong shape {w}" for w in wrong]
        raise AestheticHeadError("\n".join(lines))
    params = {}
    for idx in TORCH_INDICES:
        weight = np.asarray(state[f"layers.{idx}.weight"], np.float32)
        bias = np.asarray(state[f"layers.{idx}.bias"], np.float32)
        params[f"layers_{idx}"] = {"kernel": np.ascontiguousarray(weight.T), "bias": bias}
    return params


def load_aesthetic_head(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Return the head params from a ``.pth`` (LAION's file) or a ``.safetensors`` copy.

    The params are the Linen tree (without the ``"params"`` collection wrapper), float32
    numpy: ``AestheticHead().apply({"params": params}, x)``.
    """
    path = Path(path).expanduser()
    return params_from_state_dict(read_state_dict(path), str(path))


def _unwrap(params: Mapping) -> Mapping:
    if set(params) == {"params"}:
        return params["params"]
    return params


def head_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Return the PyTorch-named state dict (``layers.N.weight``/``bias``) of head params."""
    params = _unwrap(params)
    state = {}
    for idx in TORCH_INDICES:
        layer = params[f"layers_{idx}"]
        state[f"layers.{idx}.weight"] = np.ascontiguousarray(np.asarray(layer["kernel"]).T)
        state[f"layers.{idx}.bias"] = np.ascontiguousarray(np.asarray(layer["bias"]))
    return {k: v.astype(np.float32) for k, v in state.items()}


def save_head_safetensors(params: Mapping, path: str | os.PathLike) -> None:
    """Write head params to ``path`` as safetensors with the original PyTorch keys (no torch)."""
    from safetensors.numpy import save_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(head_state_dict(params), str(path), metadata={"format": "pt"})


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Return ``x / ||x||`` along the last axis (norms below ``eps`` are clamped to ``eps``)."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


def aesthetic_score(head_params: Mapping, image_embeds: jax.Array) -> jax.Array:
    """Return (B,) float32 aesthetic scores of (B, 768) CLIP ViT-L/14 image embeddings.

    The embeddings are L2-normalised, then run through the head. Jit-able.
    """
    x = jnp.asarray(image_embeds, jnp.float32)
    if x.ndim < 1 or x.shape[-1] != EMBED_DIM:
        raise RewardError(
            f"aesthetic head expects (B, {EMBED_DIM}) CLIP ViT-L/14 image embeddings, "
            f"got shape {x.shape}"
        )
    out = AestheticHead().apply({"params": _unwrap(head_params)}, l2_normalize(x))
    return out[..., 0].astype(jnp.float32)
