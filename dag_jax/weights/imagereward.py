"""ImageReward-v1.0 checkpoints (``ImageReward.pt`` of THUDM/ImageReward) → ``ImageRewardModel``.

    module, params, config = load_imagereward("ImageReward.pt", med_config)   # or .safetensors
    convert_checkpoint("ImageReward.pt", "ImageReward.safetensors")           # once, with torch

The checkpoint is the state dict of ImageReward's ``nn.Module``: ``blip.visual_encoder.*`` (BLIP
ViT-L/16), ``blip.text_encoder.*`` (BLIP's BERT-base with cross-attention, no pooler),
``mlp.layers.{0,2,4,6,7}.*`` (the head), plus BLIP's contrastive projections
``blip.vision_proj.*`` / ``blip.text_proj.*``, which the score never reads and which are
dropped here (as are ``position_ids`` buffers, by ``convert.IGNORED_TORCH_KEYS``). The Linen
tree of ``models/blip.py`` mirrors those keys, so ``convert.torch_to_linen`` maps them by its
rules and reports every missing, unexpected or mis-shaped key in one ``WeightsError``.

The sizes come from the weights (layer counts, widths, vocabulary, patch and image size: the
ViT's heads are 64 wide). ``med_config`` (ImageReward's ``med_config.json``, a BERT config)
gives what the shapes do not tell: ``num_attention_heads`` (12), ``layer_norm_eps`` (1e-12),
``hidden_act`` ("gelu"); the sizes it states (``vocab_size``, ``hidden_size``,
``num_hidden_layers``, ``intermediate_size``, ``max_position_embeddings``) win over the
weights' and are thus checked against them. Its ``encoder_width`` is not read: BLIP overrides
it with the ViT's width, as here.

PyTorch pickles are read only with ``torch.load(weights_only=True)``; a ``.safetensors`` file
with the same keys (``convert_checkpoint`` writes one) needs no torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.models.blip import (
    VIT_HEAD_DIM,
    BlipTextConfig,
    BlipVisionConfig,
    ImageRewardConfig,
    ImageRewardModel,
)
from dag_jax.weights import diffusers as folder
from dag_jax.weights.convert import WeightsError, linen_to_torch, torch_to_linen

VISION = "blip.visual_encoder."
TEXT = "blip.text_encoder."
HEAD = "mlp.layers."
# BLIP's contrastive projections: in the file, never used by the score.
UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
# BERT settings the weights' shapes do not tell, with ImageReward's values.
MED_DEFAULTS = {"num_attention_heads": 12, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
# BERT sizes of med_config.json that, when present, override the ones read from the weights.
MED_SIZES = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "max_position_embeddings",
)


def read_med_config(path: str | os.PathLike) -> dict[str, Any]:
    """Return ImageReward's ``med_config.json`` as a dict (FileNotFoundError, ValueError)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"med_config {path} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read med_config {path}: {err}") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"med_config {path} holds a {type(cfg).__name__}, not a JSON object")
    return cfg


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Return the flat state dict (numpy) of ``ImageReward.pt`` or a ``.safetensors`` copy.

    Raises FileNotFoundError naming a missing file and WeightsError for an unreadable one.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ImageReward checkpoint {path} does not exist")
    return folder.read_weights_file(path)


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """Return the shape of ``state[key]``, or raise WeightsError naming the missing key."""
    if key not in state:
        raise WeightsError(
            f"weights do not fit ImageReward: missing key {key} (expected the state dict of "
            "ImageReward-v1.0: blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*)"
        )
    return tuple(np.shape(state[key]))


def _count(state: Mapping[str, Any], prefix: str) -> int:
    """Return how many numbered sub-blocks ``prefix<i>.`` the state dict holds (max index + 1)."""
    ids = {k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)}
    return max((int(i) + 1 for i in ids if i.isdigit()), default=0)


