"""ImageReward-v1.0 in Flax Linen: BLIP's ViT, its BERT text encoder with cross-attention to
every image token, and the five-layer linear head.

    model = ImageRewardModel(ImageRewardConfig(), dtype=jnp.bfloat16)
    raw = model.apply({"params": p}, pixel_values, input_ids, attention_mask)   # (B,) fp32

The param tree mirrors the keys of ``ImageReward.pt`` (THUDM/ImageReward), so
``weights/convert.py`` maps it 1:1 by its rules (``blocks_0`` ⇄ ``blocks.0``, ``kernel`` ⇄
``weight``ᵀ, ``scale``/``embedding`` ⇄ ``weight``): ``blip/visual_encoder/…``,
``blip/text_encoder/…`` and ``mlp/layers_{0,2,4,6,7}``. ``weights/imagereward.py`` reads the file.

- Vision (``visual_encoder``, BLIP's timm-style ``VisionTransformer``; ViT-L/16 for
  ImageReward): a biased 16×16 patch conv (``patch_embed.proj``), a learned ``cls_token`` and
  learned ``pos_embed``, then pre-norm blocks ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``
  with a fused biased ``attn.qkv``, ``attn.proj``, ``mlp.fc1``/``fc2`` with exact GELU, and a
  final ``norm`` over every token; LayerNorm eps 1e-6, heads of 64.
- Text (``text_encoder``, BLIP's ``med.py`` ``BertModel`` without pooler or token-type
  embedding; BERT-base for ImageReward): word + absolute position embeddings, ``LayerNorm``,
  then post-norm layers: self-attention with the padding masked by adding −10000 to its scores
  (as ``med.py``), cross-attention of the text to every image token (keys and values project
  from the image width), feed-forward; each sub-block ``LayerNorm(dense(h) + x)``, eps 1e-12.
- Head (``mlp``): Linear 768→1024→128→64→16→1 with no activations (the Dropouts of the
  PyTorch ``nn.Sequential`` sit at indices 1, 3, 5 and are identity at eval), applied to the
  text encoder's first ([CLS]) token in fp32 at ``Precision.HIGHEST``.

Numerics: params are fp32; ``dtype`` is the compute dtype of the towers. LayerNorm statistics
and every softmax run in fp32 (scores formed in fp32); the [CLS] feature is cast to fp32 before
the head, as ``ImageReward.score`` does (``.float()``). The ViT self-attention and the
cross-attention use the project's ``dot_product_attention``; the 35-token masked text
self-attention is a plain fp32-score einsum. Images enter as NHWC pixel values, already
resized and normalised (``rewards/imagereward.py`` does that in the graph).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dag_jax.models.attention import dot_product_attention
from dag_jax.models.layers import Dtype, activation

VIT_HEAD_DIM = 64  # BLIP's ViT-B/16 and ViT-L/16: 12 and 16 heads of 64
HEAD_FEATURES = (1024, 128, 64, 16, 1)  # ImageReward's MLP on the 768-d [CLS] feature
HEAD_INDICES = (0, 2, 4, 6, 7)  # the Linears' places in its nn.Sequential (Dropouts between)
MASK_VALUE = -10000.0  # added to the scores of padding tokens, as BLIP's med.py


@dataclasses.dataclass(frozen=True)
class BlipVisionConfig:
    """BLIP ViT sizes (ImageReward's defaults: ViT-L/16 at 224 px)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ViT hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )

    @property
    def num_positions(self) -> int:
        """Return the number of tokens: one per patch plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class BlipTextConfig:
    """BLIP's BERT text encoder sizes (ImageReward's ``med_config.json``: BERT-base + 2 tokens).

    ``encoder_width`` is the width of the image tokens cross-attended to (the ViT's).
    """

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    encoder_width: int = 1024
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"text hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        activation(self.hidden_act)  # raises ValueError for an unknown activation


@dataclasses.dataclass(frozen=True)
class ImageRewardConfig:
    """The towers' configs and the head's layer widths and PyTorch indices."""

    vision: BlipVisionConfig = dataclasses.field(default_factory=BlipVisionConfig)
    text: BlipTextConfig = dataclasses.field(default_factory=BlipTextConfig)
    head_features: tuple[int, ...] = HEAD_FEATURES
    head_indices: tuple[int, ...] = HEAD_INDICES

    def __post_init__(self):
        if self.text.encoder_width != self.vision.hidden_size:
            raise ValueError(
                f"the text encoder cross-attends to {self.text.encoder_width}-wide tokens but the "
                f"ViT is {self.vision.hidden_size} wide"
            )
        if len(self.head_features) != len(self.head_indices) or not self.head_features:
            raise ValueError(
                f"head_features {self.head_features} and head_indices {self.head_indices} "
                "must be non-empty and of one length"
            )
        if self.head_features[-1] != 1:
            raise ValueError(f"the head must end in one output, got {self.head_features}")


def _layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    """Return a LayerNorm with fp32 statistics and ``dtype`` output."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def padded_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, heads: int, bias: jax.Array
) -> jax.Array:
    """Return softmax(q kᵀ/√d + bias) v over heads for (B, L, H·D) inputs.

    ``bias`` (B, Lk) is added to every query's scores (0 or ``MASK_VALUE``). Scores and softmax
    in fp32; the result has v's dtype.
    """
    b, lq, inner = q.shape
    lk, d = k.shape[1], inner // heads
    q = q.reshape(b, lq, heads, d).astype(jnp.float32)
    k = k.reshape(b, lk, heads, d).astype(jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5 + bias[:, None, None, :]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.reshape(b, lk, heads, d))
    return out.reshape(b, lq, inner)


