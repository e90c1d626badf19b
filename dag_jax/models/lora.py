"""LoRA as its own param tree on the UNet attention projections; merge into base params.

The LoRA tree mirrors the UNet's module paths and lives in the ``lora`` variable collection:
``{"down_blocks_1": {"attentions_0": {... {"attn1": {"to_q": {"A": (in, r), "B": (r, out)}}}}}}``.
An adapted projection computes x W + (α/r)·(x A) B (Linen (in, out) layout), so

    unet.apply({"params": base, "lora": lora}, x, t, ctx)      # with UNet(lora_scale=α/r)

differentiates with respect to ``lora`` alone while the base stays frozen. A ~ N(0, 1/r²) and
B = 0, so the adapted model starts equal to the base. PEFT's ``lora_A.weight`` is Aᵀ (r, in) and
``lora_B.weight`` is Bᵀ (out, r). ``merge`` folds the adapter into the base kernels for export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")
ATTENTION_MODULES = ("attn1", "attn2")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Rank, alpha and which projections (by module name) carry a LoRA."""

    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be ≥ 1, got {self.rank}")
        unknown = set(self.targets) - set(DEFAULT_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; known: {DEFAULT_TARGETS}")

    @property
    def scale(self) -> float:
        """Return α / r, the factor applied to (x A) B."""
        return self.alpha / self.rank


def target_paths(params: Mapping, targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[tuple]:
    """Return the module paths of the attention projections (in attn1/attn2) to adapt."""
    flat = traverse_util.flatten_dict(dict(params))
    paths = sorted(
        path[:-1]
        for path, value in flat.items()
        if path[-1] == "kernel"
        and len(path) >= 3
        and path[-2] in targets
        and path[-3] in ATTENTION_MODULES
        and len(value.shape) == 2
    )
    if not paths:
        raise ValueError(f"no attention projections named {targets} found in the params")
    return paths


def init_lora(key: jax.Array, params: Mapping, config: LoRAConfig) -> dict:
    """Return a nested LoRA tree with A ~ N(0, 1/r²) and B = 0 for each targeted kernel."""
    flat = traverse_util.flatten_dict(dict(params))
    lora = {}
    for i, path in enumerate(target_paths(params, config.targets)):
        d_in, d_out = flat[path + ("kernel",)].shape
        a = jax.random.normal(jax.random.fold_in(key, i), (d_in, config.rank)) / config.rank
        lora[path + ("A",)] = a.astype(jnp.float32)
        lora[path + ("B",)] = jnp.zeros((config.rank, d_out), jnp.float32)
    return traverse_util.unflatten_dict(lora)


def pairs(lora: Mapping) -> dict[tuple, tuple[jax.Array, jax.Array]]:
    """Return {module path: (A (in, r), B (r, out))} of a LoRA tree, sorted by path."""
    flat = traverse_util.flatten_dict(dict(lora))
    modules = {path[:-1] for path in flat}
    out = {}
    for m in sorted(modules):
        if set(k[-1] for k in flat if k[:-1] == m) != {"A", "B"}:
            raise ValueError(f"LoRA entry {'/'.join(m)} must hold exactly 'A' and 'B'")
        out[m] = (flat[m + ("A",)], flat[m + ("B",)])
    return out


def merge(params: Mapping, lora: Mapping, scale: float) -> dict:
    """Return base params with W + scale·A·B in every LoRA-adapted kernel (fp32)."""
    flat = traverse_util.flatten_dict(dict(params))
    for module, (a, b) in pairs(lora).items():
        path = module + ("kernel",)
        if path not in flat:
            raise KeyError(f"LoRA adapts {'/'.join(module)}, which the base params do not have")
        w = flat[path]
        delta = scale * (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32))
        if delta.shape != w.shape:
            raise ValueError(f"LoRA {'/'.join(module)}: A·B is {delta.shape}, kernel {w.shape}")
        flat[path] = jnp.asarray(w, jnp.float32) + delta
    return traverse_util.unflatten_dict(flat)


def num_params(lora: Mapping) -> int:
    """Return the number of trainable LoRA parameters."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(lora))
