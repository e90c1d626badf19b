"""JPEG (in)compressibility rewards (SPEC §8; DDPO's ``jpeg_(in)compressibility``).

The score is the size in kB (bytes / 1000) of the image saved by PIL as a JPEG at quality 95,
exactly as ddpo-pytorch's ``rewards.py`` does (``Image.fromarray(uint8 HWC RGB).save(buffer,
format="JPEG", quality=95)`` then ``buffer.tell() / 1000``): positive for incompressibility,
negative for compressibility. PIL's other JPEG settings stay at their defaults (4:2:0 chroma
subsampling at quality 95, no optimisation, baseline), as in the reference.

Both run on the host through ``jax.pure_callback`` (``rewards.base.host_reward``), so they can sit
inside a jitted (and vmapped) train step; the prompts are ignored.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dag_jax.rewards.base import Reward, RewardError, host_reward

QUALITY = 95


def jpeg_size_kb(image: np.ndarray, quality: int = QUALITY) -> float:
    """Return the size in kB (bytes / 1000) of one uint8 (H, W, 3) RGB image as a PIL JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


def jpeg_sizes_kb(images: np.ndarray, quality: int = QUALITY) -> np.ndarray:
    """Return the (B,) float32 JPEG sizes in kB of uint8 (B, H, W, 3) images."""
    return np.asarray([jpeg_size_kb(image, quality) for image in images], np.float32)


def incompressibility(quality: int = QUALITY) -> Reward:
    """Return the reward ``+size_kB`` of the quality-``quality`` JPEG (SPEC: quality 95)."""
    quality = _check_quality(quality)

    def fn(images: np.ndarray, prompts: list[str]) -> np.ndarray:
        del prompts
        return jpeg_sizes_kb(images, quality)

    return host_reward("jpeg_incompressibility", fn, {"quality": quality})


def compressibility(quality: int = QUALITY) -> Reward:
    """Return the reward ``-size_kB`` of the quality-``quality`` JPEG (SPEC: quality 95)."""
    quality = _check_quality(quality)

    def fn(images: np.ndarray, prompts: list[str]) -> np.ndarray:
        del prompts
        return -jpeg_sizes_kb(images, quality)

    return host_reward("jpeg_compressibility", fn, {"quality": quality})


def _check_quality(quality: int) -> int:
    """Return ``quality`` as an int, raising RewardError unless it is in [1, 100]."""
    if isinstance(quality, bool) or not isinstance(quality, int | np.integer):
        raise RewardError(f"JPEG quality must be an int in [1, 100], got {quality!r}")
    if not 1 <= int(quality) <= 100:
        raise RewardError(f"JPEG quality must be in [1, 100], got {quality}")
    return int(quality)
