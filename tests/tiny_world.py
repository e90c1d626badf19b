"""Tiny random Stable Diffusion folders for offline tests, built with the PyTorch oracles.

Shapes are diffusers' own fast-test shapes (../shared/TESTWORLD.md). Every weight gets small
noise so that zero-initialised output convs cannot make a parity test pass vacuously.
"""

from __future__ import annotations

from pathlib import Path

from dag_jax.tinyworld import random_tiny as tiny


def _kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


SD1_UNET = _kwargs(tiny.UNET_CONFIG)
SD2_UNET = dict(SD1_UNET, attention_head_dim=[2, 4], use_linear_projection=True)
VAE = _kwargs(tiny.VAE_CONFIG)
TEXT = {k: v for k, v in tiny.TEXT_CONFIG.items() if k not in ("architectures", "model_type")}
SCHEDULER = _kwargs(tiny.SCHEDULER_CONFIG)
write_byte_tokenizer = tiny.write_byte_tokenizer


def perturb_(module, scale: float = 0.02, seed: int = 0):
    """Add N(0, scale²) noise to every parameter in place; return the module in eval mode."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def build_torch_pipeline(tmp: Path, unet_config: dict = SD1_UNET, seed: int = 0):
    """Return a tiny random diffusers StableDiffusionPipeline (PyTorch, fp32, DDIM)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_byte_tokenizer(tmp / "_tokenizer_src")))
    torch.manual_seed(seed)
    unet = perturb_(UNet2DConditionModel(**unet_config), seed=seed)
    vae = perturb_(AutoencoderKL(**VAE), seed=seed + 1)
    text = perturb_(CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT)), seed=seed + 2)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_torch_pipeline(pipe, folder: Path, **kwargs) -> Path:
    """Save a diffusers pipeline with safetensors and return the folder."""
    pipe.save_pretrained(str(folder), safe_serialization=True, **kwargs)
    return folder
