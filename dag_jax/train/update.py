"""Update windows: micro-batches of transitions, accumulated gradients, one optimizer step.

Pure in the loop's sense: each function takes the ``TrainState`` and returns a new one.
``update_window`` consumes its input state's arrays (donated to the compiled steps, see
``phases.build_phases``); ``train_epoch`` keeps its caller's intact unless told otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.algos.transitions import EMPTY, SHARED_FIELDS, Transitions, from_trajectory, take
from dag_jax.infra import parallel
from dag_jax.train.collect import Collected, take_rows
from dag_jax.train.config import flow_per_state
from dag_jax.train.phases import Context
from dag_jax.train.run import put_batch
from dag_jax.train.state import TrainState, host_rng

log = logging.getLogger("dag_jax.train")


class NonFiniteLoss(RuntimeError):
    """Too many consecutive updates had a non-finite loss or non-finite new parameters."""


def train_epoch(
    ctx: Context,
    state: TrainState,
    data: Collected,
    beta: float,
    stop: Callable[[], bool] = lambda: False,
    *,
    keep_input: bool = True,
) -> tuple[TrainState, list[dict], bool]:
    """Return (the state after the epoch's updates, per-update metrics, whether it finished).

    The objective cuts the epoch into windows of trajectories, one optimizer update each.
    ``stop`` is asked before every window (preemption, agreed by all processes): when it says
    stop, the state so far and ``False`` come back.

    The updates donate the state's device arrays to the compiled steps. ``keep_input``
    (default) has them work on a copy (``own_arrays``), so the caller's ``state`` stays
    usable, e.g. as the last complete epoch should a preemption stop this one; ``False``
    spares the copy (the trainable tree, optimizer state and EMA once more) when the caller
    no longer needs ``state``: its arrays are deleted by the first update.
    """
    windows, dropped = ctx.objective.windows(ctx.config, state.epoch, data)
    if not windows:
        log.info("epoch %d: no window to train on (empty selection), no update", state.epoch)
    elif keep_input:
        state = own_arrays(state)
    out = []
    for window in windows:
        if stop():
            return state, out, False
        state, metrics = update_window(ctx, state, data, window, beta)
        if dropped:  # the same value in every update: the epoch's mean is it
            metrics["dropped_trajectories"] = float(dropped)
        out.append(metrics)
    return state, out, True


def own_arrays(state: TrainState) -> TrainState:
    """Return ``state`` with copies of its device arrays (same shardings), for steps to donate."""
    copies = {name: jax.tree.map(jnp.copy, tree) for name, tree in state.arrays().items()}
    return state.replace(**copies)


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


def window_rows(ctx: Context, state: TrainState, trajectories: int, steps: int):
    """Return (the window's rows in the objective's order, padded to micro-batches; weights)."""
    rng = host_rng(ctx.config, state.epoch, 1000 + state.updates)
    rows = ctx.objective.row_order(ctx.config, trajectories, steps, rng)
    present = rows != EMPTY  # an empty slot (DAG-KL's ragged groups) reads row 0 at weight 0
    rows, weight = padded_rows(np.where(present, rows, 0), ctx.config.train.micro_batch)
    weight[: present.size] *= present  # micro_batch % baseline_group == 0: whole groups
    return rows, weight


def update_window(
    ctx: Context, state: TrainState, data: Collected, window: np.ndarray, beta: float
) -> tuple[TrainState, dict]:
    """Return (the state after one optimizer update on a window's transitions, its metrics).

    ``state``'s trainable tree, optimizer state and EMA are donated to ``phases.apply``: the
    caller keeps the returned state, not those arrays.
    """
    c, model, mesh, phases = ctx.config, ctx.model, ctx.mesh, ctx.phases
    traj = take_rows(data.traj, window)
    state_rewards = None
    if ctx.objective.uses_flow:  # forward-looking rewards of every state, θ of the window
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
    mb, steps = c.train.micro_batch, traj.log_probs.shape[1]
    rows, weight = window_rows(ctx, state, window.size, steps)
    grad_sum = jax.tree.map(jnp.zeros_like, state.trainable)
    per_state = ctx.objective.uses_flow and flow_per_state(c, model.schedule, traj.start, steps)
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
    if "flow" in state.trainable and state.epoch < c.dag.flow_warmup_epochs:
        # flow warm-up: the flow (and log Z) learn the current policy's flows first
        policy = "unet" if "unet" in grad_sum else "lora"  # train.trainable
        grad_sum = {**grad_sum, policy: jax.tree.map(jnp.zeros_like, grad_sum[policy])}
        metrics["policy_frozen"] = 1.0
    finite_loss = bool(np.isfinite(metrics["loss"]))
    ema = () if state.ema is None else (state.ema,)  # the EMA moves with accepted updates only
    trainable, opt_state, finite, ema = phases.apply(
        state.trainable, state.opt_state, grad_sum, jnp.float32(count), jnp.bool_(finite_loss), *ema
    )
    finite = bool(finite)  # the loss and every new parameter and optimizer moment
    streak = 0 if finite else state.nonfinite_streak + 1
    state = state.replace(
        trainable=trainable,
        opt_state=opt_state,
        ema=ema,
        updates=state.updates + 1,
        nonfinite_streak=streak,
    )
    if not finite:
        what = "loss" if not finite_loss else "parameters or optimizer state"
        log.warning("update %d: non-finite %s, update skipped", state.updates, what)
        if streak >= c.train.max_nonfinite:
            raise NonFiniteLoss(
                f"{streak} consecutive updates had a non-finite {what} "
                f"(train.max_nonfinite={c.train.max_nonfinite}); stopping. Lower the learning "
                "rate or check the reward for NaNs."
            )
    metrics["skipped_nonfinite"] = float(not finite)
    return state, metrics
