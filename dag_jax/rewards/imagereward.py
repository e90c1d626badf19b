"""ImageReward-v1.0 (SPEC §8): BLIP ViT-L/16 + BERT with cross-attention + linear head, host side.

score = (head(text_encoder(prompt tokens, cross-attending to vit(image))[CLS]) − 0.16717) / 1.03334

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

So this module does not use the package: it runs the same math as ``ImageReward.score`` in plain
PyTorch functions (no ``nn.Module`` classes, no ``transformers`` model classes) straight from
the checkpoint's state dict (its keys: ``blip.visual_encoder.*``, ``blip.text_encoder.*``,
``mlp.layers.*``), batched, with the tokenizer from ``transformers`` (``BertTokenizer``, prompts
padded/truncated to 35 tokens as in the package). Matching the package: ViT pre-norm blocks with
LayerNorm eps 1e-6 and exact GELU, 16 heads for ViT-L (head size 64); BERT post-norm layers with
eps 1e-12, self-attention masked by adding −10000 at padding, cross-attention to all image
tokens in every layer; the head is five Linear layers with no activation (dropout is off in
eval). Preprocessing as the package's torchvision pipeline: bicubic resize of the short side to
224 (PIL), centre crop, /255, CLIP mean/std. Checked against the package itself (with the
shims above, random full-size weights): scores agree to ~1e-6.

Requires ``torch`` and ``transformers`` (for the tokenizer); the files can be given as local
paths, else they are fetched from the hub (``THUDM/ImageReward``, ``bert-base-uncased``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from dag_jax.rewards.base import Reward, RewardError, host_reward

MEAN = 0.16717362830052426
STD = 1.0333394966054072
MAX_LENGTH = 35  # prompt tokens, as ImageReward.score
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
HUB_REPO = "THUDM/ImageReward"
HUB_TOKENIZER = "bert-base-uncased"
VIT_HEAD_DIM = 64  # BLIP ViT-B/16 and ViT-L/16 both use 64-wide heads (12 and 16 heads)
# The text-encoder settings of ImageReward's med_config.json that the weights' shapes don't tell.
MED_DEFAULTS = {"num_attention_heads": 12, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}


def imagereward(
    checkpoint: str | os.PathLike | None = None,
    med_config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    standardize: bool = True,
) -> Reward:
    """Return the ImageReward-v1.0 reward (standardised as SPEC §8), run on the host in PyTorch.

    ``checkpoint``: local ``ImageReward.pt`` (or a ``.safetensors`` with the same keys); None
    downloads it from the hub repo ``THUDM/ImageReward``. ``med_config``: local
    ``med_config.json`` of the text encoder; None uses ImageReward's values (12 heads, eps 1e-12,
    GELU; sizes always come from the weights). ``tokenizer``: a folder holding the
    ``bert-base-uncased`` tokenizer files or its ``vocab.txt``; None loads ``bert-base-uncased``
    through transformers (cache or hub). ``batch_size`` images go through the model at a time
    on ``device``. Missing packages or files raise RewardError saying what is needed.
    """
    torch = _import_torch()
    if batch_size < 1:
        raise RewardError(f"imagereward batch_size must be >= 1, got {batch_size}")
    params = load_params(checkpoint, device)
    text_cfg = _text_config(med_config)
    tok = load_tokenizer(tokenizer)
    _check_vocab(tok, params["text_encoder.embeddings.word_embeddings.weight"].shape[0])
    image_size = vit_image_size(params)

    def fn(images: np.ndarray, prompts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(prompts), batch_size):
            pixels = preprocess(images[start : start + batch_size], image_size)
            tokens = tok(
                list(prompts[start : start + batch_size]),
                padding="max_length",
                truncation=True,
                max_length=MAX_LENGTH,
                return_tensors="pt",
            )
            with torch.no_grad():
                raw = score_raw(
                    params,
                    torch.as_tensor(pixels, device=device),
                    tokens["input_ids"].to(device),
                    tokens["attention_mask"].to(device),
                    text_cfg,
                )
            out.append(raw.float().cpu().numpy())
        raw = np.concatenate(out) if out else np.zeros((0,), np.float32)
        return standardise(raw) if standardize else raw

    config = dict(
        checkpoint=None if checkpoint is None else str(checkpoint),
        med_config=None if med_config is None else str(med_config),
        tokenizer=None if tokenizer is None else str(tokenizer),
        device=device,
        batch_size=batch_size,
        standardize=standardize,
    )
    return host_reward("imagereward", fn, config)


def standardise(raw: np.ndarray) -> np.ndarray:
    """Return ImageReward's standardised score (raw − 0.16717) / 1.03334 as float32."""
    return ((np.asarray(raw, np.float64) - MEAN) / STD).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Files


