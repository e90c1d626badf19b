"""Key and layout rules between PyTorch state dicts and Linen params, both directions.

Conversion is driven by the *target* tree (the shapes a Linen module expects, from
``jax.eval_shape(module.init, ...)``): every Linen leaf names exactly one PyTorch key, so missing,
unexpected and wrongly shaped weights are all found and reported together.

Rules (see ../shared/WEIGHTS.md): a segment ``name_N`` is PyTorch ``name.N`` except the real
names ``linear_1``/``linear_2``; ``kernel`` is ``weight`` transposed (conv OIHW ⇄ HWIO, linear
(out, in) ⇄ (in, out)); ``scale`` and ``embedding`` are ``weight`` as is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

# Segments that end in ``_<digits>`` but are real PyTorch attribute names.
REAL_NAMES = frozenset({"linear_1", "linear_2"})
# PyTorch buffers that carry no learned weight and are dropped on load.
IGNORED_TORCH_KEYS = (
    re.compile(r"(^|\.)position_ids$"),
    re.compile(r"(^|\.)num_batches_tracked$"),  # BatchNorm's step counter
)
# Legacy attention names (old VAE checkpoints, diffusers-Flax msgpack) → current names.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}

_INDEXED = re.compile(r"^(.+)_(\d+)$")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_MAX_LISTED = 25


class WeightsError(ValueError):
    """Weights that do not fit the model: lists missing, unexpected and mis-shaped keys."""


def _segment_to_torch(segment: str) -> str:
    match = _INDEXED.match(segment)
    if match and segment not in REAL_NAMES:
        return f"{match.group(1)}.{match.group(2)}"
    return segment


def torch_key(path: tuple[str, ...]) -> str:
    """Return the PyTorch state-dict key of a Linen param path."""
    *modules, leaf = path
    return ".".join([_segment_to_torch(s) for s in modules] + [_LEAF_TO_TORCH.get(leaf, leaf)])


def literal_torch_key(path: tuple[str, ...]) -> str:
    """Return the PyTorch key of a path whose module names are PyTorch's own (no ``_N`` rule).

    For models whose attribute names end in digits (Inception's ``branch3x3_1``).
    """
    *modules, leaf = path
    return ".".join([*modules, _LEAF_TO_TORCH.get(leaf, leaf)])


def _legacy_torch_keys(path: tuple[str, ...]) -> list[str]:
    """Return the legacy PyTorch spellings a path may have (VAE query/key/value/proj_attn)."""
    inverse = {v: k for k, v in LEGACY_ATTENTION.items()}
    if len(path) >= 2 and path[-2] in inverse:
        return [torch_key(path[:-2] + (inverse[path[-2]], path[-1]))]
    return []


def _to_linen(leaf: str, value: np.ndarray, want_ndim: int) -> np.ndarray:
    if leaf != "kernel":
        return value
    if value.ndim == 4 and want_ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 4 and want_ndim == 2 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]  # a 1x1 conv used as a linear layer (old LDM VAE attention)
    if value.ndim == 2:
        return value.T
    return value


def _to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf != "kernel":
        return value
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:
        return value.T
    return value


def _report(what: str, missing: Iterable[str], unexpected: Iterable[str], shapes: list[str]):
    missing, unexpected = sorted(missing), sorted(unexpected)
    if not (missing or unexpected or shapes):
        return
    parts = [f"weights do not fit {what}:"]
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            shown = "\n    ".join(items[:_MAX_LISTED])
            extra = len(items) - _MAX_LISTED
            more = f"\n    ... and {extra} more" if extra > 0 else ""
            parts.append(f"  {len(items)} {title}:\n    {shown}{more}")
    raise WeightsError("\n".join(parts))


def torch_to_linen(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping,
    what: str = "model",
    key_fn: Callable[[tuple[str, ...]], str] = torch_key,
) -> dict:
    """Return a Linen params tree shaped like ``target`` from a PyTorch state dict.

    ``target`` is a nested dict whose leaves have ``.shape`` (arrays or ShapeDtypeStructs);
    ``key_fn`` names a path's PyTorch key. Raises WeightsError naming every missing,
    unexpected or mis-shaped key.
    """
    flat_target = traverse_util.flatten_dict(dict(target))
    used: set[str] = set()
    missing, shapes = [], []
    out = {}
    for path, spec in flat_target.items():
        candidates = [key_fn(path)] + (_legacy_torch_keys(path) if key_fn is torch_key else [])
        key = next((k for k in candidates if k in state_dict), None)
        if key is None:
            missing.append(f"{candidates[0]} {tuple(spec.shape)}")
            continue
        used.add(key)
        value = _to_linen(path[-1], np.asarray(state_dict[key]), len(spec.shape))
        if tuple(value.shape) != tuple(spec.shape):
            shapes.append(
                f"{key}: checkpoint {tuple(np.shape(state_dict[key]))} -> {tuple(value.shape)}, "
                f"model expects {tuple(spec.shape)}"
            )
            continue
        out[path] = value
    unexpected = [
        k for k in state_dict if k not in used and not any(p.search(k) for p in IGNORED_TORCH_KEYS)
    ]
    _report(what, missing, unexpected, shapes)
    return traverse_util.unflatten_dict(out)


def linen_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """Return a flat PyTorch-named state dict (numpy arrays) from a Linen params tree."""
    flat = traverse_util.flatten_dict(dict(params))
    return {
        torch_key(path): _contiguous(_to_torch(path[-1], np.asarray(v))) for path, v in flat.items()
    }


def _contiguous(value: np.ndarray) -> np.ndarray:
    """Return a C-contiguous copy-if-needed with the same shape (0-d scalars stay 0-d)."""
    return np.ascontiguousarray(value).reshape(value.shape)


def rename_legacy_attention(params: Mapping) -> dict:
    """Return a params tree with legacy ``query/key/value/proj_attn`` renamed to ``to_q…``."""
    flat = traverse_util.flatten_dict(dict(params))
    renamed = {}
    for path, value in flat.items():
        path = tuple(
            LEGACY_ATTENTION.get(s, s) if i < len(path) - 1 else s for i, s in enumerate(path)
        )
        renamed[path] = value
    return traverse_util.unflatten_dict(renamed)


def check_tree(params: Mapping, target: Mapping, what: str = "model") -> dict:
    """Return ``params`` as a plain nested dict after checking it has exactly target's shapes."""
    flat = traverse_util.flatten_dict(dict(params))
    flat_target = traverse_util.flatten_dict(dict(target))
    join = "/".join
    missing = [f"{join(p)} {tuple(s.shape)}" for p, s in flat_target.items() if p not in flat]
    unexpected = [join(p) for p in flat if p not in flat_target]
    shapes = [
        f"{join(p)}: checkpoint {tuple(np.shape(v))}, model expects {tuple(flat_target[p].shape)}"
        for p, v in flat.items()
        if p in flat_target and tuple(np.shape(v)) != tuple(flat_target[p].shape)
    ]
    _report(what, missing, unexpected, shapes)
    return traverse_util.unflatten_dict(flat)