# ---------------------------------------------------------------------------------------------
# Vision: BLIP's ViT


class PatchEmbed(nn.Module):
    """Biased conv with kernel and stride ``patch_size`` (``patch_embed.proj``)."""

    config: BlipVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """Return (B, patches, D) patch embeddings of NHWC pixel values, row-major as torch."""
        cfg = self.config
        p = cfg.patch_size
        x = nn.Conv(
            cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj"
        )(jnp.asarray(pixel_values, self.dtype))
        return x.reshape(x.shape[0], -1, cfg.hidden_size)


class ViTAttention(nn.Module):
    """Self-attention with a fused biased ``qkv`` projection and ``proj``."""

    config: BlipVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Return the (B, N, D) attention output (no mask)."""
        dim = x.shape[-1]
        qkv = nn.Dense(3 * dim, dtype=self.dtype, name="qkv")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # q | k | v, each heads-major as BLIP's reshape
        out = dot_product_attention(q, k, v, self.config.num_attention_heads)
        return nn.Dense(dim, dtype=self.dtype, name="proj")(out)


class ViTMlp(nn.Module):
    """``fc1``, exact GELU, ``fc2``."""

    config: BlipVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Return the (B, N, D) MLP output."""
        h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = jax.nn.gelu(h, approximate=False)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(h)


class ViTBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    config: BlipVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Return the (B, N, D) block output."""
        eps = self.config.layer_norm_eps
        x = x + ViTAttention(self.config, self.dtype, name="attn")(
            _layer_norm(eps, self.dtype, "norm1")(x)
        )
        return x + ViTMlp(self.config, self.dtype, name="mlp")(
            _layer_norm(eps, self.dtype, "norm2")(x)
        )


class BlipVisionTransformer(nn.Module):
    """BLIP's ViT (``visual_encoder``): patches + cls token + positions, blocks, final ``norm``."""

    config: BlipVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """Return the normalised (B, 1 + patches, D) tokens of NHWC (B, S, S, 3) pixel values."""
        cfg = self.config
        shape = tuple(jnp.shape(pixel_values))
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if len(shape) != 4 or shape[1:] != want:
            raise ValueError(f"pixel_values must be NHWC (batch, {want}), got {shape}")
        x = PatchEmbed(cfg, self.dtype, name="patch_embed")(pixel_values)
        init = nn.initializers.normal(0.02)
        cls_token = self.param("cls_token", init, (1, 1, cfg.hidden_size), jnp.float32)
        pos_embed = self.param(
            "pos_embed", init, (1, cfg.num_positions, cfg.hidden_size), jnp.float32
        )
        cls = jnp.broadcast_to(cls_token.astype(self.dtype), (x.shape[0], 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + pos_embed.astype(self.dtype)
        for i in range(cfg.num_hidden_layers):
            x = ViTBlock(cfg, self.dtype, name=f"blocks_{i}")(x)
        return _layer_norm(cfg.layer_norm_eps, self.dtype, "norm")(x)


# ---------------------------------------------------------------------------------------------
# Text: BLIP's BERT with cross-attention


class BertEmbeddings(nn.Module):
    """``word_embeddings`` + absolute ``position_embeddings``, then ``LayerNorm`` (no types)."""

    config: BlipTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Return the (B, L, H) embeddings of (B, L) token ids."""
        cfg = self.config
        init = nn.initializers.normal(0.02)
        words = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            embedding_init=init,
            name="word_embeddings",
        )
        positions = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            dtype=self.dtype,
            embedding_init=init,
            name="position_embeddings",
        )
        x = words(input_ids) + positions(jnp.arange(input_ids.shape[-1])[None, :])
        return _layer_norm(cfg.layer_norm_eps, self.dtype, "LayerNorm")(x)


class BertSelfAttention(nn.Module):
    """``query`` of the text; ``key``/``value`` of the text or, for cross-attention, the image."""

    config: BlipTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, bias: jax.Array | None) -> jax.Array:
        """Return (B, L, H) attention of ``x`` over ``context`` (``bias``: see padded_attention).

        ``bias`` None (cross-attention: every image token is valid) takes the project's
        ``dot_product_attention``.
        """
        width, heads = self.config.hidden_size, self.config.num_attention_heads
        q = nn.Dense(width, dtype=self.dtype, name="query")(x)
        k = nn.Dense(width, dtype=self.dtype, name="key")(context)
        v = nn.Dense(width, dtype=self.dtype, name="value")(context)
        if bias is None:
            return dot_product_attention(q, k, v, heads)
        return padded_attention(q, k, v, heads, bias)


class BertResidualOutput(nn.Module):
    """Post-norm residual: ``LayerNorm(dense(h) + x)``."""

    config: BlipTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, x: jax.Array) -> jax.Array:
        """Return the (B, L, H) normalised sum."""
        h = nn.Dense(self.config.hidden_size, dtype=self.dtype, name="dense")(h)
        return _layer_norm(self.config.layer_norm_eps, self.dtype, "LayerNorm")(h + x)


class BertAttention(nn.Module):
    """``self`` (the attention) then ``output`` (the post-norm residual)."""

    config: BlipTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, bias: jax.Array | None) -> jax.Array:
        """Return the (B, L, H) sub-block output."""
        h = BertSelfAttention(self.config, self.dtype, name="self")(x, context, bias)
        return BertResidualOutput(self.config, self.dtype, name="output")(h, x)


class BertIntermediate(nn.Module):
    """``dense`` to the intermediate width, then the activation."""

    config: BlipTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Return the (B, L, I) activations."""
        h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="dense")(x)
        return activation(self.config.hidden_act)(h)


class BertLayer(nn.Module):
    """Masked self-attention, cross-attention to the image, feed-forward; each post-norm."""

    config: BlipTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, image: jax.Array, bias: jax.Array) -> jax.Array:
        """Return the (B, L, H) layer output."""
        cfg, dtype = self.config, self.dtype
        x = BertAttention(cfg, dtype, name="attention")(x, x, bias)
        x = BertAttention(cfg, dtype, name="crossattention")(x, image, None)
        h = BertIntermediate(cfg, dtype, name="intermediate")(x)
        return BertResidualOutput(cfg, dtype, name="output")(h, x)


