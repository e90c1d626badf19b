"""The tiny world's model shapes, in diffusers / transformers ``config.json`` form.

Sizes are chosen so that the whole world pretrains in about two hours on 2 CPU cores and ships in
well under 30 MB, while keeping every architectural feature of SD1.x: a KL autoencoder with 4
latent channels (shipped: 4× down, 64-px images ↔ 4×16×16 latents, ``vae_config(4)``; SD's 8×,
``VAE_CONFIG``, drew every shape as a blob), a UNet with cross-attention down/up blocks
(``unet_config``) and a CLIP text encoder whose last hidden state conditions it. The SD text
encoder is the text tower of the stage-2 CLIP, as SD1.x's is OpenAI CLIP's; the shipped
``tiny_clip`` (the judge) has the same shapes, trained further (``pretrain.train_judge``).
"""

from __future__ import annotations

from dag_jax.tinyworld import random_tiny as tiny

IMAGE_SIZE = 64
TOKEN_LENGTH = 16  # captions are ≤ 9 tokens with BOS/EOS
HIDDEN = 64

# SD1's shapes as diffusers' tiny test model (``random_tiny``), resized for 8×8 latents (the first
# world's UNet; ``unet_config(16)`` is the shipped one)
UNET_CONFIG = dict(
    tiny.UNET_CONFIG,
    sample_size=8,
    block_out_channels=[64, 128],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=HIDDEN,
    attention_head_dim=[4, 8],  # SD1 naming: the number of heads (head size 16)
)

VAE_CONFIG = dict(
    tiny.VAE_CONFIG,
    block_out_channels=[16, 32, 32, 64],  # 4 blocks: 8× downsampling, as SD
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    norm_num_groups=8,
    scaling_factor=1.0,  # replaced by 1 / std of the trained encoder's latents
)


def vae_config(down: int = 8) -> dict:
    """Return the VAE config for ``down``× downsampling: 8 (``VAE_CONFIG``, 4×8×8 latents) or
    4 (3 blocks of 16/32/64 channels, 4×16×16 latents: the 8× VAE draws every shape as a blob,
    BENCHMARKS.md, "The tiny world")."""
    if down == 8:
        return dict(VAE_CONFIG)
    if down == 4:
        return dict(
            VAE_CONFIG,
            block_out_channels=[16, 32, 64],
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
        )
    raise ValueError(f"the tiny VAE downsamples 8× or 4×, not {down}×")


def unet_config(latent_side: int = 8) -> dict:
    """Return the UNet config for ``latent_side``² latents: 8 (``UNET_CONFIG``) or 16 (a plain
    16×16 level of 32 channels before ``UNET_CONFIG``'s two: 1.4× its forward time, 1.5× its
    gradient's at batch 64 on 2 CPU cores)."""
    if latent_side == 8:
        return dict(UNET_CONFIG)
    if latent_side == 16:
        return dict(
            UNET_CONFIG,
            sample_size=16,
            block_out_channels=[32, 64, 128],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            attention_head_dim=[2, 4, 8],
            norm_num_groups=16,
        )
    raise ValueError(f"the tiny UNet takes 8×8 or 16×16 latents, not {latent_side}×{latent_side}")


def text_config(vocab_size: int, bos: int, eos: int, pad: int) -> dict:
    """Return the CLIP text tower config (also the SD text encoder's) for a tokenizer."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": 4 * HIDDEN,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": TOKEN_LENGTH,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "projection_dim": HIDDEN,
    }


def vision_config() -> dict:
    """Return the CLIP ViT config: 8-px patches of a 64-px image (64 tokens + class token)."""
    return {
        "hidden_size": HIDDEN,
        "intermediate_size": 4 * HIDDEN,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        "num_channels": 3,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": HIDDEN,
    }


def clip_config(vocab_size: int, bos: int, eos: int, pad: int) -> dict:
    """Return the transformers ``CLIPModel`` config.json of the tiny CLIP."""
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": HIDDEN,
        "logit_scale_init_value": 2.6592,
        "text_config": dict(text_config(vocab_size, bos, eos, pad), model_type="clip_text_model"),
        "vision_config": dict(vision_config(), model_type="clip_vision_model"),
    }


def sd_text_encoder_config(clip: dict) -> dict:
    """Return the SD ``text_encoder/config.json`` (a CLIPTextModel) of the CLIP's text tower."""
    cfg = {k: v for k, v in clip["text_config"].items() if k != "projection_dim"}
    return dict(cfg, architectures=["CLIPTextModel"], model_type="clip_text_model")


SCHEDULER_CONFIG = dict(tiny.SCHEDULER_CONFIG)
MODEL_INDEX = dict(tiny.MODEL_INDEX)
PREPROCESSOR_CONFIG = {  # transformers CLIPImageProcessor: a 64-px image passes unchanged
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": IMAGE_SIZE},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}
