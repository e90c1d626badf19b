"""In-graph CLIP preprocessing against transformers' PIL-path CLIPImageProcessor and Pillow.

Tolerances: ``method="pil"`` reproduces PIL's resized uint8 image bit for bit, so pixel_values
differ only by float32 rounding (≤ 1e-5). ``method="jax"`` skips PIL's two uint8 roundings (one
after each separable pass, ≤ ½ level each), so it may differ by ~1 uint8 level: 1/255/std ≈
0.015 in pixel_values (measured ≤ 0.017 on noise); we allow 1.5 levels max and 0.4 level mean
(a uniform rounding error averages ~0.3 level).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import PIL
import pytest
import torch
import transformers
from PIL import Image
from transformers.image_transforms import get_resize_output_image_size

from dag_jax.rewards.preprocess import (
    CLIP_STD,
    center_crop,
    clip_preprocess,
    pil_bicubic_taps,
    pil_vertical_first,
    resize_pil,
    resize_shortest_edge,
    resized_size,
)

LEVEL = 1 / 255 / min(CLIP_STD)  # one uint8 level in pixel_values
PIL_TOL = 1e-5
JAX_MAX_TOL = 1.5 * LEVEL
JAX_MEAN_TOL = 0.4 * LEVEL
SIZES = [(64, 64), (512, 512), (300, 200), (200, 300), (150, 100), (768, 512)]
HEAD_PTH = Path(__file__).resolve().parents[2] / "shared/data/weights"
HEAD_PTH = HEAD_PTH / "sac+logos+ava1-l14-linearMSE.pth"
# Pillow 13 resizes vertically first when the height shrinks by > 2x the width's pixel count.
LEGACY_PIL = int(PIL.__version__.split(".")[0]) < 13


@functools.cache
def processor():
    """Return transformers' PIL-backend CLIP image processor (the references' path)."""
    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    return cls()


def reference(images: np.ndarray) -> np.ndarray:
    """Return the processor's (B, 3, 224, 224) pixel_values of uint8 (B, H, W, 3) images."""
    return processor()(images=list(images), return_tensors="np")["pixel_values"]


@functools.partial(jax.jit, static_argnames=("method", "layout"))
def preprocess(x: jax.Array, method: str = "pil", layout: str = "NCHW") -> jax.Array:
    """Jitted clip_preprocess (224 px)."""
    return clip_preprocess(x, method=method, layout=layout)


