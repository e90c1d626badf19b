"""A randomly initialised Stable Diffusion in diffusers' tiny test shapes, built without files.

Used by ``--model=random-tiny`` (sample, and later train/bench) and by tests: it exercises
every code path of a real SD model in seconds on a CPU. Its images are meaningless.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "use_linear_projection": False,
    "upcast_attention": False,
}
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}
TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _byte_symbols() -> list[str]:
    """Return the 256 printable stand-ins of byte-level BPE, in byte order."""
    printable = set(range(33, 127)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_byte_tokenizer(
    folder: Path, merges: tuple[str, ...] = (), model_max_length: int = 77
) -> Path:
    """Write a CLIPTokenizer-compatible byte-level BPE (vocab.json, merges.txt); return folder.

    The vocabulary is the 256 byte symbols, each also with ``</w>``, one entry per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (also the pad token): ~520 ids. A merged token
    string that is already in the vocabulary (e.g. a single byte) gets no new id.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = merges or ("a t</w>", "c a", "d o", "do g</w>", "t h", "th e</w>", "o n</w>")
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def random_tiny_pipeline(seed: int = 0, dtype: jnp.dtype = jnp.float32):
    """Return a Pipeline with Linen-initialised random weights in the tiny SD shapes."""
    from dag_jax.pipeline import (
        Pipeline,
        build_modules,
        load_tokenizer,
        text_encoder_shapes,
        unet_shapes,
        vae_shapes,
    )

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(write_byte_tokenizer(Path(tmp) / "tokenizer"))
    text_config = dict(TEXT_CONFIG, vocab_size=len(tokenizer))
    configs = {"unet": UNET_CONFIG, "vae": VAE_CONFIG, "text_encoder": text_config}
    unet, vae, text_encoder = build_modules(configs, dtype)
    shapes = {
        "unet": unet_shapes(unet),
        "vae": vae_shapes(vae),
        "text_encoder": text_encoder_shapes(text_encoder),
    }
    rng = np.random.default_rng(seed)
    params = {}
    for part, tree in shapes.items():
        flat = traverse_util.flatten_dict(tree)
        params[part] = traverse_util.unflatten_dict(
            {
                path: (
                    0.05 * rng.standard_normal(spec.shape, dtype=np.float32)
                    + (1.0 if path[-1] == "scale" else 0.0)
                )
                for path, spec in sorted(flat.items())
            }
        )
    return Pipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        params=params,
        tokenizer=tokenizer,
        scheduler_config=dict(SCHEDULER_CONFIG),
        configs={part: dict(c) for part, c in configs.items()},
        model_index=dict(MODEL_INDEX),
    )
