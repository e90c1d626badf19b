"""OpenCLIP prompt-image similarity rewards (SPEC §8): ``clipscore`` and ``hpsv2``.

    reward = dag_jax.rewards.get("clipscore", checkpoint="open_clip_pytorch_model.bin")
    reward = dag_jax.rewards.get("hpsv2", checkpoint="HPS_v2.1_compressed.pt")
    scores = reward(images, prompts)          # (B, H, W, 3) float in [0, 1] → (B,) float32
    fn = reward.bind(prompt_list)             # JAX-native: jax.jit(fn)(images, prompt_idx)

Both score an image against its prompt by the cosine of the L2-normalised OpenCLIP image and
text embeddings (``encode_image`` / ``encode_text``), in [−1, 1], with no scaling:

- ``clipscore``: OpenCLIP ViT-H-14 (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). SPEC §8 defines
  it as the plain cosine: neither CLIPScore's ``2.5·max(cos, 0)`` (Hessel et al.) nor the
  ``logit_scale``·cos (×100) of CLIP logits.
- ``hpsv2``: the same tower fine-tuned by HPS v2 / v2.1 (``HPS_v2_compressed.pt`` /
  ``HPS_v2.1_compressed.pt`` of the hub repo ``xswu/HPSv2``). The reference (``hpsv2``
  package, ``img_score.score``) takes ``diagonal(image_features @ text_features.T)`` of the
  model's ``output_dict`` features, which OpenCLIP's ``CLIP.forward`` has already normalised:
  the plain cosine too (no ``logit_scale``; checked in tgxs002/HPSv2 ``hpsv2/img_score.py``).
  The reference runs under ``torch.cuda.amp.autocast`` (fp16 on GPU); here the default compute
  is fp32 (``dtype="bfloat16"``/``"float16"`` are available). ``version`` only names the file
  in messages and in the config: v2.0 and v2.1 share the architecture.

Pipeline, per image: quantise to uint8 levels → OpenCLIP's eval transform in the graph
(``open_clip_preprocess``) → ``CLIPModel.get_image_features``; per prompt: OpenCLIP token ids
(host, at ``bind``: a (P, 77) int32 table) → ``get_text_features`` (causal, no padding mask,
pooled at argmax id = EOT) inside the jitted score, for each image's row of the table.

Preprocessing. The installed open_clip (3.3) gives ViT-H-14's pretrained configs
(``laion2b_s32b_b79k``) ``mean``/``std`` = the OpenAI CLIP constants (0.48145466, 0.4578275,
0.40821073) / (0.26862954, 0.26130258, 0.27577711), ``interpolation="bicubic"``,
``resize_mode="shortest"``, 224 px; its ``image_transform(224, is_train=False)`` is torchvision
``Resize(224, BICUBIC)`` (on a PIL image: PIL's bicubic, short side to 224, long side
``int(224·long/short)``) → ``CenterCrop(224)`` → ``ToTensor`` → ``Normalize``. HPS v2's bundled
open_clip fork has the same eval transform. That is ``clip_preprocess`` (``rewards/preprocess``)
except for one detail: torchvision's center crop starts at ``int(round((H − 224) / 2))``
(Python's round: half to even) where transformers' (and ``clip_preprocess``'s) starts at
``(H − 224) // 2``; they differ by one pixel when ``H − 224 ≡ 3 (mod 4)``. So
``open_clip_preprocess`` reuses the resize and normalisation of ``rewards.preprocess`` with
torchvision's crop offsets. Square images (every Stable Diffusion sample) need no crop at all.
The size is the vision tower's ``image_size``.

Tokenizer. OpenCLIP's ``SimpleTokenizer`` (the OpenAI CLIP byte-level BPE of
``bpe_simple_vocab_16e6.txt.gz``): text cleaned with ``ftfy.fix_text``, ``html.unescape``
twice, whitespace squeezed, lower-cased; ``<start_of_text>`` + ids + ``<end_of_text>``,
truncated to 77 with EOT last, padded with 0. Here a transformers ``CLIPTokenizer`` does the
BPE (built at construction from the BPE file shipped inside the installed ``open_clip``
package, found without importing it, or loaded from a ``CLIPTokenizer`` folder), the same
cleaning is applied first (``clean_text``; without ``ftfy`` installed only its ``fix_text``
step is skipped), and ``weights.open_clip.open_clip_token_ids`` lays out the ids. The tests
check the ids against ``open_clip.get_tokenizer("ViT-H-14")``. One known difference: a prompt
containing the literal text ``<|endoftext|>`` is split into characters by OpenCLIP but is a
special token to transformers (``open_clip_token_ids`` then raises ValueError).

Weights are loaded once at construction (``weights.open_clip.load_open_clip``: ``.safetensors``,
``.bin`` or ``.pt``, a ``{"state_dict": ...}`` training checkpoint unwrapped) and put on the
default device as ``reward.params``: a compiled step passes them as an argument through
``reward.bound_with_params`` (closed-over weights become multi-GB program constants; see
``rewards/aesthetic.py``).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import os
import re
from collections.abc import Callable, Mapping, Sequence
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
    parse_dtype,
)
from dag_jax.rewards.base import Reward, RewardError, jax_reward
from dag_jax.rewards.preprocess import normalize, resize_shortest_edge

CLIPSCORE_SOURCE = (
    "open_clip_pytorch_model.bin (or open_clip_model.safetensors) of "
    "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
)
HPS_REPO = "https://huggingface.co/xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# OpenCLIP's SimpleTokenizer: the merges are lines 1 .. 49152 − 256 − 2 of the BPE file.
N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

Tokenize = Callable[[Sequence[str]], np.ndarray]


def clipscore(
    checkpoint: str | os.PathLike | None = None,
    model_config: str | os.PathLike | Mapping[str, Any] = "ViT-H-14",
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "float32",
    preprocess: str = "pil",
) -> Reward:
    """Return the CLIPScore reward: cosine of OpenCLIP ViT-H-14 image and prompt embeddings.

    ``checkpoint``: the OpenCLIP weights (``.bin``/``.pt``/``.safetensors``; required);
    ``model_config``: OpenCLIP architecture name, JSON path or dict (``weights.open_clip``);
    ``tokenizer``: a transformers ``CLIPTokenizer`` folder, or None for the BPE file inside the
    installed ``open_clip`` package; ``dtype``: compute dtype; ``preprocess``: "pil" | "jax".
    """
    if checkpoint is None:
        raise RewardError(
            "reward 'clipscore' needs checkpoint=<path of the OpenCLIP ViT-H-14 weights>: "
            f"download {CLIPSCORE_SOURCE} and pass its path"
        )
    return _build("clipscore", checkpoint, model_config, tokenizer, dtype, preprocess, {})


def hpsv2(
    checkpoint: str | os.PathLike | None = None,
    version: str = "v2.1",
    model_config: str | os.PathLike | Mapping[str, Any] = "ViT-H-14",
    tokenizer: str | os.PathLike | None = None,
    dtype: str = "float32",
    preprocess: str = "pil",
) -> Reward:
    """Return the HPS v2 / v2.1 reward: cosine of the fine-tuned ViT-H-14's embeddings.

    ``checkpoint``: ``HPS_v2.1_compressed.pt`` (``version="v2.1"``) or ``HPS_v2_compressed.pt``
    (``"v2.0"``) from the hub repo ``xswu/HPSv2`` (required; the weights sit under its
    ``"state_dict"`` key); other options as ``clipscore``.
    """
    if version not in HPS_FILES:
        raise RewardError(
            f"reward 'hpsv2': version must be one of {sorted(HPS_FILES)}, got {version!r}"
        )
    if checkpoint is None:
        raise RewardError(
            f"reward 'hpsv2' needs checkpoint=<path of {HPS_FILES[version]}>: download it from "
            f"{HPS_REPO} (HPS {version}) and pass its path"
        )
    extra = {"version": version}
    return _build("hpsv2", checkpoint, model_config, tokenizer, dtype, preprocess, extra)


def tiny_clipscore(
    clip: str | os.PathLike | None = None, dtype: str = "float32", preprocess: str = "pil"
) -> Reward:
    """Return the tiny world's prompt-alignment reward: cosine of the tiny CLIP's embeddings.

    ``clip``: a transformers CLIPModel folder with its tokenizer (default: the built-in tiny
    CLIP, ``dag_jax.tinyworld.assets.TINY_CLIP``, trained by ``python -m dag_jax.tinyworld``). Same
    score as ``clipscore``, with transformers' ``CLIPModel`` layout instead of OpenCLIP's.
    """
    from dag_jax.tinyworld.assets import TINY_CLIP
    from dag_jax.weights.clip_loader import load_clip

    name = "tiny_clipscore"
    path = Path(clip).expanduser() if clip is not None else TINY_CLIP
    if not (path / "config.json").is_file():
        raise RewardError(
            f"reward {name!r}: no CLIP folder at {path} (the built-in one is written by "
            "`python -m dag_jax.tinyworld`)"
        )
    compute = parse_dtype(dtype, name)
    method = check_preprocess(preprocess, name)
    tok = load_tokenizer(path, name)
    module, params, _ = load_clip(path, compute)
    config = dict(clip=str(path), dtype=str(dtype), preprocess=method)
    return clip_similarity_reward(name, module, params, tok, method, config)


def _build(
    name: str,
    checkpoint: str | os.PathLike,
    model_config: str | os.PathLike | Mapping[str, Any],
    tokenizer: str | os.PathLike | None,
    dtype: str,
    preprocess: str,
    extra: dict,
) -> Reward:
    """Return the similarity reward ``name`` loaded from files (tokenizer first: it is cheap)."""
    compute = parse_dtype(dtype, name)
    method = check_preprocess(preprocess, name)
    tok = load_tokenizer(tokenizer, name)
    module, params = load_open_clip_model(checkpoint, model_config, compute, name)
    config = dict(
        checkpoint=str(checkpoint),
        **extra,
        model_config=dict(model_config) if isinstance(model_config, Mapping) else str(model_config),
        tokenizer=None if tokenizer is None else str(tokenizer),
        dtype=str(dtype),
        preprocess=method,
    )
    return clip_similarity_reward(name, module, params, tok, method, config)


def clip_similarity_reward(
    name: str,
    module: CLIPModel,
    params: Mapping[str, Any],
    tokenizer: Any,
    preprocess: str = "pil",
    config: dict | None = None,
) -> Reward:
    """Return a Reward scoring cos(image embedding, prompt embedding) with a built CLIP.

    The building block of ``clipscore``/``hpsv2`` (which load the files). ``tokenizer`` is a
    transformers ``CLIPTokenizer`` (see ``load_tokenizer``) or a function ``prompts ->
    (P, context_length) int ids``.
    """
    fn, weights, tokenize = similarity_parts(name, module, params, tokenizer, preprocess)
    return jax_reward(name, fn, tokenize=tokenize, config=dict(config or {}), params=weights)


def similarity_parts(
    name: str,
    module: CLIPModel,
    params: Mapping[str, Any],
    tokenizer: Any,
    preprocess: str = "pil",
) -> tuple[Callable, Any, Tokenize]:
    """Return (``fn(weights, images, tokens) -> (B,) cosines``, weights on device, tokenize).

    The reward's score with its weights as an explicit argument, for callers that pass the
    weights into their jitted program instead of closing over them (the reward bench).
    ``images``: quantised (B, H, W, 3) in [0, 1]; ``tokens``: (B, L) ids from ``tokenize``.
    """
    method = check_preprocess(preprocess, name)
    length = module.config.text.max_position_embeddings
    vocab = module.config.text.vocab_size
    if callable(tokenizer) and not hasattr(tokenizer, "convert_tokens_to_ids"):
        tokenize = tokenizer
    else:
        if len(tokenizer) > vocab:
            raise RewardError(
                f"reward {name!r}: the tokenizer has {len(tokenizer)} tokens but the text tower's "
                f"embedding has {vocab} rows (wrong tokenizer for this checkpoint?)"
            )
        tokenize = lambda prompts: token_ids(tokenizer, prompts, length)

    def fn(weights: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
        img = l2_normalize(image_features(module, weights, images, method, open_clip_preprocess))
        flat = tokens.reshape((-1, tokens.shape[-1]))
        txt = module.apply({"params": weights}, flat, method=CLIPModel.get_text_features)
        txt = l2_normalize(txt.astype(jnp.float32)).reshape(img.shape)
        return jnp.sum(img * txt, axis=-1)

    return fn, device_params(params), tokenize


def load_open_clip_model(
    checkpoint: str | os.PathLike,
    model_config: str | os.PathLike | Mapping[str, Any],
    dtype: jnp.dtype,
    name: str,
) -> tuple[CLIPModel, dict]:
    """Return (Linen CLIPModel, fp32 numpy params) of an OpenCLIP checkpoint, or RewardError."""
    from dag_jax.weights.open_clip import load_open_clip

    try:
        module, params, _ = load_open_clip(checkpoint, model_config, dtype)
    except (OSError, ValueError) as err:  # FileNotFoundError, WeightsError, bad model config
        raise RewardError(
            f"reward {name!r} could not load the OpenCLIP checkpoint {str(checkpoint)!r}: {err}"
        ) from err
    return module, params


# ---------------------------------------------------------------------------------------------
# Preprocessing: OpenCLIP's eval transform


def center_crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """Return torchvision ``CenterCrop``'s (top, left): ``int(round((H − size) / 2))``.

    Python's ``round`` rounds half to even, as torchvision's does.
    """
    if size > height or size > width:
        raise ValueError(f"crop {size}x{size} is larger than the image {height}x{width}")
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def open_clip_preprocess(images: jax.Array, size: int = 224, method: str = "pil") -> jax.Array:
    """Return NCHW pixel values of (B, H, W, 3) images in [0, 1] as OpenCLIP's eval transform.

    Shortest-edge bicubic resize to ``size`` (``method`` "pil": exact PIL; "jax": float),
    torchvision's center crop, OpenAI CLIP mean/std. Jit-able (shapes are static).
    """
    x = resize_shortest_edge(images, size, method)
    top, left = center_crop_offsets(x.shape[1], x.shape[2], size)
    x = normalize(x[:, top : top + size, left : left + size, :])
    return jnp.transpose(x, (0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# Tokenizer


def clean_text(text: str) -> str:
    """Return ``text`` cleaned as OpenCLIP's tokenizer does (its default ``clean="lower"``).

    ``ftfy.fix_text`` (skipped when ftfy is not installed), ``html.unescape`` twice, strip,
    whitespace runs → one space, lower case.
    """
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def token_ids(tokenizer: Any, prompts: Sequence[str], context_length: int = 77) -> np.ndarray:
    """Return (P, context_length) int32 OpenCLIP token ids of the cleaned prompts."""
    from dag_jax.weights.open_clip import open_clip_token_ids

    cleaned = [clean_text(p) for p in prompts]
    try:
        return open_clip_token_ids(tokenizer, cleaned, context_length)
    except ValueError as err:
        raise RewardError(f"cannot tokenize the prompts OpenCLIP's way: {err}") from err


def open_clip_bpe_path() -> Path | None:
    """Return the BPE file inside the installed ``open_clip`` package (not imported), or None."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / BPE_FILE
    return path if path.is_file() else None


