"""A Stable Diffusion pipeline in JAX: load one from a diffusers folder, save one back.

pipe = dag_jax.load_pipeline("path/or/hub-id", dtype=jnp.bfloat16)
eps = pipe.unet.apply({"params": pipe.params["unet"]}, latents, t, text_emb).sample
dag_jax.save_pipeline(pipe, "out_dir")
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    with_text_model_prefix,
)
from dag_jax.models.unet import UNet2DConditionModel, UNetConfig
from dag_jax.models.vae import AutoencoderKL, VAEConfig
from dag_jax.weights import diffusers as folder

PARTS = ("unet", "vae", "text_encoder")
_WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


@dataclasses.dataclass
class Pipeline:
    """Modules, fp32 params (plain nested dicts), tokenizer and configs of an SD model."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    params: dict[str, Any]
    tokenizer: Any
    scheduler_config: dict
    configs: dict[str, dict]  # the raw config.json of each part (written back on save)
    model_index: dict

    @property
    def vae_scale_factor(self) -> int:
        """Return the pixel size of one latent cell (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Return the (C, H, W) latent shape at the UNet's native sample size."""
        s = self.unet.config.sample_size
        return (self.unet.config.in_channels, s, s)

    def eps_fn(self, unet_params, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        """Return the UNet output for NCHW latents (the sampler's ``eps_fn``)."""
        return self.unet.apply({"params": unet_params}, x, t, context).sample

    def encode_text(self, text_params, input_ids: jax.Array) -> jax.Array:
        """Return (B, L, D) fp32 prompt embeddings (last hidden state) of token ids."""
        out = self.text_encoder.apply({"params": text_params}, input_ids)
        return out.last_hidden_state.astype(jnp.float32)

    def decode_images(self, vae_params, latents: jax.Array) -> jax.Array:
        """Return (B, H, W, 3) fp32 images in [0, 1] from (B, C, h, w) diffusion latents."""
        z = latents / self.vae.config.scaling_factor
        if self.vae.config.shift_factor:
            z = z + self.vae.config.shift_factor
        x = self.vae.apply({"params": vae_params}, z, method=self.vae.decode).sample
        x = jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        return jnp.transpose(x, (0, 2, 3, 1))

    def encode_prompt_ids(self, prompts: list[str]) -> np.ndarray:
        """Return (B, L) int32 token ids padded to the tokenizer's max length, as diffusers."""
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="np",
        )
        return np.asarray(tok["input_ids"], np.int32)


