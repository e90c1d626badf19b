"""OpenCLIP ViT checkpoints (ViT-H-14 for clipscore, HPS v2/v2.1) → the Linen CLIPModel.

    model, params, config = load_open_clip("HPS_v2.1_compressed.pt", "ViT-H-14")

An OpenCLIP ``CLIP`` state dict is renamed to transformers' ``CLIPModel`` keys and layouts (numpy
only), then converted by ``weights/convert.py`` like any transformers checkpoint:

- ``visual.conv1.weight`` → ``vision_model.embeddings.patch_embedding.weight``
- ``visual.class_embedding`` → ``vision_model.embeddings.class_embedding``
- ``visual.positional_embedding`` → ``vision_model.embeddings.position_embedding.weight``
- ``visual.ln_pre`` / ``visual.ln_post`` → ``vision_model.pre_layrnorm`` / ``…post_layernorm``
- ``visual.proj`` (W, E), used as ``x @ proj`` → ``visual_projection.weight`` = proj.T
- ``token_embedding`` / ``positional_embedding`` → ``text_model.embeddings.token_embedding`` /
  ``…position_embedding.weight``
- ``ln_final`` → ``text_model.final_layer_norm``
- ``text_projection`` (D, E), used as ``x @ proj`` → ``text_projection.weight`` = proj.T
- ``[visual.]transformer.resblocks.N.`` → ``{vision,text}_model.encoder.layers.N.``, inside it
  ``ln_1``/``ln_2`` → ``layer_norm1``/``layer_norm2``, ``attn.in_proj_weight/bias`` (fused
  q, k, v rows) → ``self_attn.q_proj/k_proj/v_proj``, ``attn.out_proj`` → ``self_attn.out_proj``,
  ``mlp.c_fc``/``mlp.c_proj`` → ``mlp.fc1``/``mlp.fc2``
- ``logit_scale`` → ``logit_scale`` (a scalar)

Text side (how OpenCLIP ViT-H-14 / HPS v2 tokenise and pool): the OpenAI CLIP byte-level BPE
(the same vocab and merges as transformers' ``CLIPTokenizer`` of ``openai/clip-vit-*``), text
cleaned with ftfy + whitespace squeeze + lower case, ``<start_of_text>`` (49406) + BPE ids +
``<end_of_text>`` (49407), truncated to 77 tokens (the last one forced to EOT) and padded with
**0** (not with EOT as SD's tokenizer does). The text tower is causal with no padding mask and
pools at ``argmax(ids)`` (EOT is the highest id); the derived config therefore sets
``eos_token_id = 2``, transformers' legacy signal for argmax pooling, which the Linen text tower
follows too. ``open_clip_token_ids`` builds such ids with a transformers ``CLIPTokenizer``.

Images: NCHW, 224×224 for ViT-H-14, bicubic resize of the short side + center crop, normalised
with the OpenAI CLIP mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954, 0.26130258,
0.27577711); the vision tower pools the class token (``pool_type='tok'``) after ``ln_post``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from dag_jax.models.clip import CLIPModel
from dag_jax.weights import diffusers as folder
from dag_jax.weights.clip_loader import build_clip
from dag_jax.weights.convert import WeightsError, torch_to_linen

# OpenCLIP model configs (the JSON files of open_clip/model_configs) needed by the rewards.
OPEN_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "ViT-H-14": {
        "embed_dim": 1024,
        "vision_cfg": {
            "image_size": 224,
            "layers": 32,
            "width": 1280,
            "head_width": 80,
            "patch_size": 14,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 1024,
            "heads": 16,
            "layers": 24,
        },
    },
}

# Non-size settings the converter supports, with the only accepted value (OpenCLIP's default,
# which ViT-H-14 and the OpenAI ViTs use). Anything else changes the architecture or pooling.
_VISION_FIXED = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "timm_model_name": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "act_kwargs": None,
}
_TEXT_FIXED = {
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "hf_model_name": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "act_kwargs": None,
}
_TOP_FIXED = {"custom_text": False, "init_logit_bias": None}
# Top-level keys of an OpenCLIP config that do not change the weights or the forward pass.
_TOP_IGNORED = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "cast_dtype"}

# Block-level renames, OpenCLIP → transformers (inside ``…resblocks.N.`` / ``…layers.N.``).
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Whole-key renames outside the blocks.
_KEY_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# Projection matrices used as ``x @ proj``: transposed into a Linear weight (out, in).
_PROJECTIONS = {
    "visual.proj": "visual_projection.weight",
    "text_projection": "text_projection.weight",
}
# Tower prefixes of the residual blocks.
_TOWERS = {"visual.transformer.resblocks.": "vision_model", "transformer.resblocks.": "text_model"}
# Non-learned buffers some OpenCLIP versions save.
_DROPPED = ("attn_mask", "visual.attn_mask")


def _strip_prefix(state: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Return the state dict without a DataParallel/DDP ``module.`` prefix on every key."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _block_keys(key: str) -> list[str] | None:
    """Return the transformers key(s) of a residual-block key, or None if it is not one.

    A fused ``attn.in_proj_weight``/``in_proj_bias`` gives three keys (q, k, v, in row order).
    """
    for prefix, tower in _TOWERS.items():
        if not key.startswith(prefix):
            continue
        index, _, rest = key[len(prefix) :].partition(".")
        base = f"{tower}.encoder.layers.{index}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            leaf = rest.rpartition("_")[2]
            return [f"{base}self_attn.{p}_proj.{leaf}" for p in "qkv"]
        module, _, leaf = rest.rpartition(".")
        if module in _BLOCK_RENAMES:
            return [f"{base}{_BLOCK_RENAMES[module]}.{leaf}"]
        return [base + rest]  # unknown block part: kept, reported as unexpected later
    return None


def convert_state_dict(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Return an OpenCLIP ViT ``CLIP`` state dict renamed to transformers ``CLIPModel`` keys.

    Tensors become numpy arrays in transformers' PyTorch layout: the fused attention
    ``in_proj_weight`` (3W, W) / ``in_proj_bias`` (3W,) split into q, k, v; the ``x @ proj``
    matrices ``visual.proj`` and ``text_projection`` transposed into Linear weights; a (1,)
    ``logit_scale`` made a scalar. A ``module.`` prefix on every key is removed and the
    ``attn_mask`` buffers are dropped. Keys it does not know are kept as they are, so
    ``torch_to_linen`` reports them as unexpected.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in _strip_prefix(state).items():
        value = np.asarray(value)
        if key in _DROPPED:
            continue
        if key in _KEY_RENAMES:
            out[_KEY_RENAMES[key]] = value
        elif key in _PROJECTIONS:
            out[_PROJECTIONS[key]] = np.ascontiguousarray(value.T) if value.ndim == 2 else value
        elif key == "logit_scale":
            out[key] = value.reshape(()) if value.size == 1 else value
        elif (renamed := _block_keys(key)) is None:
            out[key] = value
        elif len(renamed) == 3:
            if value.shape[0] % 3:
                raise WeightsError(f"{key}: fused qkv of shape {value.shape} is not 3 equal parts")
            out.update(zip(renamed, np.split(value, 3, axis=0)))
        else:
            out[renamed[0]] = value
    return out


def _check_fixed(cfg: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> list[str]:
    """Return a description of each setting of ``cfg`` that differs from the supported value."""
    return [
        f"{where}.{k}={cfg[k]!r} (supported: {v!r})"
        for k, v in fixed.items()
        if k in cfg and cfg[k] != v and not (v is None and cfg[k] in ({}, ""))
    ]


def model_config_dict(model_config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Return an OpenCLIP model config dict from a dict, a known name or a JSON file path.

    Known names: the keys of ``OPEN_CLIP_CONFIGS`` (e.g. ``"ViT-H-14"``); other OpenCLIP names
    need their ``model_configs/<name>.json`` (or its dict) from the open_clip package.
    """
    if isinstance(model_config, Mapping):
        return dict(model_config)
    if str(model_config) in OPEN_CLIP_CONFIGS:
        return json.loads(json.dumps(OPEN_CLIP_CONFIGS[str(model_config)]))
    path = Path(model_config)
    if path.is_file():
        return folder.read_json(path)
    raise FileNotFoundError(
        f"unknown OpenCLIP model config {str(model_config)!r}: not one of "
        f"{sorted(OPEN_CLIP_CONFIGS)} nor a JSON file; pass the config dict or JSON path"
    )


