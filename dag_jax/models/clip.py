"""CLIP text transformer (Stable Diffusion's text encoder) in Flax Linen.

The param tree is transformers' legacy Flax layout (``text_model/encoder/layers/0/self_attn/
q_proj/kernel``), so ``weights/convert.py`` maps it 1:1 to the PyTorch keys of a CLIP text
checkpoint (``text_model.encoder.layers.0.self_attn.q_proj.weight``) by its dot/slash rule.
transformers 5 keeps a bare ``CLIPTextModel``'s keys without the ``text_model.`` prefix (in memory
and in what it saves); ``with_text_model_prefix`` adds it back before conversion.

Numerics follow transformers' PyTorch ``CLIPTextModel``: pre-LN blocks, causal mask combined with
an optional padding mask, softmax in fp32, final LayerNorm, pooling at the EOS token. Params are
fp32; ``dtype`` sets the compute dtype.
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
        projection_dim = d.get("projection_dim")
        if isinstance(d.get("text_config"), Mapping):
            d = d["text_config"]
            if projection_dim is None:
                projection_dim = d.get("projection_dim")
        fields = dataclasses.fields(cls)
        missing = [
            f.name for f in fields if f.default is dataclasses.MISSING and d.get(f.name) is None
        ]
        if missing:
            raise ValueError(
                f"CLIP text config is missing required key(s) {missing}; it has {sorted(d)}"
            )
        kwargs = {f.name: d[f.name] for f in fields if d.get(f.name) is not None}
        kwargs["projection_dim"] = projection_dim
        return cls(**kwargs)


@flax.struct.dataclass
class CLIPTextOutput:
    """Outputs of the CLIP text models, in the compute dtype.

    ``hidden_states`` (only when requested) is the embeddings output followed by each computed
    layer's output, before the final LayerNorm. ``text_embeds`` is set only by
    ``CLIPTextModelWithProjection``.
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


def _layer_norm(cfg: CLIPTextConfig, dtype: Dtype, name: str) -> nn.LayerNorm:
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

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Return the (B, L, D) attention output; ``mask`` (B|1, 1, L, L) is True where allowed."""
        b, length, dim = x.shape
        heads = self.config.num_attention_heads
        head_dim = dim // heads

        def project(name: str) -> jax.Array:
            h = nn.Dense(dim, dtype=self.dtype, name=name)(x)
            return h.reshape(b, length, heads, head_dim)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
        scores = jnp.where(mask, scores * head_dim**-0.5, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, dim)
        return nn.Dense(dim, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    """``fc1``, the config's activation, ``fc2``."""

    config: CLIPTextConfig
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

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Return the (B, L, D) block output."""
        cfg = self.config
        h = _layer_norm(cfg, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(cfg, self.dtype, name="self_attn")(h, mask)
        h = _layer_norm(cfg, self.dtype, "layer_norm2")(x)
        return x + CLIPMLP(cfg, self.dtype, name="mlp")(h)


class CLIPLayerCollection(nn.Module):
    """The encoder layers, named ``"0"``, ``"1"``, ... as in transformers' Flax CLIP."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, num_layers: int) -> tuple[jax.Array, ...]:
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

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, num_layers: int) -> tuple[jax.Array, ...]:
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