def unet_shapes(unet: UNet2DConditionModel) -> dict:
    """Return the UNet's param shapes (ShapeDtypeStructs) without allocating them."""
    cfg = unet.config
    side = 2 ** len(cfg.block_out_channels)
    x = jax.ShapeDtypeStruct((1, cfg.in_channels, side, side), jnp.float32)
    ctx = jax.ShapeDtypeStruct((1, 1, cfg.cross_attention_dim), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(unet.init, jax.random.key(0), x, t, ctx)["params"]


def vae_shapes(vae: AutoencoderKL) -> dict:
    """Return the VAE's param shapes without allocating them."""
    side = 2 ** len(vae.config.block_out_channels)
    x = jax.ShapeDtypeStruct((1, vae.config.in_channels, side, side), jnp.float32)
    return jax.eval_shape(vae.init, jax.random.key(0), x)["params"]


def text_encoder_shapes(text_encoder: CLIPTextModel) -> dict:
    """Return the text encoder's param shapes without allocating them."""
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    return jax.eval_shape(text_encoder.init, jax.random.key(0), ids)["params"]


def build_modules(
    configs: Mapping[str, Mapping], dtype: jnp.dtype = jnp.float32, remat: bool = False
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """Return (unet, vae, text_encoder) Linen modules from their diffusers/transformers configs."""
    unet = UNet2DConditionModel(UNetConfig.from_dict(configs["unet"]), dtype=dtype, remat=remat)
    vae = AutoencoderKL(VAEConfig.from_dict(configs["vae"]), dtype=dtype)
    te_cfg = configs["text_encoder"]
    te_cls = (
        CLIPTextModelWithProjection
        if "CLIPTextModelWithProjection" in te_cfg.get("architectures", [])
        else CLIPTextModel
    )
    text_encoder = te_cls(CLIPTextConfig.from_dict(te_cfg), dtype=dtype)
    return unet, vae, text_encoder


def load_tokenizer(tokenizer_dir: Path):
    """Return the CLIP tokenizer of a folder holding vocab.json + merges.txt or tokenizer.json."""
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"missing tokenizer folder {tokenizer_dir}")
    has_bpe = (tokenizer_dir / "vocab.json").is_file() and (tokenizer_dir / "merges.txt").is_file()
    if not has_bpe and not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"tokenizer folder {tokenizer_dir} has neither vocab.json + merges.txt "
            f"nor tokenizer.json"
        )
    from transformers import AutoTokenizer, CLIPTokenizer

    if has_bpe:
        return CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def builtin_path(path_or_id: str | os.PathLike) -> str | os.PathLike:
    """Return the folder of a built-in model name ("tiny"), or ``path_or_id`` unchanged."""
    if str(path_or_id) != "tiny":
        return path_or_id
    from dag_jax.tinyworld.assets import TINY_SD

    if not (TINY_SD / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the built-in tiny model is missing from {TINY_SD}; rebuild it with "
            "`python -m dag_jax.tinyworld` (or reinstall dag_jax)"
        )
    return TINY_SD


def load_pipeline(
    path_or_id: str | os.PathLike,
    dtype: jnp.dtype = jnp.float32,
    variant: str | None = None,
    revision: str | None = None,
    remat: bool = False,
) -> Pipeline:
    """Return a Pipeline from a local diffusers folder or a hub repo id (fp32 params).

    ``"tiny"`` is the built-in tiny world shipped in the package (``tinyworld.assets.TINY_SD``).
    """
    root = folder.resolve(builtin_path(path_or_id), revision, variant)
    model_index = folder.read_json(root / "model_index.json")
    configs = {part: folder.read_json(root / part / "config.json") for part in PARTS}
    scheduler_config = folder.read_json(root / "scheduler" / "scheduler_config.json")
    unet, vae, text_encoder = build_modules(configs, dtype, remat)
    shapes = {
        "unet": unet_shapes(unet),
        "vae": vae_shapes(vae),
        "text_encoder": text_encoder_shapes(text_encoder),
    }
    fix_keys = {"text_encoder": with_text_model_prefix}
    params = {
        part: folder.load_params(root / part, shapes[part], part, variant, fix_keys.get(part))
        for part in PARTS
    }
    tokenizer = load_tokenizer(root / "tokenizer")
    return Pipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        params=params,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        configs=configs,
        model_index=model_index,
    )


def save_pipeline(
    pipe: Pipeline,
    out_dir: str | os.PathLike,
    params: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a diffusers folder (PyTorch names, safetensors; no torch needed); return its path.

    ``params`` replaces ``pipe.params`` per part (e.g. a UNet with LoRA merged). The folder is
    written beside ``out_dir`` and renamed into place, so a failure leaves nothing half-written.
    """
    params = {**pipe.params, **(params or {})}
    with folder.AtomicDir(out_dir, overwrite) as tmp:
        for part in PARTS:
            tree = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params[part])
            folder.save_params(tmp / part, tree, pipe.configs[part], _WEIGHT_NAMES[part])
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(pipe.scheduler_config, indent=2, sort_keys=True)
        )
        pipe.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        index = dict(pipe.model_index)
        for optional in ("safety_checker", "feature_extractor", "image_encoder"):
            if optional in index:
                index[optional] = [None, None]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return Path(out_dir)
