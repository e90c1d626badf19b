"""PickScore (``yuvalkirstain/PickScore_v1``) as a JAX-native reward, served from the Linen CLIP.

    reward = dag_jax.rewards.get("pickscore")                    # the hub's PickScore_v1
    reward = dag_jax.rewards.get("pickscore", model="/models/PickScore_v1")
    scores = reward(images, prompts)          # (B, H, W, 3) float in [0, 1] → (B,) float32
    fn = reward.bind(prompt_list)             # JAX-native: jax.jit(fn)(images, prompt_idx)

score = exp(logit_scale) · cos(image_embeds, text_embeds), as PickScore's own code computes it
(``model.logit_scale.exp() * text_embs @ image_embs.T`` on L2-normalised embeddings). With the
released weights exp(logit_scale) ≈ 100, so scores sit around 20 and differences of 0.1 matter.

The model is a transformers ``CLIPModel`` (ViT-H/14: vision width 1280, 32 layers, patch 14, 224
px; text width 1024, 24 layers; 1024-d projection; exact-erf GELU). It runs in the project's
Linen ``CLIPModel`` (``models/clip.py``), whose param tree is transformers' key for key, loaded
by ``weights.clip_loader.load_clip`` (a missing, unexpected or misshapen key raises
``WeightsError`` naming it). Per image, in the graph: quantise to the uint8 levels, then
``CLIPProcessor``'s image transform (``rewards.preprocess.clip_preprocess``: bicubic resize of
the short side to 224, centre crop, OpenAI CLIP mean/std; ``preprocess="pil"`` is bit-exact
with its PIL path), ``get_image_features``. Per prompt, once per prompt list on the host: the
CLIP tokenizer's ids and attention mask (``truncation=True, max_length=77``, padded to 77: the
text tower is causal and pools at EOS, so padding after it changes nothing), and
``get_text_features`` in the graph.

Files: ``model`` is a folder as ``CLIPModel.save_pretrained`` writes it (``config.json`` +
``model.safetensors``, sharded safetensors or ``pytorch_model.bin``, read with
``weights_only=True``), a bucket URL of such a folder (``gs://…``, copied once into a local
cache by ``weights.remote``; needs the ``gcs`` extra), or a hub id (default
``yuvalkirstain/PickScore_v1``, fetched only when online). ``tokenizer`` is a folder with a
transformers ``CLIPTokenizer`` (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``); None
uses the model folder's own tokenizer files (PickScore_v1 ships them; its processor is
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s, whose tokenizer is OpenAI CLIP's BPE).

Parity (``tests/test_pickscore.py``): a small random transformers ``CLIPModel`` of the same
family (GELU, projection, logit_scale) saved with ``save_pretrained`` and scored through
``CLIPProcessor``'s steps and PickScore's formula in PyTorch agrees to ≤ 1e-4 relative in fp32.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.models.clip import CLIPModel, l2_normalize
from dag_jax.rewards.aesthetic import (
    check_preprocess,
    device_params,
    image_features,
    load_clip_model,
    parse_dtype,
)
from dag_jax.rewards.base import Reward, RewardError, jax_reward, token_table

NAME = "pickscore"
DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MAX_LENGTH = 77  # PickScore's processor call: truncation=True, max_length=77

Tokenize = Callable[[Sequence[str]], np.ndarray]


def pickscore(
    model: str | os.PathLike = DEFAULT_MODEL,
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "float32",
    preprocess: str = "pil",
) -> Reward:
    """Return the PickScore reward: exp(logit_scale) · cos(image, prompt) of PickScore_v1.

    ``model``: a transformers CLIPModel folder, a ``gs://`` URL of one, or a hub id;
    ``tokenizer``: a ``CLIPTokenizer`` folder (None or "": the model folder's);
    ``dtype``: the towers' compute dtype, "float32" | "bfloat16" | "float16" (params fp32;
    normalisation and the score fp32); ``preprocess``: "pil" (exact PIL bicubic, as
    ``CLIPProcessor``) or "jax" (``jax.image.resize``). Bad or missing files raise RewardError.
    """
    compute = parse_dtype(dtype, NAME)
    method = check_preprocess(preprocess, NAME)
    root = model_folder(model)
    tok = load_tokenizer(tokenizer or root, from_model=not tokenizer)  # first: it is cheap
    module, params = load_clip_model(root, compute, NAME)
    config = dict(
        model=str(model),
        tokenizer=None if not tokenizer else str(tokenizer),
        dtype=str(dtype),
        preprocess=method,
    )
    return pickscore_reward(module, params, tok, method, config)


def pickscore_reward(
    module: CLIPModel,
    params: Any,
    tokenizer: Any,
    preprocess: str = "pil",
    config: dict | None = None,
) -> Reward:
    """Return the PickScore Reward of a built CLIP (module + params) and its tokenizer."""
    fn, weights, tokenize = pickscore_parts(module, params, tokenizer, preprocess)
    return jax_reward(NAME, fn, tokenize=tokenize, config=dict(config or {}), params=weights)


def pickscore_parts(
    module: CLIPModel,
    params: Any,
    tokenizer: Any,
    preprocess: str = "pil",
) -> tuple[Callable, Any, Tokenize]:
    """Return (``fn(weights, images, tokens) -> (...,) scores``, weights on device, tokenize).

    The reward's score with its weights as an explicit argument (for callers that pass them
    into their jitted program, as the reward bench does). ``images``: quantised (..., H, W, 3)
    in [0, 1]; ``tokens``: (..., 2, L) rows of ``tokenize(prompts)`` (ids, attention mask).
    ``tokenizer``: a transformers ``CLIPTokenizer`` or a function ``prompts -> (P, 2, L)``.
    """
    method = check_preprocess(preprocess, NAME)
    if set(params) == {"params"}:
        params = params["params"]
    if "logit_scale" not in params:
        raise RewardError(f"reward {NAME!r}: the CLIP params have no logit_scale")
    length = min(MAX_LENGTH, module.config.text.max_position_embeddings)
    if callable(tokenizer) and not hasattr(tokenizer, "convert_tokens_to_ids"):
        tokenize = tokenizer
    else:
        check_vocab(tokenizer, module.config.text.vocab_size)
        tokenize = lambda prompts: token_table(tokenizer, prompts, length)

    def fn(weights: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
        img = l2_normalize(image_features(module, weights, images, method))
        lead = img.shape[:-1]
        tokens = jnp.broadcast_to(tokens, (*lead, *tokens.shape[-2:]))
        tokens = tokens.reshape((-1, *tokens.shape[-2:]))
        txt = module.apply(
            {"params": weights}, tokens[:, 0], tokens[:, 1], method=CLIPModel.get_text_features
        )
        txt = l2_normalize(txt).reshape(img.shape)
        scale = jnp.exp(jnp.asarray(weights["logit_scale"], jnp.float32))
        return scale * jnp.sum(img * txt, axis=-1)

    return fn, device_params(params), tokenize


# ---------------------------------------------------------------------------------------------
# Files and tokens


def model_folder(model: str | os.PathLike) -> Path:
    """Return a local folder of ``model``: itself, a cached copy of a bucket URL, or the hub's.

    Raises RewardError naming ``model`` when it is none of these or cannot be fetched.
    """
    from dag_jax.weights import diffusers as folder
    from dag_jax.weights.remote import is_url, local_copy

    text = str(model)
    if not text:
        raise RewardError(f"reward {NAME!r}: model is empty; pass a folder, URL or hub id")
    try:
        if is_url(text):
            return local_copy(text)
        return folder.resolve(model, parts=("",))  # weights at the folder's root
    except (OSError, ValueError) as err:
        raise RewardError(
            f"reward {NAME!r} could not find the model {text!r}: {err} (PickScore is the "
            f"transformers CLIPModel of the hub repo {DEFAULT_MODEL}; pass model=<its folder>)"
        ) from err


def load_tokenizer(tokenizer: str | os.PathLike, from_model: bool = False) -> Any:
    """Return the transformers ``CLIPTokenizer`` saved in the folder ``tokenizer``.

    ``from_model``: the folder is the model's own (the message then says to pass tokenizer=).
    """
    path = Path(tokenizer).expanduser()
    if not path.is_dir():
        raise RewardError(
            f"reward {NAME!r}: tokenizer folder {path} does not exist (pass a folder holding a "
            "transformers CLIPTokenizer: vocab.json + merges.txt or tokenizer.json)"
        )
    has_files = (path / "tokenizer.json").is_file() or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    )
    if not has_files:
        where = "the model folder" if from_model else "the tokenizer folder"
        raise RewardError(
            f"reward {NAME!r}: {where} {path} has no CLIP tokenizer (vocab.json + merges.txt "
            f"or tokenizer.json); pass tokenizer=<folder of {PROCESSOR_ID}'s tokenizer>"
        )
    try:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - any loader error means the same to the user
        raise RewardError(
            f"reward {NAME!r}: cannot load a CLIPTokenizer from {path}: {err}"
        ) from err


def check_vocab(tokenizer: Any, rows: int) -> None:
    """Raise RewardError when the tokenizer has more tokens than the text embedding has rows."""
    n = len(tokenizer)
    if n > rows:
        raise RewardError(
            f"reward {NAME!r}: the tokenizer has {n} tokens but the text tower's embedding has "
            f"{rows} rows (wrong tokenizer for this checkpoint?)"
        )
