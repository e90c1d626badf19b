"""LAION aesthetic reward (SPEC §8): CLIP ViT-L/14 image embedding → the linear aesthetic head.

    reward = dag_jax.rewards.get("aesthetic", head="sac+logos+ava1-l14-linearMSE.pth")
    scores = reward(images, prompts)          # (B, H, W, 3) float in [0, 1] → (B,) float32
    fn = reward.bind(prompts)                 # JAX-native: jax.jit(fn)(images, prompt_idx)

What it computes, per image (the prompt is ignored), as DDPO's ``aesthetic_score`` and LAION's
improved-aesthetic-predictor do:

1. quantise to the uint8 levels (``rewards.base.quantize``; the references go through PIL);
2. CLIP preprocessing in the graph (``rewards.preprocess.clip_preprocess``): bicubic resize of
   the short side to the vision tower's ``image_size`` (224 for ViT-L/14), center crop, OpenAI
   CLIP mean/std. ``preprocess="pil"`` (default) reproduces transformers' PIL-path
   ``CLIPImageProcessor`` bit for bit on the uint8 image; ``"jax"`` uses ``jax.image.resize``
   (float, ~1 uint8 level off; see ``rewards/preprocess.py`` for the measured differences);
3. ``CLIPModel.get_image_features`` (the projected 768-d embedding) of the Linen CLIP;
4. L2 normalisation and the head ``sac+logos+ava1-l14-linearMSE`` (768→1024→128→64→16→1, no
   activations; ``rewards.aesthetic_head``), which runs in fp32 at ``Precision.HIGHEST``.

The CLIP tower and the head are loaded once, at construction, and put on the default device
as ``reward.params``. Only the vision half of CLIP is kept (the text tower is dropped), as the
prompts play no part. ``dtype`` is the CLIP compute dtype (params stay fp32).

Weights and jit: arrays a traced function merely closes over are embedded in the lowered
program as constants (checked with JAX 0.10.2: ``stablehlo.constant dense<...>``; 1.2 GB for
the ViT-L/14 vision tower, 3.9 GB for ViT-H-14; the ``sd15-random`` reward bench through
``bind`` was OOM-killed on a 23 GB host). So a compiled train step uses
``reward.bound_with_params(prompts)`` and passes ``reward.params`` as an argument; ``bind`` (the
closed-over form) is for eager use and small towers.

Weights: ``clip`` is a transformers ``CLIPModel`` folder (``config.json`` + safetensors/bin, as
``save_pretrained`` writes) or a hub id, fetched only when online (default
``openai/clip-vit-large-patch14``); ``head`` is the head's ``.pth`` (LAION's file) or a
safetensors copy (``aesthetic_head.save_head_safetensors``). The head has no default: it is not
on the hub under a stable id, so its path must be given.

Parity (``tests/test_reward_models.py``): on a tiny random transformers CLIP (32 px, 768-d
projection) with the real LAION head, the scores equal a PyTorch reference
(``CLIPImageProcessor`` PIL path → ``get_image_features`` → L2 norm → the head as a torch
``nn.Linear`` stack) to ~1e-6 (see the test for the bound and the measured value).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dag_jax.models.clip import CLIPModel
from dag_jax.rewards.aesthetic_head import EMBED_DIM, aesthetic_score, load_aesthetic_head
from dag_jax.rewards.base import Reward, RewardError, jax_reward
from dag_jax.rewards.preprocess import METHODS, clip_preprocess

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_SOURCE = (
    "LAION's improved-aesthetic-predictor, https://github.com/christophschuhmann/"
    "improved-aesthetic-predictor (the file sac+logos+ava1-l14-linearMSE.pth)"
)
DTYPES = ("float32", "bfloat16", "float16")
# The parts of a CLIPModel param tree that get_image_features reads (logit_scale: a scalar the
# module's setup always declares).
VISION_KEYS = ("vision_model", "visual_projection", "logit_scale")


def aesthetic(
    clip: str | os.PathLike = DEFAULT_CLIP,
    head: str | os.PathLike | None = None,
    dtype: str = "float32",
    preprocess: str = "pil",
) -> Reward:
    """Return the LAION aesthetic reward (JAX-native, prompts ignored).

    ``clip``: transformers CLIPModel folder or hub id (a ViT-L/14, whose projection is 768-d);
    ``head``: path of ``sac+logos+ava1-l14-linearMSE.pth`` (or its safetensors copy);
    ``dtype``: CLIP compute dtype, "float32" | "bfloat16" | "float16"; ``preprocess``: "pil"
    (exact PIL bicubic) or "jax" (``jax.image.resize``). Raises RewardError for a missing head
    option, missing or bad files, or a CLIP whose projection is not 768-d.
    """
    compute = parse_dtype(dtype, "aesthetic")
    method = check_preprocess(preprocess, "aesthetic")
    if head is None:
        raise RewardError(
            f"reward 'aesthetic' needs head=<path of {HEAD_FILE}>: the LAION aesthetic head is "
            f"published in {HEAD_SOURCE}; download it and pass its path (or a safetensors copy)"
        )
    head_params = load_aesthetic_head(head)  # AestheticHeadError (a RewardError) names the path
    module, params = load_clip_model(clip, compute, "aesthetic")
    config = dict(clip=str(clip), head=str(head), dtype=str(dtype), preprocess=method)
    return aesthetic_reward(module, params, head_params, method, config)


def aesthetic_reward(
    module: CLIPModel,
    params: Mapping[str, Any],
    head_params: Mapping[str, Any],
    preprocess: str = "pil",
    config: dict | None = None,
) -> Reward:
    """Return the aesthetic Reward of an already built CLIP (module + params) and head params.

    The building block of ``aesthetic`` (which loads the files). Raises RewardError unless the
    CLIP projection is 768-d.
    """
    fn, weights = aesthetic_parts(module, params, head_params, preprocess)
    return jax_reward("aesthetic", fn, tokenize=None, config=dict(config or {}), params=weights)


def aesthetic_parts(
    module: CLIPModel,
    params: Mapping[str, Any],
    head_params: Mapping[str, Any],
    preprocess: str = "pil",
) -> tuple[Callable, dict]:
    """Return (``fn(weights, images, tokens) -> (B,) scores``, weights on device).

    The reward's score with its weights as an explicit argument (``{"clip": vision tower,
    "head": head}``), for callers that pass the weights into their jitted program instead of
    closing over them (the reward bench). ``images`` are quantised (B, H, W, 3) in [0, 1];
    ``tokens`` is ignored.
    """
    method = check_preprocess(preprocess, "aesthetic")
    proj = module.config.projection_dim
    if proj != EMBED_DIM:
        raise RewardError(
            f"reward 'aesthetic': the CLIP image embedding is {proj}-d but the LAION head "
            f"expects {EMBED_DIM}-d CLIP ViT-L/14 embeddings (use openai/clip-vit-large-patch14)"
        )
    weights = device_params({"clip": vision_params(params), "head": head_params})

    def fn(weights: dict, images: jax.Array, tokens: jax.Array) -> jax.Array:
        del tokens  # prompts play no part
        feats = image_features(module, weights["clip"], images, method)
        return aesthetic_score(weights["head"], feats)

    return fn, weights


# ---------------------------------------------------------------------------------------------
# Helpers shared with rewards/clipscore.py


def parse_dtype(dtype: Any, name: str) -> jnp.dtype:
    """Return the compute dtype named ``dtype`` (one of DTYPES), or raise RewardError."""
    try:
        out = jnp.dtype(dtype)
    except TypeError:
        out = None
    if out is None or out.name not in DTYPES:
        raise RewardError(f"reward {name!r}: dtype must be one of {DTYPES}, got {dtype!r}")
    return out


def check_preprocess(preprocess: str, name: str) -> str:
    """Return ``preprocess`` if it is a resize method of ``clip_preprocess``, else RewardError."""
    if preprocess not in METHODS:
        raise RewardError(
            f"reward {name!r}: preprocess must be one of {METHODS}, got {preprocess!r}"
        )
    return preprocess


def load_clip_model(
    path_or_id: str | os.PathLike, dtype: jnp.dtype, name: str
) -> tuple[CLIPModel, dict]:
    """Return (Linen CLIPModel, fp32 numpy params) of a transformers CLIP folder or hub id.

    Any loading error (missing folder or file, bad config, missing or mis-shaped weights)
    becomes a RewardError naming ``path_or_id``.
    """
    from dag_jax.weights.clip_loader import load_clip

    try:
        module, params, _ = load_clip(path_or_id, dtype)
    except (OSError, ValueError) as err:  # FileNotFoundError, WeightsError, bad config
        raise RewardError(
            f"reward {name!r} could not load the CLIP model {str(path_or_id)!r}: {err}"
        ) from err
    return module, params


def vision_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Return the subtree of CLIPModel params that ``get_image_features`` needs."""
    if set(params) == {"params"}:
        params = params["params"]
    missing = [k for k in VISION_KEYS if k not in params]
    if missing:
        raise RewardError(f"CLIP params lack {missing}; they have {sorted(params)}")
    return {k: params[k] for k in VISION_KEYS}


def device_params(tree: Any) -> Any:
    """Return the tree (numpy or jax arrays) as jax arrays on the default device.

    Leaves keep their dtype (the loaders give fp32); arrays already there are not copied.
    """
    return jax.device_put(tree)


def image_features(
    module: CLIPModel,
    params: Mapping[str, Any],
    images: jax.Array,
    method: str = "pil",
    preprocess_fn=None,
) -> jax.Array:
    """Return fp32 unnormalised CLIP image embeddings (..., E) of (..., H, W, 3) images in [0, 1].

    Leading axes beyond the batch are flattened for the tower and restored. ``preprocess_fn``
    (default ``clip_preprocess``) maps (N, H, W, 3) images, the size and the method to NCHW
    pixel values; its size is the vision tower's ``image_size``.
    """
    preprocess_fn = preprocess_fn or (lambda x, size, m: clip_preprocess(x, size, m, "NCHW"))
    lead = images.shape[:-3]
    flat = images.reshape((-1, *images.shape[-3:]))
    pixels = preprocess_fn(flat, module.config.vision.image_size, method)
    feats = module.apply({"params": params}, pixels, method=CLIPModel.get_image_features)
    return feats.astype(jnp.float32).reshape((*lead, feats.shape[-1]))
