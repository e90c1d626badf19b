"""Load Inception-v3 weights (torchvision ``Inception3`` keys) into ``models.inception``.

    module, params = load_inception("pt_inception-2015-12-05-6726825d.pth")   # FID's weights

Accepted files: pytorch-fid's port of the FID graph (``pt_inception-2015-12-05-*.pth``, 1008
classes), torchvision's ImageNet ``inception_v3_google-*.pth`` (1000 classes), or either saved
as ``.safetensors``. PyTorch pickles are read only with ``torch.load(weights_only=True)``.
The classifier (``fc.*``) and auxiliary head (``AuxLogits.*``) are dropped (FID uses the pool
features); BatchNorm's ``num_batches_tracked`` is ignored. The variant, when not given, is
read off the classifier: 1008 rows → ``fid``, 1000 → ``torchvision``; a file without ``fc``
is taken as ``fid`` (the purpose of loading Inception here), with a log line saying so.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.models.inception import InceptionV3, check_variant
from dag_jax.weights import diffusers as folder
from dag_jax.weights.convert import WeightsError, literal_torch_key, torch_to_linen

log = logging.getLogger("dag_jax.weights.inception")

_DROPPED_PREFIXES = ("fc.", "AuxLogits.")
_CLASSES_TO_VARIANT = {1008: "fid", 1000: "torchvision"}


def inception_param_shapes(module: InceptionV3, size: int = 299) -> dict:
    """Return the Linen param tree of ``module`` as ShapeDtypeStructs (no compute)."""
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), x)["params"]


def infer_variant(state: dict[str, np.ndarray], where: str = "checkpoint") -> str:
    """Return ``fid`` or ``torchvision`` from the number of classes of ``fc.weight``."""
    fc = state.get("fc.weight")
    if fc is None:
        log.info("%s has no classifier (fc.weight); taking it as the FID Inception", where)
        return "fid"
    variant = _CLASSES_TO_VARIANT.get(int(fc.shape[0]))
    if variant is None:
        raise WeightsError(
            f"{where}: fc.weight has {fc.shape[0]} classes; expected 1008 (FID's Inception) or "
            f"1000 (torchvision's); pass the variant explicitly"
        )
    return variant


def inception_params(
    state: dict[str, np.ndarray], variant: str | None = None, where: str = "checkpoint"
) -> tuple[InceptionV3, dict]:
    """Return (module, params) from a torchvision-keyed Inception-v3 state dict."""
    variant = check_variant(variant) if variant else infer_variant(state, where)
    kept = {k: v for k, v in state.items() if not k.startswith(_DROPPED_PREFIXES)}
    module = InceptionV3(variant=variant)
    params = torch_to_linen(
        kept, inception_param_shapes(module), f"Inception-v3 ({where})", literal_torch_key
    )
    params = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), params)
    return module, params


def load_inception(path: str | os.PathLike, variant: str | None = None) -> tuple[InceptionV3, dict]:
    """Return (module, params) of an Inception-v3 weights file (see the module docstring)."""
    state = folder.read_weights_file(path)
    return inception_params(state, variant, where=str(path))
