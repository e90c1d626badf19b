"""Load a transformers ``CLIPModel`` folder (config.json + weights) into the Linen CLIPModel.

    model, params, config = load_clip("path/to/clip-vit-large-patch14")
    feats = model.apply({"params": params}, pixel_values, method=CLIPModel.get_image_features)

The folder is what ``transformers.CLIPModel.save_pretrained`` writes: ``config.json`` (a full
``CLIPConfig`` with ``text_config`` and ``vision_config``) and ``model.safetensors`` (or sharded
safetensors, or ``pytorch_model.bin`` read with ``torch.load(weights_only=True)``). transformers
5.24 (checked) and 4.x save a CLIPModel's weights as ``text_model.*``, ``vision_model.*``,
``text_projection.weight``, ``visual_projection.weight`` and ``logit_scale``; old files also carry
``*.position_ids`` buffers, which are dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.models.clip import CLIPConfig, CLIPModel
from dag_jax.weights import diffusers as folder
from dag_jax.weights.convert import linen_to_torch


def clip_param_shapes(module: CLIPModel) -> dict:
    """Return the ShapeDtypeStruct tree of a CLIPModel's params (no memory is allocated)."""
    cfg = module.config
    ids = jnp.zeros((1, cfg.text.max_position_embeddings), jnp.int32)
    size = cfg.vision.image_size
    pixels = jnp.zeros((1, cfg.vision.num_channels, size, size), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), ids, pixels)["params"]


def build_clip(config: Mapping[str, Any], dtype: jnp.dtype = jnp.float32) -> tuple[CLIPModel, dict]:
    """Return (CLIPModel module, param shape tree) for a transformers ``CLIPConfig`` dict."""
    module = CLIPModel(CLIPConfig.from_dict(config), dtype=dtype)
    return module, clip_param_shapes(module)


def load_clip(
    path_or_id: str | os.PathLike,
    dtype: jnp.dtype = jnp.float32,
    revision: str | None = None,
) -> tuple[CLIPModel, dict[str, Any], dict[str, Any]]:
    """Return (CLIPModel module, fp32 numpy params, raw config dict) of a transformers CLIP folder.

    ``path_or_id`` is a local folder or a hub id (fetched only when not offline). ``dtype`` is the
    module's compute dtype; params stay fp32. Raises FileNotFoundError naming the folder or file
    when the folder, ``config.json`` or the weights are missing, ValueError for a config that is
    not a full CLIPConfig, and WeightsError listing every missing, unexpected or mis-shaped key.
    """
    root = folder.resolve(path_or_id, revision, parts=("",))  # weights at the root
    config = folder.read_json(root / "config.json")
    try:
        module, shapes = build_clip(config, dtype)
    except ValueError as err:
        raise ValueError(f"{root / 'config.json'}: {err}") from err
    params = folder.load_params(root, shapes, "CLIPModel")
    return module, params, config


def clip_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Return the transformers ``CLIPModel`` state dict (numpy) of Linen CLIPModel params.

    The scalar ``logit_scale`` keeps its 0-d shape (transformers refuses a (1,) one).
    """
    return linen_to_torch(params)


def save_clip(out: str | os.PathLike, params: Mapping, config: Mapping[str, Any]) -> None:
    """Write ``config.json`` and ``model.safetensors`` (PyTorch names) into the folder ``out``.

    ``transformers.CLIPModel.from_pretrained(out)`` and ``load_clip(out)`` both read it back.
    """
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(clip_state_dict(params), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