def _import_torch():
    """Return the torch module, or raise RewardError saying it is needed."""
    try:
        import torch
    except ImportError as e:
        raise RewardError(
            "reward 'imagereward' runs in PyTorch on the host: install torch (CPU is enough) "
            "and transformers"
        ) from e
    return torch


def load_params(checkpoint: str | os.PathLike | None, device: str = "cpu") -> dict:
    """Return the ImageReward weights as {name without 'blip.': float32 tensor on ``device``}.

    Raises RewardError for a missing file, an unreadable one, or missing weights.
    """
    torch = _import_torch()
    path = _checkpoint_path(checkpoint)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader error means the same to the user
        raise RewardError(f"could not read the ImageReward checkpoint {path}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RewardError(f"ImageReward checkpoint {path} is not a state dict")
    params = {
        k.removeprefix("blip."): v.to(device=device, dtype=torch.float32)
        for k, v in state.items()
        if hasattr(v, "dtype") and v.dtype.is_floating_point
    }
    missing = [k for k in _required_keys(params) if k not in params]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise RewardError(
            f"ImageReward checkpoint {path} lacks {len(missing)} weight(s): {shown} "
            "(expected the state dict of ImageReward-v1.0: blip.visual_encoder.*, "
            "blip.text_encoder.*, mlp.layers.*)"
        )
    return params


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


def _text_config(med_config: str | os.PathLike | None) -> dict:
    """Return the text-encoder settings (heads, LayerNorm eps, activation) from med_config."""
    if med_config is None:
        return dict(MED_DEFAULTS)
    path = Path(med_config).expanduser()
    if not path.is_file():
        raise RewardError(
            f"ImageReward med_config {path} not found (it is med_config.json of the hub repo "
            f"{HUB_REPO}; or pass med_config=None for ImageReward's values)"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RewardError(f"could not read ImageReward med_config {path}: {e}") from e
    out = {k: cfg.get(k, v) for k, v in MED_DEFAULTS.items()}
    if out["hidden_act"] not in ("gelu", "gelu_new", "relu"):
        raise RewardError(f"med_config {path}: unsupported hidden_act {out['hidden_act']!r}")
    return out


def load_tokenizer(tokenizer: str | os.PathLike | None = None):
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


def _check_vocab(tok, rows: int) -> None:
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


def _required_keys(params: dict) -> list[str]:
    """Return the weight names the forward pass reads, given the layer counts in ``params``."""
    vit, bert = (
        _count("visual_encoder.blocks.", params),
        _count("text_encoder.encoder.layer.", params),
    )
    keys = ["visual_encoder.cls_token", "visual_encoder.pos_embed"]
    keys += [f"visual_encoder.{n}.{w}" for n in ("patch_embed.proj", "norm") for w in _WB]
    for i in range(max(vit, 1)):
        names = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        keys += [f"visual_encoder.blocks.{i}.{n}.{w}" for n in names for w in _WB]
    e = "text_encoder.embeddings."
    keys += [e + "word_embeddings.weight", e + "position_embeddings.weight"]
    keys += [e + "LayerNorm." + w for w in _WB]
    for i in range(max(bert, 1)):
        layer = f"text_encoder.encoder.layer.{i}."
        for att in ("attention", "crossattention"):
            names = ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
            keys += [f"{layer}{att}.{n}.{w}" for n in names for w in _WB]
        names = ("intermediate.dense", "output.dense", "output.LayerNorm")
        keys += [f"{layer}{n}.{w}" for n in names for w in _WB]
    keys += [f"mlp.layers.{i}.{w}" for i in (_mlp_layers(params) or [0]) for w in _WB]
    return keys


_WB = ("weight", "bias")


def _count(prefix: str, params: dict) -> int:
    """Return how many numbered sub-blocks ``prefix<i>.`` the weights hold."""
    ids = {k[len(prefix) :].split(".")[0] for k in params if k.startswith(prefix)}
    return len([i for i in ids if i.isdigit()])


def _mlp_layers(params: dict) -> list[int]:
    """Return the indices of the head's Linear layers (``mlp.layers.<i>``) in order."""
    ids = {int(k.split(".")[2]) for k in params if k.startswith("mlp.layers.")}
    return sorted(ids)


# ---------------------------------------------------------------------------------------------
# Preprocessing (the package's torchvision transform, done with PIL and NumPy)


def vit_image_size(params: dict) -> int:
    """Return the ViT input size implied by its position embedding and patch size."""
    tokens = params["visual_encoder.pos_embed"].shape[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise RewardError(f"ImageReward ViT position embedding has {tokens} patches: not square")
    return grid * params["visual_encoder.patch_embed.proj.weight"].shape[-1]


def preprocess(images: np.ndarray, size: int = 224) -> np.ndarray:
    """Return (B, 3, size, size) float32 model inputs from uint8 (B, H, W, 3) images.

    Same as ImageReward's ``Resize(size, BICUBIC)`` (PIL, short side to ``size``, long side
    truncated), ``CenterCrop(size)``, ``ToTensor()``, ``Normalize(CLIP mean, std)``.
    """
    mean = np.asarray(IMAGE_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGE_STD, np.float32)[:, None, None]
    out = []
    for image in images:
        x = np.asarray(_resize_crop(Image.fromarray(np.asarray(image, np.uint8)), size))
        x = x.astype(np.float32).transpose(2, 0, 1) / 255.0
        out.append((x - mean) / std)
    return np.stack(out).astype(np.float32) if out else np.zeros((0, 3, size, size), np.float32)


def _resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` (bicubic) and centre-crop to ``size`` x ``size``."""
    w, h = image.size
    if (w <= h and w != size) or (h < w and h != size):
        if w <= h:
            w, h = size, int(size * h / w)
        else:
            w, h = int(size * w / h), size
        image = image.resize((w, h), Image.BICUBIC)
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------------------------
# The model, as functions of the state dict


def score_raw(params: dict, pixels, input_ids, attention_mask, text_cfg: dict | None = None):
    """Return the unstandardised ImageReward scores (B,) of preprocessed images and tokens."""
    cfg = dict(MED_DEFAULTS, **(text_cfg or {}))
    image_embeds = vit_forward(params, pixels)
    text = bert_forward(params, input_ids, attention_mask, image_embeds, cfg)
    x = text[:, 0, :]
    for i in _mlp_layers(params):
        x = _linear(x, params, f"mlp.layers.{i}")
    return x[:, 0]


def vit_forward(params: dict, pixels):
    """Return BLIP's ViT features (B, 1 + patches, D) of (B, 3, S, S) normalised images."""
    import torch
    import torch.nn.functional as F

    p = "visual_encoder."
    weight = params[p + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, weight, params[p + "patch_embed.proj.bias"], stride=weight.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = params[p + "cls_token"].expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + params[p + "pos_embed"][:, : x.shape[1]]
    dim = x.shape[-1]
    heads = max(dim // VIT_HEAD_DIM, 1)
    for i in range(_count(p + "blocks.", params)):
        b = f"{p}blocks.{i}."
        h = _layer_norm(x, params, b + "norm1", 1e-6)
        x = x + _linear(
            _vit_attention(_linear(h, params, b + "attn.qkv"), heads), params, b + "attn.proj"
        )
        h = _layer_norm(x, params, b + "norm2", 1e-6)
        h = _linear(F.gelu(_linear(h, params, b + "mlp.fc1")), params, b + "mlp.fc2")
        x = x + h
    return _layer_norm(x, params, p + "norm", 1e-6)


def _vit_attention(qkv, heads: int):
    """Return softmax(q kᵀ / √d) v of fused (B, N, 3D) projections, merged back to (B, N, D)."""
    b, n, three_d = qkv.shape
    d = three_d // 3
    q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(b, n, d)


def bert_forward(params: dict, input_ids, attention_mask, image_embeds, cfg: dict):
    """Return the text encoder's last hidden states (B, L, H), cross-attending to the image."""
    import torch

    p = "text_encoder."
    eps = float(cfg["layer_norm_eps"])
    heads = int(cfg["num_attention_heads"])
    length = input_ids.shape[1]
    x = params[p + "embeddings.word_embeddings.weight"][input_ids]
    x = x + params[p + "embeddings.position_embeddings.weight"][:length][None]
    x = _layer_norm(x, params, p + "embeddings.LayerNorm", eps)
    mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
    act = _activation(cfg["hidden_act"])
    for i in range(_count(p + "encoder.layer.", params)):
        b = f"{p}encoder.layer.{i}."
        a = _bert_attention(params, b + "attention.self.", x, x, mask, heads)
        x = _layer_norm(
            _linear(a, params, b + "attention.output.dense") + x,
            params,
            b + "attention.output.LayerNorm",
            eps,
        )
        a = _bert_attention(params, b + "crossattention.self.", x, image_embeds, None, heads)
        x = _layer_norm(
            _linear(a, params, b + "crossattention.output.dense") + x,
            params,
            b + "crossattention.output.LayerNorm",
            eps,
        )
        h = act(_linear(x, params, b + "intermediate.dense"))
        x = _layer_norm(
            _linear(h, params, b + "output.dense") + x, params, b + "output.LayerNorm", eps
        )
    return x


def _bert_attention(params: dict, prefix: str, x, context, mask, heads: int):
    """Return BERT multi-head attention of ``x`` over ``context`` (additive ``mask`` or None)."""
    q = _split_heads(_linear(x, params, prefix + "query"), heads)
    k = _split_heads(_linear(context, params, prefix + "key"), heads)
    v = _split_heads(_linear(context, params, prefix + "value"), heads)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    out = scores.softmax(dim=-1) @ v
    b, _, n, _ = out.shape
    return out.permute(0, 2, 1, 3).reshape(b, n, -1)


def _split_heads(x, heads: int):
    """Return (B, N, H*d) as (B, H, N, d)."""
    b, n, width = x.shape
    return x.reshape(b, n, heads, width // heads).permute(0, 2, 1, 3)


def _linear(x, params: dict, name: str):
    """Apply the Linear layer ``name`` (its ``.weight`` and ``.bias``)."""
    import torch.nn.functional as F

    return F.linear(x, params[name + ".weight"], params[name + ".bias"])


def _layer_norm(x, params: dict, name: str, eps: float):
    """Apply the LayerNorm ``name`` over the last axis."""
    import torch.nn.functional as F

    weight = params[name + ".weight"]
    return F.layer_norm(x, weight.shape, weight, params[name + ".bias"], eps)


def _activation(name: str):
    """Return the torch function of a BERT ``hidden_act``."""
    import torch.nn.functional as F

    if name == "gelu":
        return F.gelu
    if name == "gelu_new":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.relu
