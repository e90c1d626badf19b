"""PyTorch oracle of ImageReward-v1.0 for the tests: ``ImageReward.score`` in plain functions.

This was the runtime reward until the Linen model (``dag_jax/models/blip.py``) replaced it. It
runs the math of the ``image-reward`` package's ``ImageReward.score`` straight from the
checkpoint's state dict (no ``nn.Module`` classes, no transformers model classes) and was
checked against the package itself (with its transformers-5 import problems shimmed, random
full-size weights): scores agree to ~1e-6. ViT pre-norm blocks with LayerNorm eps 1e-6 and
exact GELU, heads of 64; BERT post-norm layers (eps and heads from ``text_cfg``), self-attention
masked by adding −10000 at padding, cross-attention to all image tokens in every layer; the head
is five Linear layers with no activation. Preprocessing is the package's torchvision pipeline
on PIL: bicubic resize of the short side, centre crop, /255, CLIP mean/std.

Also builds random ImageReward state dicts (torch tensors, the ``ImageReward.pt`` keys) at any
size, and renames them for transformers' ``BlipVisionModel`` / ``BlipTextModel``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = 0.16717362830052426
STD = 1.0333394966054072
MAX_LENGTH = 35
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_HEAD_DIM = 64
MED_DEFAULTS = {"num_attention_heads": 12, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
HEAD_INDICES = (0, 2, 4, 6, 7)

# ImageReward-v1.0: BLIP ViT-L/16 at 224 px + BERT-base (30522 + [DEC], [ENC] tokens) + head.
FULL_SIZES = dict(
    vit_width=1024,
    vit_layers=24,
    image_size=224,
    patch_size=16,
    bert_width=768,
    bert_layers=12,
    bert_heads=12,
    bert_intermediate=3072,
    max_positions=512,
    vocab_rows=30524,
    head=(768, 1024, 128, 64, 16, 1),
)
# The same architecture, small: 2 ViT layers of one 64-wide head, 32 px, a 2-layer BERT.
SMALL_SIZES = dict(
    vit_width=64,
    vit_layers=2,
    image_size=32,
    patch_size=16,
    bert_width=32,
    bert_layers=2,
    bert_heads=2,
    bert_intermediate=48,
    max_positions=40,
    vocab_rows=None,  # the tokenizer's size + 2, set by the caller
    head=(32, 24, 16, 8, 4, 1),
)

# ImageReward (timm-style BLIP ViT) names -> transformers BlipVisionModel names.
_VISION_TO_HF = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj", "embeddings.patch_embedding"),
    ("blocks.", "encoder.layers."),
    ("attn.qkv", "self_attn.qkv"),
    ("attn.proj", "self_attn.projection"),
    ("norm1", "layer_norm1"),
    ("norm2", "layer_norm2"),
)


def random_state_dict(sizes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return a random ImageReward state dict (``ImageReward.pt`` keys) of the given sizes.

    Weights are N(0, 1/fan_in) (so activations keep their scale through the towers and the head
    gives O(1) scores), biases and LayerNorm shifts N(0, 0.1²), LayerNorm scales 1 + N(0, 0.1²),
    embeddings N(0, 0.02²). Holds BLIP's unused ``vision_proj``/``text_proj`` and the
    ``position_ids`` buffer, as the real file does.
    """
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def linear(name: str, out_f: int, in_f: int) -> None:
        state[name + ".weight"] = randn(out_f, in_f, std=in_f**-0.5)
        state[name + ".bias"] = randn(out_f, std=0.1)

    def norm(name: str, width: int) -> None:
        state[name + ".weight"] = 1.0 + randn(width, std=0.1)
        state[name + ".bias"] = randn(width, std=0.1)

    d, p, s = sizes["vit_width"], sizes["patch_size"], sizes["image_size"]
    v = "blip.visual_encoder."
    state[v + "cls_token"] = randn(1, 1, d, std=0.02)
    state[v + "pos_embed"] = randn(1, (s // p) ** 2 + 1, d, std=0.02)
    state[v + "patch_embed.proj.weight"] = randn(d, 3, p, p, std=(3 * p * p) ** -0.5)
    state[v + "patch_embed.proj.bias"] = randn(d, std=0.1)
    for i in range(sizes["vit_layers"]):
        b = f"{v}blocks.{i}."
        norm(b + "norm1", d)
        linear(b + "attn.qkv", 3 * d, d)
        linear(b + "attn.proj", d, d)
        norm(b + "norm2", d)
        linear(b + "mlp.fc1", 4 * d, d)
        linear(b + "mlp.fc2", d, 4 * d)
    norm(v + "norm", d)
    h, inter = sizes["bert_width"], sizes["bert_intermediate"]
    t = "blip.text_encoder."
    state[t + "embeddings.word_embeddings.weight"] = randn(sizes["vocab_rows"], h, std=0.02)
    state[t + "embeddings.position_embeddings.weight"] = randn(sizes["max_positions"], h, std=0.02)
    state[t + "embeddings.position_ids"] = torch.arange(sizes["max_positions"])[None]
    norm(t + "embeddings.LayerNorm", h)
    for i in range(sizes["bert_layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, kv_width in (("attention", h), ("crossattention", d)):
            linear(f"{b}{att}.self.query", h, h)
            linear(f"{b}{att}.self.key", h, kv_width)
            linear(f"{b}{att}.self.value", h, kv_width)
            linear(f"{b}{att}.output.dense", h, h)
            norm(f"{b}{att}.output.LayerNorm", h)
        linear(b + "intermediate.dense", inter, h)
        linear(b + "output.dense", h, inter)
        norm(b + "output.LayerNorm", h)
    linear("blip.vision_proj", 256, d)
    linear("blip.text_proj", 256, h)
    widths = sizes["head"]
    for idx, fan_in, fan_out in zip(HEAD_INDICES, widths[:-1], widths[1:]):
        linear(f"mlp.layers.{idx}", fan_out, fan_in)
    return state


def oracle_params(state: dict) -> dict[str, torch.Tensor]:
    """Return the float weights as {name without 'blip.': float32 tensor} (the oracle's input)."""
    return {
        k.removeprefix("blip."): v.float()
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point()
    }


def vision_state_for_hf(state: dict) -> dict[str, torch.Tensor]:
    """Return the ViT weights under transformers ``BlipVisionModel`` names."""
    out = {}
    for key, value in state.items():
        if not key.startswith("blip.visual_encoder."):
            continue
        key = key.removeprefix("blip.visual_encoder.")
        key = "post_layernorm." + key[5:] if key.startswith("norm.") else key
        for old, new in _VISION_TO_HF:
            key = key.replace(old, new)
        out[key] = value
    return out


def text_state_for_hf(state: dict) -> dict[str, torch.Tensor]:
    """Return the text encoder's weights under transformers ``BlipTextModel`` names."""
    prefix = "blip.text_encoder."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# Preprocessing (the package's torchvision transform, with PIL and NumPy)


def preprocess(images_u8: np.ndarray, size: int = 224) -> np.ndarray:
    """Return (B, 3, size, size) float32 model inputs from uint8 (B, H, W, 3) images.

    Same as ImageReward's ``Resize(size, BICUBIC)`` (PIL, short side to ``size``, long side
    truncated), ``CenterCrop(size)``, ``ToTensor()``, ``Normalize(CLIP mean, std)``.
    """
    mean = np.asarray(IMAGE_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGE_STD, np.float32)[:, None, None]
    out = []
    for image in images_u8:
        x = np.asarray(_resize_crop(Image.fromarray(np.asarray(image, np.uint8)), size))
        x = x.astype(np.float32).transpose(2, 0, 1) / 255.0
        out.append((x - mean) / std)
    return np.stack(out).astype(np.float32)


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
    p = "visual_encoder."
    weight = params[p + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, weight, params[p + "patch_embed.proj.bias"], stride=weight.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = params[p + "cls_token"].expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + params[p + "pos_embed"][:, : x.shape[1]]
    heads = max(x.shape[-1] // VIT_HEAD_DIM, 1)
    for i in range(_count(p + "blocks.", params)):
        b = f"{p}blocks.{i}."
        h = _layer_norm(x, params, b + "norm1", 1e-6)
        x = x + _linear(
            _vit_attention(_linear(h, params, b + "attn.qkv"), heads), params, b + "attn.proj"
        )
        h = _layer_norm(x, params, b + "norm2", 1e-6)
        x = x + _linear(F.gelu(_linear(h, params, b + "mlp.fc1")), params, b + "mlp.fc2")
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
    return F.linear(x, params[name + ".weight"], params[name + ".bias"])


def _layer_norm(x, params: dict, name: str, eps: float):
    """Apply the LayerNorm ``name`` over the last axis."""
    weight = params[name + ".weight"]
    return F.layer_norm(x, weight.shape, weight, params[name + ".bias"], eps)


def _activation(name: str):
    """Return the torch function of a BERT ``hidden_act``."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_new":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.relu


def _count(prefix: str, params: dict) -> int:
    """Return how many numbered sub-blocks ``prefix<i>.`` the weights hold."""
    ids = {k[len(prefix) :].split(".")[0] for k in params if k.startswith(prefix)}
    return len([i for i in ids if i.isdigit()])


def _mlp_layers(params: dict) -> list[int]:
    """Return the indices of the head's Linear layers (``mlp.layers.<i>``) in order."""
    return sorted({int(k.split(".")[2]) for k in params if k.startswith("mlp.layers.")})


def scores(params: dict, images_u8: np.ndarray, tokens: dict, text_cfg: dict | None = None):
    """Return (raw, standardised) float64 numpy scores of uint8 images and tokenizer output.

    ``tokens``: the tokenizer's ``input_ids`` and ``attention_mask`` (numpy or torch).
    """
    size = int(math.isqrt(params["visual_encoder.pos_embed"].shape[1] - 1)) * int(
        params["visual_encoder.patch_embed.proj.weight"].shape[-1]
    )
    pixels = torch.as_tensor(preprocess(images_u8, size))
    ids = torch.as_tensor(np.asarray(tokens["input_ids"]), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(tokens["attention_mask"]), dtype=torch.long)
    with torch.no_grad():
        raw = score_raw(params, pixels, ids, mask, text_cfg).double().numpy()
    return raw, (raw - MEAN) / STD


# ---------------------------------------------------------------------------------------------
# transformers' BLIP towers on the same weights


def hf_vision_model(state: dict, sizes: dict):
    """Return transformers' ``BlipVisionModel`` (eval, fp32) holding the state dict's ViT."""
    from transformers import BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel

    width = sizes["vit_width"]
    config = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=sizes["vit_layers"],
        num_attention_heads=max(width // VIT_HEAD_DIM, 1),
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        attention_dropout=0.0,
    )
    with torch.device("meta"):  # no random init: the weights are assigned, not copied
        model = BlipVisionModel(config)
    model.load_state_dict(vision_state_for_hf(state), assign=True)
    return model.eval()


def hf_text_model(state: dict, sizes: dict):
    """Return transformers' ``BlipTextModel`` (eval, fp32) holding the state dict's BERT."""
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    config = BlipTextConfig(
        vocab_size=sizes["vocab_rows"],
        hidden_size=sizes["bert_width"],
        encoder_hidden_size=sizes["vit_width"],
        intermediate_size=sizes["bert_intermediate"],
        num_attention_heads=sizes["bert_heads"],
        num_hidden_layers=sizes["bert_layers"],
        max_position_embeddings=sizes["max_positions"],
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        bos_token_id=None,
        sep_token_id=None,
        pad_token_id=0,
    )
    with torch.device("meta"):
        model = BlipTextModel(config, add_pooling_layer=False)
    weights = {k: v for k, v in text_state_for_hf(state).items() if not k.endswith("position_ids")}
    model.load_state_dict(weights, assign=True)
    model.embeddings.position_ids = torch.arange(sizes["max_positions"])[None]
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"BlipTextModel weights not assigned: {missing}")
    return model.eval()
