"""Update windows: micro-batches of transitions, accumulated gradients, one optimizer step."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.algos.transitions import (
    SHARED_FIELDS,
    Transitions,
    from_trajectory,
    step_group_order,
    take,
)
from dag_jax.infra import parallel
from dag_jax.train.collect import Collected, take_rows
from dag_jax.train.config import flow_per_state, objective_of, step_baseline, trajectory_group
from dag_jax.train.phases import Phases
from dag_jax.train.run import Model, put_batch
from dag_jax.train.state import LoopState, host_rng

log = logging.getLogger("dag_jax.train")


class NonFiniteLoss(RuntimeError):
    """Too many consecutive updates had a non-finite loss."""


def train_on(
    model: Model, phases: Phases, config, mesh, state: LoopState, data: Collected, beta: float
) -> list[dict]:
    """Run the epoch's updates over windows of trajectories; return per-update metrics."""
    c = config
    kept = np.flatnonzero(data.weight > 0)
    if kept.size == 0:
        log.info("epoch %d: empty selection, no update", state.epoch)
        return []
    passes = c.b2.passes if c.algo == "b2" else (c.ddpo.inner_epochs if c.algo == "ddpo" else 1)
    w = c.train.trajectories_per_step
    out = []
    for p in range(passes):
        rng = host_rng(c, state.epoch, 10 + p)
        if step_baseline(c):  # windows of whole trajectory groups (DAG keeps every row)
            groups = kept.reshape(-1, trajectory_group(c))
            order = groups[rng.permutation(len(groups))].reshape(-1)
        else:
            order = kept[rng.permutation(kept.size)]
        for lo in range(0, order.size, w):
            window = order[lo : lo + w]
            out.append(update_window(model, phases, config, mesh, state, data, window, beta))
    return out


def context_table(mesh, contexts: jax.Array, rows: int) -> jax.Array:
    """Return a window's (N, L, D) context table padded to ``rows`` rows and replicated.

    One fixed shape for every window (B² windows are ragged), so the train step compiles once;
    replicated, so each device gathers its rows' contexts locally inside the step.
    """
    pad = rows - contexts.shape[0]
    if pad > 0:
        contexts = jnp.concatenate(
            [contexts, jnp.zeros((pad,) + contexts.shape[1:], contexts.dtype)]
        )
    return jax.device_put(contexts, parallel.replicated(mesh))


def micro_batch_shardings(mesh, batch: Transitions) -> Transitions:
    """Return the shardings of a micro-batch: rows split over all devices, tables replicated."""
    shardings = jax.tree.map(lambda a: parallel.batch_sharding(mesh, a.ndim), batch)
    return shardings.replace(**{name: parallel.replicated(mesh) for name in SHARED_FIELDS})


