"""CLIP in Flax Linen: the text tower (Stable Diffusion's text encoder), the vision tower and
the full two-tower ``CLIPModel`` (for CLIP-based rewards and diversity metrics).

The param tree is transformers' legacy Flax layout (``text_model/encoder/layers/0/self_attn/
q_proj/kernel``, ``vision_model/embeddings/patch_embedding/kernel``, ``visual_projection/kernel``,
``logit_scale``), so ``weights/convert.py`` maps it 1:1 to the PyTorch keys of a transformers CLIP
checkpoint (``text_model.encoder.layers.0.self_attn.q_proj.weight``, ...) by its dot/slash rule.
transformers 5 keeps a bare ``CLIPTextModel``'s keys without the ``text_model.`` prefix (in memory
and in what it saves); ``with_text_model_prefix`` adds it back before conversion. A full
``CLIPModel`` saves ``text_model.*`` and ``vision_model.*`` in both transformers 4 and 5.

Numerics follow transformers' PyTorch CLIP: pre-LN blocks, softmax in fp32; the text tower uses a
causal mask combined with an optional padding mask, a final LayerNorm and pooling at the EOS
token; the vision tower embeds non-overlapping patches with a bias-free conv, prepends a class
token, applies ``pre_layrnorm``, runs the encoder unmasked and pools ``post_layernorm`` of the
class token. Images enter as NCHW ``pixel_values`` (already resized and normalised with the CLIP
mean/std), like transformers. Params are fp32; ``dtype`` sets the compute dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dag_jax.models.layers import Dtype, activation

# Top-level module names of a bare transformers-5 CLIPTextModel state dict.
_TEXT_MODEL_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of the CLIP text tower (names as in transformers' ``config.json``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    projection_dim: int | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        activation(self.hidden_act)  # raises ValueError for an unknown activation

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """Return the config read from a transformers ``config.json`` dict.

        Accepts a ``CLIPTextConfig`` dict or a full ``CLIPConfig`` dict (its ``text_config`` is
        used, with the top-level ``projection_dim`` when present, as ``CLIPModel`` does).
        Unrelated keys are ignored; a missing required key raises ValueError naming it.
        """
        return cls(**_config_kwargs(cls, d, "text_config", "text"))


def _config_kwargs(cls: type, d: Mapping[str, Any], nested: str, what: str) -> dict[str, Any]:
    """Return the dataclass kwargs of ``cls`` read from a tower or full-CLIP config dict.

    A full ``CLIPConfig`` dict is recognised by its ``nested`` sub-dict; its top-level
    ``projection_dim`` wins over the sub-dict's (the sub-configs carry a stale default).
    """
    projection_dim = d.get("projection_dim")
    if isinstance(d.get(nested), Mapping):
        d = d[nested]
        if projection_dim is None:
            projection_dim = d.get("projection_dim")
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and d.get(f.name) is None]
    if missing:
        raise ValueError(
            f"CLIP {what} config is missing required key(s) {missing}; it has {sorted(d)}"
        )
    kwargs = {f.name: d[f.name] for f in fields if d.get(f.name) is not None}
    kwargs["projection_dim"] = projection_dim
    return kwargs


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of the CLIP ViT vision tower (names as in transformers' ``config.json``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    projection_dim: int | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        activation(self.hidden_act)  # raises ValueError for an unknown activation

    @property
    def num_positions(self) -> int:
        """Return the number of tokens: one per patch plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPVisionConfig:
        """Return the config read from a transformers ``config.json`` dict.

        Accepts a ``CLIPVisionConfig`` dict or a full ``CLIPConfig`` dict (its ``vision_config``
        is used, with the top-level ``projection_dim`` when present, as ``CLIPModel`` does).
        Unrelated keys are ignored; a missing required key raises ValueError naming it.
        """
        return cls(**_config_kwargs(cls, d, "vision_config", "vision"))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A two-tower CLIP: text and vision configs sharing one ``projection_dim``."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int
    logit_scale_init_value: float = 2.6592

    def __post_init__(self):
        for tower in (self.text, self.vision):
            if tower.projection_dim != self.projection_dim:
                raise ValueError(
                    f"{type(tower).__name__}.projection_dim {tower.projection_dim} differs from "
                    f"CLIPConfig.projection_dim {self.projection_dim}"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPConfig:
        """Return the config of a transformers ``CLIPConfig`` dict (``config.json`` of CLIPModel).

        Needs ``text_config`` and ``vision_config`` sub-dicts; ``projection_dim`` defaults to
        transformers' 512 when absent. Raises ValueError naming what is missing.
        """
        absent = [k for k in ("text_config", "vision_config") if not isinstance(d.get(k), Mapping)]
        if absent:
            raise ValueError(
                f"not a full CLIP config: missing {absent} (a CLIPModel config.json has "
                f"text_config and vision_config); it has {sorted(d)}"
            )
        d = {**d, "projection_dim": d.get("projection_dim") or 512}
        return cls(
            text=CLIPTextConfig.from_dict(d),
            vision=CLIPVisionConfig.from_dict(d),
            projection_dim=d["projection_dim"],
            logit_scale_init_value=d.get("logit_scale_init_value", 2.6592),
        )


@flax.struct.dataclass
class CLIPTextOutput:
    """Outputs of the CLIP text models, in the compute dtype.

    ``hidden_states`` (only when requested) is the embeddings output followed by each computed
    layer's output, before the final LayerNorm. ``text_embeds`` (the projected pooled output) is
    set only by ``CLIPTextModelWithProjection`` and ``CLIPModel.text_outputs``.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None


def with_text_model_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Return the state dict with a bare CLIPTextModel's keys moved under ``text_model.``.

    transformers 5 names a ``CLIPTextModel``'s weights ``embeddings.*``, ``encoder.*`` and
    ``final_layer_norm.*`` (also in the files it saves), while SD checkpoints and
    ``CLIPTextModelWithProjection`` use ``text_model.*``. Other keys are kept as they are.
    """
    return {
        (f"text_model.{k}" if k.startswith(_TEXT_MODEL_CHILDREN) else k): v
        for k, v in state_dict.items()
    }


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Return the (B,) index of the pooled token: transformers' EOS rule.

    With the legacy ``eos_token_id == 2`` it is the argmax of the ids (CLIP's EOT has the highest
    id); otherwise the first position whose id equals ``eos_token_id``.
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


def _layer_norm(cfg: CLIPTextConfig | CLIPVisionConfig, dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Return the (B, L, D) embeddings of (B, L) token ids."""
        cfg = self.config
        init = nn.initializers.normal(0.02)
        token = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            embedding_init=init,
            name="token_embedding",
        )
        position = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            dtype=self.dtype,
            embedding_init=init,
            name="position_embedding",
        )
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        return token(input_ids) + position(positions)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Return the (B, L, D) attention output.

        ``mask`` (B|1, 1, L, L) is True where attention is allowed; None attends everywhere.
        """
        b, length, dim = x.shape
        heads = self.config.num_attention_heads
        head_dim = dim // heads

        def project(name: str) -> jax.Array:
            h = nn.Dense(dim, dtype=self.dtype, name=name)(x)
            return h.reshape(b, length, heads, head_dim)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
        scores = scores * head_dim**-0.5
        if mask is not None:
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, dim)
        return nn.Dense(dim, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    """``fc1``, the config's activation, ``fc2``."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Return the (B, L, D) MLP output."""
        cfg = self.config
        h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = activation(cfg.hidden_act)(h)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: ``x + attn(layer_norm1(x))`` then ``x + mlp(layer_norm2(x))``."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Return the (B, L, D) block output (``mask`` as in CLIPAttention)."""
        cfg = self.config
        h = _layer_norm(cfg, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(cfg, self.dtype, name="self_attn")(h, mask)
        h = _layer_norm(cfg, self.dtype, "layer_norm2")(x)
        return x + CLIPMLP(cfg, self.dtype, name="mlp")(h)


class CLIPLayerCollection(nn.Module):
    """The encoder layers, named ``"0"``, ``"1"``, ... as in transformers' Flax CLIP."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, num_layers: int
    ) -> tuple[jax.Array, ...]:
        """Return the embeddings then the outputs of the first ``num_layers`` layers.

        At init every layer is built (so all params exist) whatever ``num_layers`` is.
        """
        total = self.config.num_hidden_layers if self.is_initializing() else num_layers
        states = (x,)
        for i in range(total):
            x = CLIPEncoderLayer(self.config, self.dtype, name=str(i))(x, mask)
            if i < num_layers:
                states += (x,)
        return states


class CLIPEncoder(nn.Module):
    """Holds the layer stack under the name ``layers``."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, num_layers: int
    ) -> tuple[jax.Array, ...]:
        """Return the embeddings then each computed layer's output."""
        return CLIPLayerCollection(self.config, self.dtype, name="layers")(x, mask, num_layers)


class CLIPTextTransformer(nn.Module):
    """Embeddings, causal encoder and final LayerNorm (transformers' ``text_model``)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
        skip_last_layers: int = 0,
    ) -> CLIPTextOutput:
        """Return a CLIPTextOutput (see CLIPTextModel for the arguments)."""
        cfg = self.config
        if not 0 <= skip_last_layers < cfg.num_hidden_layers:
            raise ValueError(
                f"skip_last_layers must be in [0, {cfg.num_hidden_layers}), got {skip_last_layers}"
            )
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        x = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) != 0)[:, None, None, :]
        states = CLIPEncoder(cfg, self.dtype, name="encoder")(
            x, mask, cfg.num_hidden_layers - skip_last_layers
        )
        last = _layer_norm(cfg, self.dtype, "final_layer_norm")(states[-1])
        pooled = last[jnp.arange(last.shape[0]), eos_positions(input_ids, cfg.eos_token_id)]
        return CLIPTextOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=states if output_hidden_states else None,
        )


class CLIPTextModel(nn.Module):
    """CLIP text encoder (transformers' ``CLIPTextModel``), params under ``text_model``.

    ``__call__(input_ids, attention_mask=None, output_hidden_states=False, skip_last_layers=0)``:

    - ``input_ids`` (B, L) int, L <= max_position_embeddings; ``attention_mask`` (B, L), nonzero
      where a token may be attended to, combined with the causal mask.
    - ``skip_last_layers=k`` ("clip skip", the SD2 penultimate-layer trick): the last k layers are
      not run and ``last_hidden_state`` is ``final_layer_norm(hidden_states[-(k + 1)])`` of the
      full model, i.e. diffusers' ``clip_skip=k``; ``pooler_output`` is taken from it and
      ``hidden_states`` then holds only the computed states. Initialise with k = 0.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
        skip_last_layers: int = 0,
    ) -> CLIPTextOutput:
        """Return a CLIPTextOutput (last_hidden_state, pooler_output, hidden_states)."""
        return CLIPTextTransformer(self.config, self.dtype, name="text_model")(
            input_ids, attention_mask, output_hidden_states, skip_last_layers
        )


class CLIPTextModelWithProjection(nn.Module):
    """CLIP text tower plus a bias-free ``text_projection`` of the pooled output.

    Same call as ``CLIPTextModel``; the output's ``text_embeds`` is the (B, projection_dim)
    projection of ``pooler_output`` (unnormalised, as in transformers).
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
        skip_last_layers: int = 0,
    ) -> CLIPTextOutput:
        """Return a CLIPTextOutput with ``text_embeds`` set."""
        cfg = self.config
        if cfg.projection_dim is None:
            raise ValueError("CLIPTextModelWithProjection needs config.projection_dim")
        out = CLIPTextTransformer(cfg, self.dtype, name="text_model")(
            input_ids, attention_mask, output_hidden_states, skip_last_layers
        )
        embeds = nn.Dense(
            cfg.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection"
        )(out.pooler_output)
        return out.replace(text_embeds=embeds)


@flax.struct.dataclass
class CLIPVisionOutput:
    """Outputs of the CLIP vision models, in the compute dtype.

    ``last_hidden_state`` (B, 1 + patches, D) is the encoder output *before* ``post_layernorm``
    (as in transformers); ``pooler_output`` (B, D) is ``post_layernorm`` of its class token.
    ``hidden_states`` (only when requested) is the encoder input (after ``pre_layrnorm``)
    followed by each layer's output. ``image_embeds`` is set by the models with a projection.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    image_embeds: jax.Array | None = None


@flax.struct.dataclass
class CLIPOutput:
    """Outputs of ``CLIPModel.__call__`` (as transformers' ``CLIPOutput``).

    ``image_embeds`` and ``text_embeds`` are the L2-normalised projections;
    ``logits_per_image`` (B_img, B_txt) is ``exp(logit_scale)`` times their cosine similarities,
    ``logits_per_text`` its transpose. All in fp32.
    """

    logits_per_image: jax.Array
    logits_per_text: jax.Array
    text_embeds: jax.Array
    image_embeds: jax.Array
    text_model_output: CLIPTextOutput
    vision_model_output: CLIPVisionOutput


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Return fp32 ``x / max(||x||, eps)`` along the last axis (torch's ``F.normalize``)."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CLIPVisionEmbeddings(nn.Module):
    """Bias-free patch conv, a learned class token and learned absolute position embeddings."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """Return the (B, 1 + patches, D) embeddings of NCHW ``pixel_values``."""
        cfg = self.config
        images = jnp.asarray(pixel_values, self.dtype).transpose(0, 2, 3, 1)  # NCHW -> NHWC
        patches = nn.Conv(
            cfg.hidden_size,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            name="patch_embedding",
        )(images)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major over the grid, as torch
        class_embedding = self.param(
            "class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,), jnp.float32
        )
        cls_token = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, cfg.hidden_size))
        position = nn.Embed(
            cfg.num_positions,
            cfg.hidden_size,
            dtype=self.dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="position_embedding",
        )
        x = jnp.concatenate([cls_token, patches], axis=1)
        return x + position(jnp.arange(cfg.num_positions)[None, :])


class CLIPVisionTransformer(nn.Module):
    """Embeddings, ``pre_layrnorm``, unmasked encoder, ``post_layernorm`` (``vision_model``)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, output_hidden_states: bool = False
    ) -> CLIPVisionOutput:
        """Return a CLIPVisionOutput of (B, C, H, W) ``pixel_values`` at the config's size."""
        cfg = self.config
        shape = tuple(jnp.shape(pixel_values))
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if len(shape) != 4 or shape[1:] != want:
            raise ValueError(
                f"pixel_values must be NCHW (batch, {want[0]}, {want[1]}, {want[2]}), got {shape}"
            )
        x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x = _layer_norm(cfg, self.dtype, "pre_layrnorm")(x)
        states = CLIPEncoder(cfg, self.dtype, name="encoder")(x, None, cfg.num_hidden_layers)
        last = states[-1]
        pooled = _layer_norm(cfg, self.dtype, "post_layernorm")(last[:, 0])
        return CLIPVisionOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=states if output_hidden_states else None,
        )


class CLIPVisionModel(nn.Module):
    """CLIP vision encoder with params under ``vision_model`` (no projection).

    transformers 5 saves a bare ``CLIPVisionModel`` without the ``vision_model.`` prefix; its
    weights are read through a ``CLIPModel`` or ``CLIPVisionModelWithProjection`` checkpoint.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, output_hidden_states: bool = False
    ) -> CLIPVisionOutput:
        """Return a CLIPVisionOutput of NCHW ``pixel_values``."""
        return CLIPVisionTransformer(self.config, self.dtype, name="vision_model")(
            pixel_values, output_hidden_states
        )


class CLIPVisionModelWithProjection(nn.Module):
    """CLIP vision tower plus a bias-free ``visual_projection`` of the pooled output.

    Params match transformers' ``CLIPVisionModelWithProjection`` (``vision_model.*``,
    ``visual_projection.weight``); the output's ``image_embeds`` is the (B, projection_dim)
    unnormalised projection of ``pooler_output``.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, output_hidden_states: bool = False
    ) -> CLIPVisionOutput:
        """Return a CLIPVisionOutput with ``image_embeds`` set."""
        cfg = self.config
        if cfg.projection_dim is None:
            raise ValueError("CLIPVisionModelWithProjection needs config.projection_dim")
        out = CLIPVisionTransformer(cfg, self.dtype, name="vision_model")(
            pixel_values, output_hidden_states
        )
        embeds = nn.Dense(
            cfg.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection"
        )(out.pooler_output)
        return out.replace(image_embeds=embeds)