def bytes_to_unicode() -> dict[int, str]:
    """Return the byte → printable character map of the OpenAI/GPT-2 byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def bpe_tokenizer(path: str | os.PathLike):
    """Return a transformers ``CLIPTokenizer`` with the vocab and merges of OpenCLIP's BPE file.

    The vocab is built as OpenCLIP's ``SimpleTokenizer`` builds it: the 256 byte characters,
    the same with ``</w>``, one entry per merge, then BOS (49406) and EOS (49407).
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise RewardError(f"cannot read the OpenCLIP BPE file {path}: {err}") from err
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise RewardError(f"{path} is not OpenCLIP's {BPE_FILE} ({len(merges)} merges)")
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


def load_tokenizer(tokenizer: str | os.PathLike | None = None, name: str = "clipscore"):
    """Return a transformers ``CLIPTokenizer`` with OpenAI's CLIP BPE, built on the host.

    ``tokenizer``: a folder holding a ``CLIPTokenizer`` (e.g. of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` or ``openai/clip-vit-large-patch14``); None: the
    BPE file inside the installed ``open_clip`` package. Raises RewardError saying what to pass.
    """
    if tokenizer is None:
        bpe = open_clip_bpe_path()
        if bpe is None:
            raise RewardError(
                f"reward {name!r} needs a tokenizer: pass tokenizer=<folder of a transformers "
                "CLIPTokenizer> (e.g. of laion/CLIP-ViT-H-14-laion2B-s32B-b79K) or install "
                f"open_clip_torch, whose {BPE_FILE} is used by default"
            )
        return bpe_tokenizer(bpe)
    path = Path(tokenizer).expanduser()
    if not path.is_dir():
        raise RewardError(
            f"reward {name!r}: tokenizer folder {path} does not exist (pass a folder holding a "
            "transformers CLIPTokenizer: vocab.json + merges.txt or tokenizer.json)"
        )
    try:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - any loader error means the same to the user
        raise RewardError(
            f"reward {name!r}: cannot load a CLIPTokenizer from {path}: {err}"
        ) from err
