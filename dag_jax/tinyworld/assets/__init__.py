"""Weights shipped with the package: the built-in tiny text-to-image world (issue 7).

``TINY_SD`` is a diffusers folder (model_index.json, unet, vae, text_encoder, tokenizer,
scheduler) loaded by ``dag_jax.load_pipeline("tiny")``; ``TINY_CLIP`` is a transformers
``CLIPModel`` folder (vision + text towers, tokenizer) loaded by
``dag_jax.weights.clip_loader.load_clip``. Both are written by ``python -m dag_jax.tinyworld``.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
TINY_SD = ROOT / "tiny_sd"
TINY_CLIP = ROOT / "tiny_clip"
