"""What every objective provides, and the pieces the plain (non-branching) objectives share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from dag_jax.train.collect import Collected, sample_scored_parts, unique_count
from dag_jax.train.state import TrainState, host_rng

if TYPE_CHECKING:
    from dag_jax.algos.transitions import Transitions
    from dag_jax.train.phases import Context
    from dag_jax.train.run import Model


@dataclasses.dataclass(frozen=True)
class Objective:
    """One training objective: how an epoch is collected, cut into windows and trained.

    A new objective is one module that builds this (``objective(config)``) plus one line in
    ``objectives.OBJECTIVES``. Everything here is called by the loop in ``train/loop.py``;
    ``loss`` runs inside the jitted gradient step.
    """

    name: str
    uses_flow: bool  # a flow network φ: forward-looking rewards per window, F̃ per state
    reduction: str  # how a transition's log-prob reduces over latent elements ("mean", "sum")
    # config -> the host-side state it carries across epochs (JSON data, checkpointed)
    trackers: Callable[[Any], dict]
    # (context, state, epoch key) -> (the epoch's trajectories and host data, new state)
    collect: Callable[[Context, TrainState, jax.Array], tuple[Collected, TrainState]]
    # (config, epoch, collected) -> (windows of trajectory indices, each one update; dropped)
    windows: Callable[[Any, int, Collected], tuple[list[np.ndarray], int]]
    # (config, trajectories, steps, rng) -> the order of a window's rows b·K + k (−1: empty)
    row_order: Callable[[Any, int, int, np.random.Generator], np.ndarray]
    # (model, config, params, batch, beta) -> (loss, metrics); params: "policy", "flow", …
    loss: Callable[[Model, Any, dict, Transitions, jax.Array], tuple[jax.Array, dict]]


def no_trackers(config) -> dict:
    """Return the empty tracker state of an objective that keeps none."""
    return {}


def draw_prompts(config, num_prompts: int, epoch: int) -> np.ndarray:
    """Return the epoch's (N,) prompt indices: ``sample.group`` consecutive rows share one."""
    n, g = config.sample.trajectories, config.sample.group
    return np.repeat(host_rng(config, epoch, 0).integers(0, num_prompts, n // g), g)


def sample_epoch(ctx: Context, state: TrainState, ekey: jax.Array) -> Collected:
    """Return the epoch's plainly sampled, scored trajectories (no advantages yet)."""
    c, n = ctx.config, ctx.config.sample.trajectories
    prompt_idx = draw_prompts(c, len(ctx.model.prompts), state.epoch)
    traj, rewards, parts = sample_scored_parts(
        ctx, state.trainable, prompt_idx, ekey, c.sample.chunk
    )
    zeros, ones = np.zeros(n, np.float32), np.ones(n, np.float32)
    return Collected(traj, prompt_idx, rewards, zeros, ones, unique_count(ekey, n), parts)


def shuffled_windows(
    config, epoch: int, data: Collected, passes: int, group: int = 1
) -> tuple[list[np.ndarray], int]:
    """Return each pass's kept trajectories, shuffled (whole groups of ``group`` together),
    cut into windows of ``train.trajectories_per_step`` (the last one of a pass partial)."""
    kept = np.flatnonzero(data.weight > 0)
    w, windows = config.train.trajectories_per_step, []
    for p in range(passes):
        rng = host_rng(config, epoch, 10 + p)
        blocks = kept.reshape(-1, group)
        order = blocks[rng.permutation(len(blocks))].reshape(-1)
        windows += [order[lo : lo + w] for lo in range(0, order.size, w)]
    return windows, 0


def permuted_rows(config, trajectories: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Return the window's rows in one random order (the releases' shuffle)."""
    return rng.permutation(trajectories * steps)