class BertEncoder(nn.Module):
    """The layers, named ``layer_0``, ``layer_1``, … (PyTorch ``layer.0``, …)."""

    config: BlipTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, image: jax.Array, bias: jax.Array) -> jax.Array:
        """Return the last layer's (B, L, H) output."""
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(x, image, bias)
        return x


class BlipTextEncoder(nn.Module):
    """BLIP's BERT (``text_encoder``) in its multimodal mode: text cross-attending to an image."""

    config: BlipTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array, image_embeds: jax.Array
    ) -> jax.Array:
        """Return the last hidden states (B, L, H).

        ``input_ids`` and ``attention_mask`` (nonzero at real tokens) are (B, L), L at most
        ``max_position_embeddings``; ``image_embeds`` (B, N, encoder_width) are all attended to.
        """
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids must be (batch, length <= {cfg.max_position_embeddings}), got "
                f"{input_ids.shape}"
            )
        bias = jnp.where(jnp.asarray(attention_mask) != 0, 0.0, MASK_VALUE).astype(jnp.float32)
        x = BertEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        image = jnp.asarray(image_embeds, self.dtype)
        return BertEncoder(cfg, self.dtype, name="encoder")(x, image, bias)


# ---------------------------------------------------------------------------------------------
# ImageReward


class ImageRewardHead(nn.Module):
    """ImageReward's ``MLP``: Dense layers ``layers_<i>`` with no activations, fp32, HIGHEST."""

    features: tuple[int, ...] = HEAD_FEATURES
    indices: tuple[int, ...] = HEAD_INDICES

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Return (..., 1) outputs of (..., H) features, in fp32."""
        x = jnp.asarray(x, jnp.float32)
        for feat, idx in zip(self.features, self.indices, strict=True):
            x = nn.Dense(feat, name=f"layers_{idx}", precision=jax.lax.Precision.HIGHEST)(x)
        return x


class Blip(nn.Module):
    """The two BLIP towers ImageReward keeps (``visual_encoder``, ``text_encoder``)."""

    config: ImageRewardConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.visual_encoder = BlipVisionTransformer(self.config.vision, self.dtype)
        self.text_encoder = BlipTextEncoder(self.config.text, self.dtype)

    def __call__(
        self, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array
    ) -> jax.Array:
        """Return the text encoder's (B, L, H) states, cross-attending to the images' tokens."""
        image_embeds = self.visual_encoder(pixel_values)
        return self.text_encoder(input_ids, attention_mask, image_embeds)


class ImageRewardModel(nn.Module):
    """ImageReward-v1.0: ``blip`` (ViT + BERT) and ``mlp`` (the head) on the [CLS] token."""

    config: ImageRewardConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.blip = Blip(self.config, self.dtype)
        self.mlp = ImageRewardHead(self.config.head_features, self.config.head_indices)

    def __call__(
        self, pixel_values: jax.Array, input_ids: jax.Array, attention_mask: jax.Array
    ) -> jax.Array:
        """Return the (B,) fp32 raw (unstandardised) scores.

        ``pixel_values``: NHWC (B, S, S, 3), resized and CLIP-normalised; ``input_ids`` and
        ``attention_mask``: (B, L) BERT tokens of each image's prompt.
        """
        states = self.blip(pixel_values, input_ids, attention_mask)
        return self.mlp(states[:, 0].astype(jnp.float32))[:, 0]