def clip_config_from_open_clip(
    model_config: str | os.PathLike | Mapping[str, Any], quick_gelu: bool | None = None
) -> dict[str, Any]:
    """Return the transformers ``CLIPConfig`` dict of an OpenCLIP ViT model config.

    ``model_config`` is an OpenCLIP config (``embed_dim``, ``vision_cfg``, ``text_cfg``; see
    ``model_config_dict``). The activation is exact GELU (``"gelu"``, OpenCLIP's ``nn.GELU``, as
    in ViT-H-14) unless ``quick_gelu`` (default: the config's own ``quick_gelu``, set by the
    ``-quickgelu`` configs and for OpenAI weights) selects ``"quick_gelu"``. The text config gets
    ``eos_token_id = 2`` (argmax pooling, see the module docstring) and ``pad_token_id = 0``.
    Raises ValueError naming any setting the Linen CLIPModel does not implement.
    """
    cfg = model_config_dict(model_config)
    vision, text = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    problems = _check_fixed(cfg, _TOP_FIXED, "model")
    problems += _check_fixed(vision, _VISION_FIXED, "vision_cfg")
    problems += _check_fixed(text, _TEXT_FIXED, "text_cfg")
    if isinstance(vision.get("layers"), (list, tuple)):
        problems.append(f"vision_cfg.layers={vision['layers']!r} (a ResNet; only ViTs supported)")
    if vision.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
        problems.append(f"vision_cfg.pos_embed_type={vision['pos_embed_type']!r}")
    unknown = sorted(set(cfg) - _TOP_IGNORED - set(_TOP_FIXED))
    if unknown:
        problems.append(f"unknown top-level keys {unknown}")
    if "embed_dim" not in cfg:
        problems.append("missing embed_dim")
    if problems:
        raise ValueError("unsupported OpenCLIP model config: " + "; ".join(problems))

    act = (
        "quick_gelu"
        if (cfg.get("quick_gelu", False) if quick_gelu is None else quick_gelu)
        else "gelu"
    )

    def eps(tower: Mapping[str, Any]) -> float:
        return float((tower.get("norm_kwargs") or {}).get("eps", 1e-5))

    v_width = vision.get("width", 768)
    t_width = text.get("width", 512)
    vocab = text.get("vocab_size", 49408)
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": cfg["embed_dim"],
        "logit_scale_init_value": 2.6592,
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v_width,
            "intermediate_size": int(v_width * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision.get("layers", 12),
            "num_attention_heads": v_width // vision.get("head_width", 64),
            "image_size": vision.get("image_size", 224),
            "patch_size": vision.get("patch_size", 16),
            "num_channels": 3,
            "hidden_act": act,
            "layer_norm_eps": eps(vision),
            "projection_dim": cfg["embed_dim"],
        },
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": vocab,
            "hidden_size": t_width,
            "intermediate_size": int(t_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text.get("layers", 12),
            "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", 77),
            "hidden_act": act,
            "layer_norm_eps": eps(text),
            "projection_dim": cfg["embed_dim"],
            "pad_token_id": text.get("pad_id", 0),
            "bos_token_id": vocab - 2,  # <start_of_text> with OpenCLIP's BPE vocab
            "eos_token_id": 2,  # legacy value: pool at argmax(ids), as OpenCLIP's 'argmax'
        },
    }