def config_from_state_dict(
    state: Mapping[str, Any], med_config: Mapping[str, Any] | None = None
) -> ImageRewardConfig:
    """Return the ImageRewardConfig implied by the weights' shapes and ``med_config``.

    Raises WeightsError naming a key the sizes are read from when it is missing, and ValueError
    for an unsupported ``med_config`` setting.
    """
    med = dict(med_config or {})
    width, _, patch, _ = _shape(state, VISION + "patch_embed.proj.weight")
    tokens = _shape(state, VISION + "pos_embed")[1] - 1
    grid = math.isqrt(max(tokens, 0))
    if grid * grid != tokens:
        raise WeightsError(f"{VISION}pos_embed holds {tokens} patch positions: not a square grid")
    vision = BlipVisionConfig(
        hidden_size=width,
        num_hidden_layers=_count(state, VISION + "blocks."),
        num_attention_heads=max(width // VIT_HEAD_DIM, 1),
        intermediate_size=_shape(state, VISION + "blocks.0.mlp.fc1.weight")[0],
        image_size=grid * patch,
        patch_size=patch,
    )
    vocab, hidden = _shape(state, TEXT + "embeddings.word_embeddings.weight")
    sizes = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": _count(state, TEXT + "encoder.layer."),
        "intermediate_size": _shape(state, TEXT + "encoder.layer.0.intermediate.dense.weight")[0],
        "max_position_embeddings": _shape(state, TEXT + "embeddings.position_embeddings.weight")[0],
    }
    sizes.update({k: int(med[k]) for k in MED_SIZES if med.get(k) is not None})
    settings = {k: med.get(k, v) for k, v in MED_DEFAULTS.items()}
    text = BlipTextConfig(
        **sizes,
        num_attention_heads=int(settings["num_attention_heads"]),
        layer_norm_eps=float(settings["layer_norm_eps"]),
        hidden_act=str(settings["hidden_act"]),
        encoder_width=width,
    )
    indices = sorted({int(k.split(".")[2]) for k in state if k.startswith(HEAD)})
    if not indices:
        _shape(state, HEAD + "0.weight")  # raises, naming the head's first key
    features = tuple(_shape(state, f"{HEAD}{i}.weight")[0] for i in indices)
    return ImageRewardConfig(vision, text, features, tuple(indices))


def drop_unused(state: Mapping[str, Any]) -> dict[str, Any]:
    """Return the state dict without BLIP's projections, which the score never reads."""
    return {k: v for k, v in state.items() if not k.startswith(UNUSED_PREFIXES)}


def param_shapes(module: ImageRewardModel) -> dict:
    """Return the module's param tree as ShapeDtypeStructs (no memory allocated)."""
    cfg = module.config
    size, length = cfg.vision.image_size, min(35, cfg.text.max_position_embeddings)
    pixels = jnp.zeros((1, size, size, cfg.vision.num_channels), jnp.float32)
    ids = jnp.zeros((1, length), jnp.int32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), pixels, ids, ids)
    return shapes["params"]


def params_from_state_dict(
    state: Mapping[str, Any],
    med_config: Mapping[str, Any] | None = None,
    dtype: jnp.dtype = jnp.float32,
    what: str = "ImageReward",
) -> tuple[ImageRewardModel, dict]:
    """Return (ImageRewardModel, fp32 numpy params) of an ImageReward state dict.

    Raises WeightsError listing every missing, unexpected or mis-shaped key.
    """
    config = config_from_state_dict(state, med_config)
    module = ImageRewardModel(config, dtype)
    params = torch_to_linen(drop_unused(state), param_shapes(module), what)
    return module, jax.tree.map(lambda v: np.asarray(v, np.float32), params)


def load_imagereward(
    path: str | os.PathLike,
    med_config: str | os.PathLike | Mapping[str, Any] | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[ImageRewardModel, dict, ImageRewardConfig]:
    """Return (ImageRewardModel, fp32 numpy params, config) of ``ImageReward.pt``/safetensors.

    ``med_config``: path or dict of ImageReward's ``med_config.json`` (None: its values, see the
    module docstring); ``dtype``: the compute dtype. Raises FileNotFoundError for a missing
    file and WeightsError for an unreadable one or one whose keys or shapes do not fit.
    """
    med = read_med_config(med_config) if isinstance(med_config, (str, os.PathLike)) else med_config
    state = read_checkpoint(path)
    module, params = params_from_state_dict(state, med, dtype, f"ImageReward {Path(path)}")
    return module, params, module.config


def imagereward_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """Return the ``ImageReward.pt`` state dict (numpy, PyTorch layout) of Linen params."""
    return linen_to_torch(params)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Write the tensors of ``ImageReward.pt`` to ``dst`` as safetensors, keys unchanged.

    Reading the ``.pt`` needs torch (``weights_only=True``); the copy loads without it.
    """
    from safetensors.numpy import save_file

    state = {k: np.ascontiguousarray(v) for k, v in read_checkpoint(src).items()}
    save_file(state, str(dst))
