"""DAG-KL: the flow loss with a REINFORCE-like KL objective for θ (SPEC §5)."""

from __future__ import annotations

import dataclasses

from dag_jax.algos import dag
from dag_jax.algos.transitions import distinct_group_order
from dag_jax.train.config import step_baseline
from dag_jax.train.objectives import dag_db
from dag_jax.train.objectives.base import Objective


def distinct_rows(config, trajectories, steps, rng):
    """Return rows in leave-one-out groups of distinct trajectories (the release)."""
    return distinct_group_order(trajectories, steps, config.dag.baseline_group, rng)


def loss(model, config, params, batch, beta):
    """Return the flow loss + κ · the KL surrogate (+ λ_reg · reg) and its metrics."""
    c = config
    return dag.kl_loss(
        model.eps_fn,
        model.flow_fn,
        params,
        batch,
        model.uncond,
        beta,
        reg_coef=c.dag.reg_coef,
        kl_coef=c.dag.kl_coef,
        clip_range=c.dag.clip_range,
        adv_clip=c.dag.adv_clip,
        baseline_group=c.dag.baseline_group,
        guidance=c.sample.guidance,
        eta=c.sample.eta,
        reduction=c.dag.reduction,
    )


def objective(config) -> Objective:
    """Return DAG-KL: DAG-DB's collection and windows, its own loss and baseline groups."""
    order = dag_db.step_rows if step_baseline(config) else distinct_rows
    return dataclasses.replace(dag_db.objective(config), name="dag_kl", row_order=order, loss=loss)