def random_images(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Return uniform random uint8 (b, h, w, 3) images (worst case for rounding)."""
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def to_float(images: np.ndarray) -> jax.Array:
    """Return uint8 images as float32 in [0, 1]."""
    return jnp.asarray(images, jnp.float32) / 255.0


def test_resized_size_matches_transformers():
    rng = np.random.default_rng(0)
    shapes = [(300, 200), (200, 300), (224, 224), (225, 224), (333, 250), (1000, 37), (7, 9)]
    shapes += [tuple(int(v) for v in rng.integers(1, 2000, 2)) for _ in range(300)]
    for size in (224, 336, 7):
        for h, w in shapes:
            want = get_resize_output_image_size(
                np.zeros((3, h, w), np.uint8),
                size,
                default_to_square=False,
                input_data_format="channels_first",
            )
            assert resized_size(h, w, size) == tuple(want), (h, w, size)


def test_pil_taps_are_normalised_fixed_point():
    for n_in, n_out in [(512, 224), (64, 224), (300, 224), (1000, 37)]:
        index, weight = pil_bicubic_taps(n_in, n_out)
        assert index.shape == weight.shape and index.shape[0] == n_out
        assert index.min() >= 0 and index.max() < n_in
        np.testing.assert_allclose(weight.sum(1), 1 << 22, atol=weight.shape[1])


@pytest.mark.parametrize(
    "h,w,oh,ow",
    [(512, 512, 224, 224), (64, 64, 224, 224), (300, 200, 336, 224), (1000, 37, 100, 20)]
    + [(86, 31, 53, 22), (100, 100, 60, 81), (100, 100, 60, 80), (50, 50, 40, 200)]
    + [(13, 45, 82, 227), (7, 9, 224, 300), (224, 231, 224, 224)],
)
def test_resize_pil_is_bit_exact(h, w, oh, ow):
    img = random_images(2, h, w, seed=h * w)
    got = jax.jit(resize_pil, static_argnums=(1, 2))(to_float(img), (oh, ow), LEGACY_PIL)
    got = np.round(np.asarray(got) * 255).astype(np.uint8)
    want = np.stack([np.asarray(Image.fromarray(i).resize((ow, oh), Image.BICUBIC)) for i in img])
    np.testing.assert_array_equal(got, want)


def test_pil_pass_order_rule():
    assert not pil_vertical_first((512, 512), (224, 224))  # square: horizontal first
    assert not pil_vertical_first((64, 64), (224, 224))
    assert pil_vertical_first((100, 100), (60, 81))  # dh 40 > 2 * dw 38
    assert not pil_vertical_first((100, 100), (60, 80))  # dh 40 == 2 * dw 40
    assert pil_vertical_first((50, 50), (40, 200))  # width grows, height shrinks
    assert not pil_vertical_first((50, 50), (52, 200))
    assert not pil_vertical_first((1000, 37), (100, 20), legacy=True)


@pytest.mark.parametrize("h,w", SIZES)
def test_matches_clip_image_processor(h, w):
    img = random_images(2, h, w, seed=h + w)
    want = reference(img)
    x = to_float(img)
    report = []
    tolerances = (("pil", PIL_TOL, PIL_TOL), ("jax", JAX_MAX_TOL, JAX_MEAN_TOL))
    for method, max_tol, mean_tol in tolerances:
        got = np.asarray(preprocess(x, method=method))
        assert got.shape == want.shape == (2, 3, 224, 224) and got.dtype == np.float32
        diff = np.abs(got - want)
        report.append(f"{method}: max {diff.max():.2g} mean {diff.mean():.2g}")
        assert diff.max() <= max_tol and diff.mean() <= mean_tol, (method, report)
    print(f"\n{h}x{w} pixel_values |Δ| vs CLIPImageProcessor: " + "; ".join(report))


def test_nhwc_layout_and_float_inputs():
    img = random_images(2, 300, 200, seed=3)
    nchw = preprocess(to_float(img))
    nhwc = preprocess(to_float(img), layout="NHWC")
    assert nhwc.shape == (2, 224, 224, 3)
    np.testing.assert_allclose(np.asarray(nhwc), np.asarray(nchw).transpose(0, 2, 3, 1), atol=1e-6)
    # Already-224 square input: no resize, just crop and normalise.
    img = random_images(1, 224, 224, seed=4)
    np.testing.assert_allclose(np.asarray(preprocess(to_float(img))), reference(img), atol=PIL_TOL)


def test_center_crop_offsets():
    x = jnp.arange(5 * 8, dtype=jnp.float32).reshape(1, 5, 8, 1)
    np.testing.assert_array_equal(np.asarray(center_crop(x, 3))[0, :, :, 0], x[0, 1:4, 2:5, 0])
    with pytest.raises(ValueError, match="larger"):
        center_crop(x, 6)


def test_bad_arguments():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="method"):
        clip_preprocess(x, method="bilinear")
    with pytest.raises(ValueError, match="layout"):
        clip_preprocess(x, layout="CHW")
    with pytest.raises(ValueError, match="NHWC"):
        resize_shortest_edge(jnp.zeros((1, 3, 32, 32)))


@functools.cache
def tiny_vision_tower():
    """Return a tiny random transformers CLIPVisionModelWithProjection (224 px, 768-d embeds)."""
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=768,
    )
    model = transformers.CLIPVisionModelWithProjection(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def embed(pixel_values: np.ndarray) -> np.ndarray:
    """Return the tiny tower's image_embeds of NCHW pixel_values."""
    with torch.no_grad():
        out = tiny_vision_tower()(pixel_values=torch.from_numpy(np.array(pixel_values)))
    return out.image_embeds.numpy()


def test_downstream_embedding_difference():
    img = random_images(4, 512, 512, seed=7)
    want_px = reference(img)
    want = embed(want_px)
    scale = float(np.abs(want).max())
    head = None
    if HEAD_PTH.is_file():
        from dag_jax.rewards.aesthetic_head import aesthetic_score, load_aesthetic_head

        head = load_aesthetic_head(HEAD_PTH)
    lines = []
    for method, abs_tol, cos_tol in (("pil", 1e-5 * scale, 1e-6), ("jax", 1e-2 * scale, 1e-4)):
        got = embed(np.asarray(preprocess(to_float(img), method=method)))
        cos = np.sum(got * want, -1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        d_abs, d_cos = float(np.abs(got - want).max()), float(1 - cos.min())
        line = f"{method}: embeds max|Δ| {d_abs:.2g} (max |e| {scale:.2g}), 1-cos {d_cos:.2g}"
        if head is not None:
            d_score = np.abs(np.asarray(aesthetic_score(head, got) - aesthetic_score(head, want)))
            line += f", aesthetic score max|Δ| {d_score.max():.2g}"
        lines.append(line)
        assert d_abs <= abs_tol and d_cos <= cos_tol, lines
    print("\n512x512 noise through a tiny CLIP tower: " + "; ".join(lines))
