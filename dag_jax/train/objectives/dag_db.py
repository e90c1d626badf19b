"""DAG-DB: detailed balance with a forward-looking flow (SPEC §4)."""

from __future__ import annotations

from dag_jax.algos import dag
from dag_jax.algos.transitions import step_group_order
from dag_jax.train.config import step_baseline, trajectory_group
from dag_jax.train.objectives.base import (
    Objective,
    no_trackers,
    permuted_rows,
    sample_epoch,
    shuffled_windows,
)


def collect(ctx, state, ekey):
    """Return the epoch's trajectories (the reward enters through the flow: no advantages)."""
    return sample_epoch(ctx, state, ekey), state


def windows(config, epoch, data):
    """Return one pass of shuffled windows (whole shared-x_T groups with the step baseline)."""
    group = trajectory_group(config) if step_baseline(config) else 1
    return shuffled_windows(config, epoch, data, 1, group)


def step_rows(config, trajectories, steps, rng):
    """Return rows in blocks of one step of ``dag.baseline_group`` trajectories."""
    return step_group_order(trajectories, steps, config.dag.baseline_group, rng)


def row_order(config):
    """Return the row order of DB: the release's shuffle, or step blocks (``dag.baseline``)."""
    return step_rows if step_baseline(config) else permuted_rows


def loss(model, config, params, batch, beta):
    """Return DB's loss Δ² (+ λ_reg · reg) and its metrics."""
    c = config
    return dag.db_loss(
        model.eps_fn,
        model.flow_fn,
        params,
        batch,
        model.uncond,
        beta,
        reg_coef=c.dag.reg_coef,
        baseline_group=c.dag.baseline_group if step_baseline(c) else 0,
        guidance=c.sample.guidance,
        eta=c.sample.eta,
        reduction=c.dag.reduction,
    )


def objective(config) -> Objective:
    """Return DAG-DB."""
    return Objective(
        name="dag_db",
        uses_flow=True,
        reduction=config.dag.reduction,
        trackers=no_trackers,
        collect=collect,
        windows=windows,
        row_order=row_order(config),
        loss=loss,
    )