class CLIPModel(nn.Module):
    """Two-tower CLIP (transformers' ``CLIPModel``): one param tree, PyTorch keys 1:1.

    Params: ``text_model/…``, ``vision_model/…``, ``text_projection/kernel``,
    ``visual_projection/kernel`` and the scalar ``logit_scale``. Initialise with ``__call__``
    (both towers); call the other entry points through ``apply(..., method=...)``::

        img = model.apply({"params": p}, pixel_values, method=CLIPModel.get_image_features)
        txt = model.apply({"params": p}, input_ids, method=CLIPModel.get_text_features)

    ``pixel_values`` are NCHW (B, 3, image_size, image_size), CLIP-normalised; ``input_ids`` are
    (B, L) token ids pooled by the text config's EOS rule (``eos_token_id == 2``: argmax id, as
    OpenAI/OpenCLIP CLIP). Features are unnormalised and in the compute dtype.
    """

    config: CLIPConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.text_model = CLIPTextTransformer(cfg.text, self.dtype)
        self.vision_model = CLIPVisionTransformer(cfg.vision, self.dtype)
        self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
        self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param(
            "logit_scale",
            nn.initializers.constant(cfg.logit_scale_init_value),
            (),
            jnp.float32,
        )

    def vision_outputs(
        self, pixel_values: jax.Array, output_hidden_states: bool = False
    ) -> CLIPVisionOutput:
        """Return the vision tower's CLIPVisionOutput with ``image_embeds`` (projected) set."""
        out = self.vision_model(pixel_values, output_hidden_states)
        return out.replace(image_embeds=self.visual_projection(out.pooler_output))

    def text_outputs(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        """Return the text tower's CLIPTextOutput with ``text_embeds`` (projected) set."""
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        return out.replace(text_embeds=self.text_projection(out.pooler_output))

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Return the (B, projection_dim) unnormalised image embeddings of NCHW pixel_values."""
        return self.vision_outputs(pixel_values).image_embeds

    def get_text_features(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Return the (B, projection_dim) unnormalised text embeddings of (B, L) token ids."""
        return self.text_outputs(input_ids, attention_mask).text_embeds

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array,
        attention_mask: jax.Array | None = None,
    ) -> CLIPOutput:
        """Return a CLIPOutput: normalised embeddings and scaled cosine logits of both towers."""
        text = self.text_outputs(input_ids, attention_mask)
        vision = self.vision_outputs(pixel_values)
        text_embeds = l2_normalize(text.text_embeds)
        image_embeds = l2_normalize(vision.image_embeds)
        logits_per_text = jnp.exp(self.logit_scale) * text_embeds @ image_embeds.T
        return CLIPOutput(
            logits_per_image=logits_per_text.T,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text,
            vision_model_output=vision,
        )