def _as_fp32(tree: Any) -> Any:
    """Return the nested dict with floating leaves cast to fp32 numpy."""
    if isinstance(tree, Mapping):
        return {k: _as_fp32(v) for k, v in tree.items()}
    value = np.asarray(tree)
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def read_open_clip_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Return the raw OpenCLIP state dict (numpy) of a ``.safetensors``, ``.bin`` or ``.pt`` file.

    PyTorch pickles are read only with ``torch.load(weights_only=True)``; a training checkpoint's
    weights nested under ``"state_dict"`` (HPS v2) are unwrapped. Raises FileNotFoundError naming
    a missing file and WeightsError for an unreadable one.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"OpenCLIP checkpoint {path} does not exist")
    return folder.read_weights_file(path)


def load_open_clip(
    path: str | os.PathLike,
    model_config: str | os.PathLike | Mapping[str, Any] = "ViT-H-14",
    dtype: jnp.dtype = jnp.float32,
    quick_gelu: bool | None = None,
) -> tuple[CLIPModel, dict[str, Any], dict[str, Any]]:
    """Return (CLIPModel module, fp32 numpy params, transformers config dict) of an OpenCLIP file.

    ``model_config`` names the architecture (see ``model_config_dict``); ``quick_gelu`` as in
    ``clip_config_from_open_clip``. The module's ``get_image_features`` / ``get_text_features``
    equal OpenCLIP's ``encode_image`` / ``encode_text`` (unnormalised) for ids built like
    ``open_clip_token_ids``. Raises WeightsError listing every missing, unexpected or
    mis-shaped weight (under its transformers name).
    """
    config = clip_config_from_open_clip(model_config, quick_gelu)
    module, shapes = build_clip(config, dtype)
    state = convert_state_dict(read_open_clip_checkpoint(path))
    params = torch_to_linen(state, shapes, f"OpenCLIP {Path(path)} (as transformers CLIPModel)")
    return module, _as_fp32(params), config


def open_clip_token_ids(
    tokenizer: Any, texts: str | Sequence[str], context_length: int = 77
) -> np.ndarray:
    """Return (B, context_length) int32 OpenCLIP-style token ids from a transformers tokenizer.

    ``tokenizer`` is a ``CLIPTokenizer`` with OpenAI's CLIP BPE (e.g. of
    ``openai/clip-vit-large-patch14`` or ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). Each row is
    BOS + BPE ids + EOS, truncated to ``context_length`` with EOS kept last, then padded with 0
    (whatever the tokenizer's own pad token is), as ``open_clip.tokenize``. Raises ValueError if
    EOS is not the highest id of a row (argmax pooling would then pick the wrong token).
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    encoded = tokenizer(
        texts, truncation=True, max_length=context_length, padding=False, add_special_tokens=True
    )["input_ids"]
    out = np.zeros((len(texts), context_length), np.int32)
    for row, ids in enumerate(encoded):
        out[row, : len(ids)] = ids
        if ids and int(np.argmax(out[row])) != len(ids) - 1:
            raise ValueError(
                f"EOS (id {ids[-1]}) is not the highest id of {texts[row]!r}; OpenCLIP pools "
                f"at argmax(ids), so this tokenizer's vocab does not fit"
            )
    return out
