"""Image feature extractors for the diversity and Fréchet metrics of the evaluation (SPEC §9).

    extractor = load_feature_extractor("openai/clip-vit-large-patch14")   # or a CLIP folder
    feats = extractor(images)            # (N, H, W, 3) float in [0, 1] → (N, D) float32

A ``FeatureExtractor`` is anything with a ``name`` (recorded in eval.json) and a
``__call__(images) -> (N, D) features``. ``load_feature_extractor(spec)`` understands:

- a transformers ``CLIPModel`` folder or hub id (the default; ``openai/clip-vit-large-patch14``
  for SD runs, ``tinyworld.assets.TINY_CLIP`` for the tiny world): ``ClipFeatures``, the projected
  image embedding ``get_image_features`` of the Linen CLIP vision tower after the aesthetic
  reward's in-graph CLIP preprocessing (quantise, bicubic resize, center crop, mean/std);
- ``pixels`` or ``pixels:S``: ``PixelFeatures``, the image resized to S × S (default 16) and
  flattened; needs no weights (a fallback, not a perceptual metric);
- ``inception:FILE``: ``InceptionFeatures``, the 2048-d pool features of the Linen Inception-v3
  (``models.inception``) with the weights in FILE: pytorch-fid's port of FID's graph
  (``pt_inception-2015-12-05-6726825d.pth``, so the Fréchet distance is FID proper) or
  torchvision's ImageNet ``inception_v3`` (``weights/inception.py``). Images are quantised to
  uint8 levels, resized bilinearly to 299 × 299 and scaled to [-1, 1], as pytorch-fid does.
  No Inception weights ship with dag_jax;
- ``package.module:factory``: ``factory()`` (no arguments) returns the extractor (e.g. a
  DreamSim tower).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("dag_jax.eval.features")

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
TINY_MODELS = ("tiny", "random-tiny")


class FeatureExtractor(Protocol):
    """Maps (N, H, W, 3) float images in [0, 1] to (N, D) float32 features."""

    name: str

    def __call__(self, images: Any) -> np.ndarray: ...


@dataclasses.dataclass
class ClipFeatures:
    """CLIP image embeddings (``get_image_features``, not normalised) of a Linen CLIP tower."""

    source: str
    module: Any
    params: dict
    preprocess: str = "pil"

    def __post_init__(self):
        from dag_jax.rewards.aesthetic import image_features
        from dag_jax.rewards.base import quantize

        module, method = self.module, self.preprocess
        self._fn = jax.jit(lambda p, x: image_features(module, p, quantize(x), method))

    @property
    def name(self) -> str:
        """Return ``clip:<folder or hub id>``."""
        return f"clip:{self.source}"

    def __call__(self, images: Any) -> np.ndarray:
        """Return (N, projection_dim) float32 embeddings of (N, H, W, 3) images in [0, 1]."""
        return np.asarray(self._fn(self.params, jnp.asarray(images, jnp.float32)), np.float32)


def clip_features(path_or_id: str, preprocess: str = "pil") -> ClipFeatures:
    """Return ClipFeatures of a transformers CLIPModel folder or hub id (vision tower only)."""
    from dag_jax.rewards.aesthetic import device_params, vision_params
    from dag_jax.weights.clip_loader import load_clip

    module, params, _ = load_clip(path_or_id)
    return ClipFeatures(str(path_or_id), module, device_params(vision_params(params)), preprocess)


@dataclasses.dataclass
class PixelFeatures:
    """The image resized (antialiased, bilinear) to ``size`` × ``size`` and flattened."""

    size: int = 16

    def __post_init__(self):
        size = self.size
        self._fn = jax.jit(
            lambda x: jax.image.resize(
                x, (x.shape[0], size, size, x.shape[-1]), "linear", antialias=True
            ).reshape(x.shape[0], -1)
        )

    @property
    def name(self) -> str:
        """Return ``pixels:<size>``."""
        return f"pixels:{self.size}"

    def __call__(self, images: Any) -> np.ndarray:
        """Return (N, 3·size²) float32 features of (N, H, W, 3) images in [0, 1]."""
        return np.asarray(self._fn(jnp.asarray(images, jnp.float32)), np.float32)


@dataclasses.dataclass
class InceptionFeatures:
    """Inception-v3 pool features (N, 2048) of images resized to ``size`` (299 for FID)."""

    source: str
    module: Any
    params: dict
    size: int = 299

    def __post_init__(self):
        from dag_jax.models.inception import preprocess
        from dag_jax.rewards.base import quantize

        module, size = self.module, self.size
        self._fn = jax.jit(lambda p, x: module.apply({"params": p}, preprocess(quantize(x), size)))

    @property
    def name(self) -> str:
        """Return ``inception-<variant>:<file>``."""
        return f"inception-{self.module.variant}:{self.source}"

    def __call__(self, images: Any) -> np.ndarray:
        """Return (N, 2048) float32 pool features of (N, H, W, 3) images in [0, 1]."""
        return np.asarray(self._fn(self.params, jnp.asarray(images, jnp.float32)), np.float32)


def inception_features(path: str, variant: str | None = None, size: int = 299):
    """Return InceptionFeatures with the Inception-v3 weights file at ``path``."""
    from dag_jax.weights.inception import load_inception

    module, params = load_inception(path, variant)
    return InceptionFeatures(str(path), module, jax.device_put(params), size)


def _factory(spec: str):
    """Return the callable named by ``module:function``, or None when ``spec`` is not one."""
    if spec.count(":") != 1 or Path(spec).expanduser().exists():
        return None
    module, fn = spec.split(":")
    if not module or not fn or not all(part.isidentifier() for part in module.split(".")):
        return None
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"feature model {spec!r}: cannot import {fn} from {module} ({e})") from e


def load_feature_extractor(spec: str) -> FeatureExtractor:
    """Return the extractor ``spec`` names (see the module docstring for the forms)."""
    spec = str(spec)
    if spec == "pixels" or spec.startswith("pixels:"):
        _, _, size = spec.partition(":")
        return PixelFeatures(int(size) if size else 16)
    if spec.startswith("inception:"):
        return inception_features(spec.partition(":")[2])
    factory = _factory(spec)
    if factory is not None:
        return factory()
    return clip_features(spec)


def default_feature_model(model: str) -> str:
    """Return the default feature model of a run on diffusion model ``model``.

    Runs on the tiny world (``tiny``, ``random-tiny`` or the shipped tiny SD folder) use the
    shipped tiny CLIP (``tinyworld.assets.TINY_CLIP``), or ``pixels`` with a warning while it is
    not there; every other run uses ``openai/clip-vit-large-patch14``.
    """
    try:
        from dag_jax.tinyworld import assets
    except ImportError:  # pragma: no cover - the package ships assets
        assets = None
    tiny_sd = getattr(assets, "TINY_SD", None)
    is_tiny = model in TINY_MODELS or (
        tiny_sd is not None and Path(model).expanduser().resolve() == Path(tiny_sd).resolve()
    )
    if not is_tiny:
        return DEFAULT_CLIP
    tiny_clip = getattr(assets, "TINY_CLIP", None)
    if tiny_clip is not None and (Path(tiny_clip) / "config.json").is_file():
        return str(tiny_clip)
    log.warning(
        "The tiny CLIP (tinyworld.assets.TINY_CLIP) is not installed; diversity uses raw pixel "
        "features. Pass --feature_model=<CLIP folder> for embeddings."
    )
    return "pixels"
