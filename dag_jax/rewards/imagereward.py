"""ImageReward-v1.0 (SPEC §8) as a JAX-native reward: BLIP ViT-L/16 + BERT with cross-attention
+ linear head, in the graph.

    reward = dag_jax.rewards.get("imagereward", checkpoint="ImageReward.pt",
                                 med_config="med_config.json", tokenizer="bert-base-uncased/")
    scores = reward(images, prompts)          # (B, H, W, 3) float in [0, 1] → (B,) float32
    fn = reward.bind(prompt_list)             # JAX-native: jax.jit(fn)(images, prompt_idx)

score = (head(text_encoder(prompt tokens, cross-attending to vit(image))[CLS]) − 0.16717) / 1.03334

Pipeline, per image: quantise to the uint8 levels (``rewards.base.quantize``) → ImageReward's
torchvision transform in the graph (``imagereward_preprocess``: PIL bicubic resize of the short
side to 224, torchvision's centre crop, /255, CLIP mean/std) → the Linen ``ImageRewardModel``
(``models/blip.py``) → the standardisation of ``ImageReward.score`` (fp32). Per prompt: BERT
token ids and attention mask, padded/truncated to 35 tokens as the package does, built once per
prompt list on the host (``bind``: a (P, 2, 35) int32 table of ids and masks). The weights are
read once (``weights/imagereward.py``) and put on the default device as ``reward.params``;
``dtype`` is the towers' compute dtype (params fp32; LayerNorm, softmax, head and score fp32).

Findings on the ``image-reward`` PyPI package (1.5, the latest; checked with transformers 5.24,
torch 2.14.1, offline):

- It does **not import** with transformers 5. ``ImageReward/models/BLIP/med.py`` imports
  ``apply_chunking_to_forward``, ``find_pruneable_heads_and_indices`` and ``prune_linear_layer``
  from ``transformers.modeling_utils`` (gone; the first and last live in ``pytorch_utils``, the
  middle one no longer exists). Before that, ``import ImageReward`` already needs ``datasets``
  (``ReFL.py``, training code), the OpenAI ``clip`` package (``pip install openai-clip``: the
  PyPI project named ``clip`` is an unrelated CLI tool) and ``fairscale==0.4.13`` (an sdist that
  builds only with ``wheel`` present and ``--no-build-isolation``; ``vit.py`` imports its
  ``checkpoint_wrapper``), plus ``timm``'s deprecated ``timm.models.hub/layers/helpers`` paths
  (still there in timm 1.0.31, with warnings). Its declared pins (``timm==0.6.13``, ...) would
  downgrade packages this project uses.
- With those imports shimmed, building the model still fails on transformers 5:
  ``BertModel.__init__`` calls ``init_weights()`` (which now needs ``post_init``:
  ``all_tied_weights_keys`` missing), ``forward`` calls ``invert_attention_mask`` and
  ``get_head_mask`` (removed from ``PreTrainedModel``), and ``init_tokenizer`` reads
  ``tokenizer.additional_special_tokens_ids`` (removed from tokenizers).
- ``BertTokenizer.from_pretrained("bert-base-uncased")`` without network and without a cache
  does **not fail** under transformers 5: it returns a 5-token tokenizer that maps every word to
  ``[UNK]``, and the package would silently score garbage. ``BertTokenizer(vocab_file)`` does
  the same (its first argument is now an in-memory vocabulary); ``from_pretrained(<folder with
  vocab.txt>)`` works. This module loads folders that way and checks the vocabulary size.
- Loading downloads ``ImageReward.pt`` (fp32, ~450M parameters, ~1.8 GB) and
  ``med_config.json`` from the hub repo ``THUDM/ImageReward`` plus the ``bert-base-uncased``
  tokenizer; nothing else (the BLIP ``model_large.pth`` is only for the package's BLIPScore).
- ``ImageReward.score()`` already standardises with mean 0.16717362830052426 and std
  1.0333394966054072: its output *is* SPEC's standardised score (``standardize=False`` here
  gives the raw head output instead).

So the package is not used. Its math (``ImageReward.score``) was first rewritten in plain
PyTorch from the checkpoint's state dict and checked against the package itself (with the shims
above, random full-size weights: scores agree to ~1e-6); that rewrite is now the test oracle
(``tests/imagereward_torch.py``), and this module matches it on random full-size weights in fp32
(``tests/test_imagereward.py`` states the measured figures).

Files: ``checkpoint`` is ``ImageReward.pt`` (read with ``torch.load(weights_only=True)``: torch
is then needed to read the file only) or a ``.safetensors`` copy with the same keys
(``weights.imagereward.convert_checkpoint``), which needs no torch; None or "" fetches
``ImageReward.pt`` from the hub. ``med_config`` None or "" uses ImageReward's values.
``tokenizer`` is a folder with the ``bert-base-uncased`` tokenizer files (``vocab.txt``) or the
``vocab.txt`` itself; None or "" loads ``bert-base-uncased`` through transformers' cache or hub.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.models.blip import ImageRewardModel
from dag_jax.rewards.aesthetic import check_preprocess, device_params, parse_dtype
from dag_jax.rewards.base import Reward, RewardError, jax_reward, token_table
from dag_jax.rewards.clipscore import center_crop_offsets
from dag_jax.rewards.preprocess import CLIP_MEAN, CLIP_STD, normalize, resize_shortest_edge

MEAN = 0.16717362830052426
STD = 1.0333394966054072
MAX_LENGTH = 35  # prompt tokens, as ImageReward.score
IMAGE_MEAN = CLIP_MEAN
IMAGE_STD = CLIP_STD
HUB_REPO = "THUDM/ImageReward"
HUB_TOKENIZER = "bert-base-uncased"

Tokenize = Callable[[Sequence[str]], np.ndarray]


def imagereward(
    checkpoint: str | os.PathLike | None = None,
    med_config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "bfloat16",
    preprocess: str = "pil",
    standardize: bool = True,
) -> Reward:
    """Return the ImageReward-v1.0 reward (standardised as SPEC §8), JAX-native.

    ``checkpoint``: ``ImageReward.pt`` or its safetensors copy (None/"": the hub's);
    ``med_config``: ``med_config.json`` (None/"": ImageReward's values); ``tokenizer``: folder of
    the ``bert-base-uncased`` tokenizer or its ``vocab.txt`` (None/"": transformers' cache or
    hub); ``dtype``: the towers' compute dtype, "bfloat16" | "float32" | "float16";
    ``preprocess``: "pil" (exact PIL bicubic) or "jax" (``jax.image.resize``);
    ``standardize``: False gives the raw head output. Missing or bad files raise RewardError.
    """
    name = "imagereward"
    compute = parse_dtype(dtype, name)
    method = check_preprocess(preprocess, name)
    tok = load_tokenizer(tokenizer or None)  # first: it is cheap
    module, params = load_model(checkpoint or None, med_config or None, compute)
    check_vocab(tok, module.config.text.vocab_size)
    config = dict(
        checkpoint=None if not checkpoint else str(checkpoint),
        med_config=None if not med_config else str(med_config),
        tokenizer=None if not tokenizer else str(tokenizer),
        dtype=str(dtype),
        preprocess=method,
        standardize=bool(standardize),
    )
    return imagereward_reward(module, params, tok, method, standardize, config)


def imagereward_reward(
    module: ImageRewardModel,
    params: Any,
    tokenizer: Any,
    preprocess: str = "pil",
    standardize: bool = True,
    config: dict | None = None,
) -> Reward:
    """Return the ImageReward Reward of a built model (module + params) and tokenizer."""
    fn, weights, tokenize = imagereward_parts(module, params, tokenizer, preprocess, standardize)
    return jax_reward("imagereward", fn, tokenize, dict(config or {}), weights)


def imagereward_parts(
    module: ImageRewardModel,
    params: Any,
    tokenizer: Any,
    preprocess: str = "pil",
    standardize: bool = True,
) -> tuple[Callable, Any, Tokenize]:
    """Return (``fn(weights, images, tokens) -> (B,) scores``, weights on device, tokenize).

    The reward's score with its weights as an explicit argument (for callers that pass them
    into their jitted program, as the reward bench does). ``images``: quantised (..., H, W, 3)
    in [0, 1]; ``tokens``: (..., 2, 35) rows of ``tokenize(prompts)`` (ids, attention mask).
    ``tokenizer``: a transformers ``BertTokenizer`` or a function ``prompts -> (P, 2, L)``.
    """
    method = check_preprocess(preprocess, "imagereward")
    size = module.config.vision.image_size
    if callable(tokenizer) and not hasattr(tokenizer, "convert_tokens_to_ids"):
        tokenize = tokenizer
    else:
        length = min(MAX_LENGTH, module.config.text.max_position_embeddings)
        tokenize = lambda prompts: token_table(tokenizer, prompts, length)

    def fn(weights: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
        lead = images.shape[:-3]
        pixels = imagereward_preprocess(images.reshape((-1, *images.shape[-3:])), size, method)
        tokens = jnp.broadcast_to(tokens, (*lead, *tokens.shape[-2:])).reshape(
            (-1, *tokens.shape[-2:])
        )
        raw = module.apply({"params": weights}, pixels, tokens[:, 0], tokens[:, 1])
        return (standardise(raw) if standardize else raw).reshape(lead)

    return fn, device_params(params), tokenize


def standardise(raw: jax.Array) -> jax.Array:
    """Return ImageReward's standardised score (raw − 0.16717) / 1.03334 in float32."""
    return (jnp.asarray(raw, jnp.float32) - jnp.float32(MEAN)) / jnp.float32(STD)


def imagereward_preprocess(images: jax.Array, size: int = 224, method: str = "pil") -> jax.Array:
    """Return NHWC pixel values of (B, H, W, 3) images in [0, 1], as ImageReward's transform.

    ``Resize(size, BICUBIC)`` on the PIL image (short side to ``size``, long side truncated;
    ``method`` "pil": bit-exact PIL, "jax": float ``jax.image.resize``), torchvision's
    ``CenterCrop`` (offsets ``int(round((H − size) / 2))``), ``ToTensor``, CLIP mean/std.
    """
    x = resize_shortest_edge(images, size, method)
    top, left = center_crop_offsets(x.shape[1], x.shape[2], size)
    return normalize(x[:, top : top + size, left : left + size, :], IMAGE_MEAN, IMAGE_STD)


# ---------------------------------------------------------------------------------------------
# Files


def load_model(
    checkpoint: str | os.PathLike | None,
    med_config: str | os.PathLike | None,
    dtype: jnp.dtype,
) -> tuple[ImageRewardModel, dict]:
    """Return (ImageRewardModel, fp32 numpy params) of the files, or RewardError naming them."""
    from dag_jax.weights.imagereward import load_imagereward

    path = _checkpoint_path(checkpoint)
    if med_config is not None and not Path(med_config).expanduser().is_file():
        raise RewardError(
            f"ImageReward med_config {Path(med_config).expanduser()} not found (it is "
            f"med_config.json of the hub repo {HUB_REPO}; or pass med_config=None for "
            "ImageReward's values)"
        )
    try:
        module, params, _ = load_imagereward(path, med_config, dtype)
    except (OSError, ValueError) as err:  # FileNotFoundError, WeightsError, bad med_config
        raise RewardError(
            f"reward 'imagereward' could not load the ImageReward checkpoint {path}: {err}"
        ) from err
    return module, params


def _checkpoint_path(checkpoint: str | os.PathLike | None) -> Path:
    """Return the local checkpoint path, downloading ImageReward.pt from the hub when None."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise RewardError(
                f"ImageReward checkpoint {path} not found; download ImageReward.pt from "
                f"https://huggingface.co/{HUB_REPO} and pass checkpoint=<its path>"
            )
        return path
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(HUB_REPO, "ImageReward.pt"))
    except Exception as e:  # noqa: BLE001 - offline, missing package, HTTP errors alike
        raise RewardError(
            f"could not fetch ImageReward.pt from the hub repo {HUB_REPO} ({e}); download it "
            "and pass checkpoint=<its path>"
        ) from e


def load_tokenizer(tokenizer: str | os.PathLike | None = None) -> Any:
    """Return a BERT tokenizer: from a folder, a vocab.txt, or 'bert-base-uncased' when None."""
    try:
        from transformers import BertTokenizer
    except ImportError as e:
        raise RewardError("reward 'imagereward' needs transformers for its tokenizer") from e
    if tokenizer is None:
        try:
            return BertTokenizer.from_pretrained(HUB_TOKENIZER)
        except Exception as e:  # noqa: BLE001
            raise RewardError(
                f"could not load the {HUB_TOKENIZER!r} tokenizer ({e}); pass tokenizer=<folder "
                "with its vocab.txt>"
            ) from e
    path = Path(tokenizer).expanduser()
    if path.is_file() and path.name == "vocab.txt":
        path = path.parent
    if (path / "vocab.txt").is_file():
        # from_pretrained on the folder: BertTokenizer(vocab_file) silently builds an empty
        # vocabulary in transformers 5 (its first argument became an in-memory vocab).
        return BertTokenizer.from_pretrained(str(path))
    raise RewardError(
        f"ImageReward tokenizer {path} not found: pass a folder holding the {HUB_TOKENIZER} "
        "tokenizer (vocab.txt) or the vocab.txt itself"
    )


def check_vocab(tok: Any, rows: int) -> None:
    """Raise RewardError unless the tokenizer fits the text embedding (``rows`` tokens).

    ImageReward's embedding has the 30522 BERT tokens plus BLIP's [DEC] and [ENC]; a tokenizer
    with far fewer tokens is the wrong one (transformers 5 returns a 5-token BertTokenizer for
    'bert-base-uncased' when offline instead of failing).
    """
    n = int(tok.vocab_size)
    if not rows - 2 <= n <= rows:
        raise RewardError(
            f"the tokenizer has {n} tokens but ImageReward's text embedding has {rows} rows "
            f"(expected {rows - 2}: the {HUB_TOKENIZER} vocabulary); pass tokenizer=<folder with "
            f"the {HUB_TOKENIZER} vocab.txt>"
        )
