"""Optimisers for the trainable trees only (LoRA, flow): AdamW with per-group clipping.

The trainable params are a dict whose top-level keys name the groups (``{"lora": …, "flow":
…}``); the frozen base model never enters the optimiser. Each group is clipped by its own global
norm before its AdamW step, as the DAG release clips LoRA and flow separately.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import optax


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """AdamW settings and gradient-norm clip of one parameter group."""

    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def group_transform(cfg: GroupConfig) -> optax.GradientTransformation:
    """Return clip-by-global-norm (if set) followed by AdamW for one group."""
    adamw = optax.adamw(
        cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    if cfg.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)


def make_optimizer(
    groups: Mapping[str, GroupConfig], accumulate_steps: int = 1
) -> optax.GradientTransformation:
    """Return an optimiser over a dict of groups, accumulating ``accumulate_steps`` gradients.

    With accumulation, updates are zero until the k-th call, which applies the mean gradient.
    """
    if not groups:
        raise ValueError("make_optimizer needs at least one parameter group")
    if accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be ≥ 1, got {accumulate_steps}")
    names = tuple(groups)

    def labels(params):
        unknown = set(params) - set(names)
        if unknown:
            raise ValueError(f"trainable params have groups {sorted(unknown)} with no optimiser")
        return {k: k for k in params}

    tx = optax.multi_transform({k: group_transform(v) for k, v in groups.items()}, labels)
    if accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate_steps)
    return tx