def padded_rows(rows: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (``rows`` padded to a multiple of ``size`` with its first row, 1/0 weights)."""
    pad = (-rows.size) % size
    weight = np.concatenate([np.ones(rows.size), np.zeros(pad)]).astype(np.float32)
    return np.concatenate([rows, np.full(pad, rows[0])]).astype(np.int32), weight


def flow_vjp(phases, mesh, trainable, batch, cotangent, grad_sum, chunk: int) -> dict:
    """Return ``grad_sum`` with φ's gradient Σ_states ∂L/∂F̃ · ∇_φ F̃ added, ``chunk`` at a time.

    ``batch``'s x_t rows are the window's states (``from_trajectory``), ``cotangent`` (B·K,)
    their accumulated ∂L/∂F̃; a ragged last chunk is padded with zero cotangents.
    """
    rows, keep = padded_rows(np.arange(batch.size), chunk)
    for lo in range(0, rows.size, chunk):
        index = jnp.asarray(rows[lo : lo + chunk])
        states = take(batch, index)
        states = jax.device_put(states, micro_batch_shardings(mesh, states))
        cot = cotangent[index] * jnp.asarray(keep[lo : lo + chunk])
        cot = jax.device_put(cot, parallel.batch_sharding(mesh, 1))
        grad_sum = phases.flow_grad(trainable, states, cot, grad_sum)
    return grad_sum


def update_window(model, phases, config, mesh, state, data: Collected, window, beta) -> dict:
    """Accumulate the gradients of a window's transitions; apply one optimizer update."""
    c = config
    traj = take_rows(data.traj, window)
    state_rewards = None
    if objective_of(c).startswith("dag"):
        state_rewards = phases.fl_rewards(
            model.frozen,
            state.trainable,
            model.reward.params,
            traj,
            put_batch(mesh, data.prompt_idx[window]),
        )
    batch = from_trajectory(
        traj,
        model.schedule,
        jnp.asarray(data.prompt_idx[window]),
        advantage=jnp.asarray(data.advantage[window]),
        state_rewards=state_rewards,
        weight=jnp.asarray(data.weight[window]),
    )
    batch = batch.replace(
        contexts=context_table(mesh, batch.contexts, c.train.trajectories_per_step)
    )
    mb = c.train.micro_batch
    rng = host_rng(c, state.epoch, 1000 + state.updates)
    if step_baseline(c):  # blocks of one step of baseline_group trajectories
        steps = traj.log_probs.shape[1]
        rows = step_group_order(window.size, steps, c.dag.baseline_group, rng)
    else:
        rows = rng.permutation(batch.size)
    rows, weight = padded_rows(rows, mb)
    grad_sum = jax.tree.map(jnp.zeros_like, state.trainable)
    per_state = flow_per_state(c, model.schedule, traj.start, traj.log_probs.shape[1])
    if per_state:  # F̃ of every state once, forward only; ∂L/∂F̃ gathered per state
        rep = parallel.replicated(mesh)
        state_flow = jax.device_put(phases.state_flows(state.trainable, traj).reshape(-1), rep)
        cotangent = jax.device_put(jnp.zeros_like(state_flow), rep)
    metrics, count = [], 0
    for lo in range(0, rows.size, mb):
        index = jnp.asarray(rows[lo : lo + mb], jnp.int32)
        sub = take(batch, index)
        sub = sub.replace(weight=sub.weight * jnp.asarray(weight[lo : lo + mb]))
        sub = jax.device_put(sub, micro_batch_shardings(mesh, sub))
        args = (state.trainable, model.frozen, sub, jnp.float32(beta), grad_sum)
        if per_state:
            index = jax.device_put(index, rep)
            grad_sum, m, cotangent = phases.grad_step_per_state(*args, state_flow, index, cotangent)
        else:
            grad_sum, m = phases.grad_step(*args)
        metrics.append(m)
        count += 1
    if per_state:  # φ's gradient: one VJP of F̃ over the window's states
        grad_sum = flow_vjp(phases, mesh, state.trainable, batch, cotangent, grad_sum, 2 * mb)
    metrics = {k: float(np.mean([float(m[k]) for m in metrics])) for k in metrics[0]}
    finite = bool(np.isfinite(metrics["loss"]))
    if "flow" in state.trainable and state.epoch < c.dag.flow_warmup_epochs:
        # flow warm-up: the flow (and log Z) learn the current policy's flows first
        grad_sum = {**grad_sum, "lora": jax.tree.map(jnp.zeros_like, grad_sum["lora"])}
        metrics["policy_frozen"] = 1.0
    state.trainable, state.opt_state = phases.apply(
        state.trainable, state.opt_state, grad_sum, jnp.float32(count), jnp.bool_(finite)
    )
    state.updates += 1
    state.nonfinite_streak = 0 if finite else state.nonfinite_streak + 1
    if not finite:
        log.warning("update %d: non-finite loss, update skipped", state.updates)
        if state.nonfinite_streak >= c.train.max_nonfinite:
            raise NonFiniteLoss(
                f"{state.nonfinite_streak} consecutive updates had a non-finite loss "
                f"(train.max_nonfinite={c.train.max_nonfinite}); stopping. Lower the learning "
                "rate or check the reward for NaNs."
            )
    metrics["skipped_nonfinite"] = float(not finite)
    return metrics
