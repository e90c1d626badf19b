"""A batch of stored denoising transitions x_t → x_s, and the policy quantities recomputed on it.

Every objective trains on transitions cut from sampled trajectories. Everything stored is fp32
(SPEC §2: bf16 storage breaks PPO ratios at the last steps).

The prompt embeddings are not stored per transition (77×768 fp32 is 236 KB a row at SD1.5, ~6 GB
for a 512-trajectory × 50-step epoch): a batch holds one table ``contexts`` (one row per
trajectory) and each transition the index of its row, ``context_index``. ``batch.context``
gathers the (B, L, D) embeddings where it is used, i.e. inside the compiled loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dag_jax.diffusion import ddim
from dag_jax.diffusion.sampler import Trajectory, guided_eps
from dag_jax.diffusion.schedule import Schedule


@flax.struct.dataclass
class Transitions:
    """B transitions; per-sample fields have leading dim B, latents are (B, *x) fp32."""

    x_t: jax.Array  # (B, *x) state before the step
    x_s: jax.Array  # (B, *x) sampled next state
    t: jax.Array  # (B,) int32 timestep of x_t
    s: jax.Array  # (B,) int32 timestep of x_s (clamped at 0)
    alpha_t: jax.Array  # (B,) ᾱ_t
    alpha_s: jax.Array  # (B,) ᾱ_s
    terminal: jax.Array  # (B,) bool, x_s is the final image latent
    initial: jax.Array  # (B,) bool, x_t is the first state x_T (drawn from the N(0, I) prior)
    log_prob: jax.Array  # (B,) log p_old(x_s | x_t) stored at sampling
    eps: jax.Array  # (B, *x) guided ε̃_old(x_t) stored at sampling
    context_index: jax.Array  # (B,) int32 row of ``contexts`` holding the prompt embedding
    prompt: jax.Array  # (B,) int32 prompt index
    advantage: jax.Array  # (B,) fp32 (DDPO / B²; zeros otherwise)
    reward_t: jax.Array  # (B,) fp32 forward-looking reward of x_t (DAG; zeros otherwise)
    reward_s: jax.Array  # (B,) fp32 forward-looking reward of x_s, r(x_0) when terminal
    weight: jax.Array  # (B,) fp32 loss weight: 0 drops a row (B² selection, padding)
    contexts: jax.Array  # (N, L, D) prompt embeddings shared by the rows (SHARED_FIELDS)

    @property
    def size(self) -> int:
        """Return the number of transitions B."""
        return self.x_t.shape[0]

    @property
    def context(self) -> jax.Array:
        """Return the (B, L, D) prompt embeddings of the rows, gathered from ``contexts``."""
        return jnp.take(self.contexts, self.context_index, axis=0)


SHARED_FIELDS = ("contexts",)  # fields that are tables, not one entry per transition


def row_fields(batch: Transitions) -> tuple[str, ...]:
    """Return the names of the per-transition fields (leading dim B)."""
    return tuple(f.name for f in dataclasses.fields(batch) if f.name not in SHARED_FIELDS)


def from_trajectory(
    traj: Trajectory,
    schedule: Schedule,
    prompt: jax.Array,
    advantage: jax.Array | None = None,
    state_rewards: jax.Array | None = None,
    weight: jax.Array | None = None,
) -> Transitions:
    """Return the B·K transitions of a (B, K)-step trajectory batch, row b·K + k = step k of b.

    ``advantage`` is per trajectory (B,); ``state_rewards`` (B, K+1) holds one forward-looking
    reward per state (the last one r(x_0)), so each state's reward is computed once and shared
    by the two transitions that touch it. ``weight`` (B,) weighs each trajectory's rows in
    the loss (default 1). The trajectories' contexts (B, L, D) become the ``contexts`` table,
    row b·K + k pointing at its row b.
    """
    b, k = traj.log_probs.shape
    steps = traj.start + jnp.arange(k)
    flat = lambda a: a.reshape((b * k,) + a.shape[2:])
    per_step = lambda a: jnp.tile(a, b)
    per_traj = lambda a: jnp.repeat(a, k, axis=0)
    zeros = jnp.zeros((b * k,), jnp.float32)
    if state_rewards is None:
        reward_t = reward_s = zeros
    else:
        reward_t, reward_s = flat(state_rewards[:, :-1]), flat(state_rewards[:, 1:])
    return Transitions(
        x_t=flat(traj.latents[:, :-1]),
        x_s=flat(traj.latents[:, 1:]),
        t=per_step(schedule.timesteps[steps]),
        s=per_step(schedule.prev_timesteps[steps]),
        alpha_t=per_step(schedule.alpha_t[steps]),
        alpha_s=per_step(schedule.alpha_s[steps]),
        terminal=per_step(steps == schedule.num_steps - 1),
        initial=per_step(steps == 0),
        log_prob=flat(traj.log_probs),
        eps=flat(traj.eps),
        context_index=per_traj(jnp.arange(b, dtype=jnp.int32)),
        prompt=per_traj(jnp.asarray(prompt, jnp.int32)),
        advantage=zeros if advantage is None else per_traj(jnp.asarray(advantage, jnp.float32)),
        reward_t=reward_t,
        reward_s=reward_s,
        weight=jnp.ones((b * k,), jnp.float32)
        if weight is None
        else per_traj(jnp.asarray(weight, jnp.float32)),
        contexts=traj.context,
    )


def step_group_order(
    num_trajectories: int, num_steps: int, group: int, rng: np.random.Generator
) -> np.ndarray:
    """Return a row order of ``from_trajectory``'s rows (b·K + k) in blocks of ``group`` rows.

    A block is one step k of ``group`` consecutive trajectories; the blocks come in random
    order, so a micro-batch whose size ``group`` divides holds whole blocks (``dag.baseline =
    "step"``: the rows a leave-one-out baseline is taken over).
    """
    if group < 1 or num_trajectories % group:
        raise ValueError(f"group {group} must divide the {num_trajectories} trajectories")
    b = np.arange(num_trajectories).reshape(-1, group)  # (blocks of trajectories, group)
    rows = b[:, None, :] * num_steps + np.arange(num_steps)[None, :, None]  # (G, K, group)
    blocks = rows.reshape(-1, group)
    return blocks[rng.permutation(len(blocks))].reshape(-1)


EMPTY = -1  # a slot of ``distinct_group_order`` that holds no row


def distinct_group_order(
    num_trajectories: int, num_steps: int, group: int, rng: np.random.Generator
) -> np.ndarray:
    """Return a row order of ``from_trajectory``'s rows (b·K + k) whose blocks of ``group`` rows
    each hold rows of distinct trajectories; ``EMPTY`` (−1) marks slots that hold no row.

    DAG-KL's leave-one-out groups with ``dag.baseline = "rows"`` (SPEC §5): in the release a
    group is one micro-batch of 8 distinct trajectories, each at its own step. Built like the
    release: the trajectories in random order, each one's K steps in an independent random
    order, laid end to end (W·K rows) and dealt column by column into a (G, group) table,
    G = max(⌈W·K / group⌉, K). A trajectory's K rows are K consecutive entries of the stream,
    so they land in K different table rows (blocks) as K ≤ G. The blocks come in random order.

    When ``group`` divides W (the released sizes) the blocks partition the trajectories into
    sets of ``group``, each set giving K blocks, as the release's micro-batches do, and no slot
    is empty. Otherwise (W·K not a multiple of ``group``, or W < ``group``: a ragged window)
    the ``G·group − W·K`` empty slots take the stream's last positions, so each block holds
    ⌊W·K/G⌋ or ⌈W·K/G⌉ rows (W < ``group``: W rows each); the caller gives empty slots weight
    0 and the loss leaves them out of the baseline (``dag.leave_one_out_advantages``). A block
    with a single row gets no baseline (advantage 0). Every row appears exactly once.
    """
    w, k = num_trajectories, num_steps
    if group < 1 or w < 1 or k < 1:
        raise ValueError(f"need group, trajectories and steps >= 1, got {group}, {w}, {k}")
    steps = rng.permuted(np.tile(np.arange(k), (w, 1)), axis=1)  # (W, K) each row a permutation
    stream = (rng.permutation(w)[:, None] * k + steps).reshape(-1)  # (W·K,) trajectory-major
    blocks = max(-(-w * k // group), k)  # G
    slots = np.full(blocks * group, EMPTY, np.int64)
    slots[: stream.size] = stream
    table = slots.reshape(group, blocks).T  # (G, group): block i = stream[c·G + i], c < group
    return table[rng.permutation(blocks)].reshape(-1)


def release_windows(
    orders: list[np.ndarray], size: int, pair: int = 2
) -> tuple[list[np.ndarray], int]:
    """Return (the full windows of ``size`` trajectories cut from the passes' orders, the
    number of trajectory slots dropped).

    B²'s release (SPEC §7) batches each pass's shuffled samples ``pair`` (2) at a time,
    dropping an odd last one (``range(0, n // 2 * 2, 2)``), and accumulates gradients over
    ``size`` trajectories × their steps, stepping the optimizer only on a full window: the
    passes form one stream (a pass's leftover joins the next pass's first window) and the
    last partial window is dropped. A window that spans two passes may hold a trajectory twice.
    """
    stream = np.concatenate([o[: o.size - o.size % pair] for o in orders])
    full = stream.size // size
    windows = [stream[i * size : (i + 1) * size] for i in range(full)]
    return windows, sum(o.size for o in orders) - full * size


def states_are_shared(schedule: Schedule, start: int, num_steps: int) -> bool:
    """Return whether a trajectory's steps [start, start + K) chain state to state exactly.

    True when each step's s is the next step's t and the last step ends the schedule, so the
    x_s of row b·K + k (``from_trajectory``) is the x_t of row b·K + k + 1 at the same time,
    and the terminal rows are exactly the last of each trajectory. Then a per-state value
    (F̃_φ, ``dag.state_flows``) serves both transitions that touch the state. DDIM's
    "leading" spacing chains; "trailing" and "linspace" grids need not (s = t − T/N).
    """
    ts = np.asarray(schedule.timesteps)[start : start + num_steps]
    prev = np.asarray(schedule.prev_timesteps)[start : start + num_steps]
    ends = start + num_steps == schedule.num_steps
    return bool(ends and ts.size == num_steps and np.array_equal(prev[:-1], ts[1:]))


def row_flows(state_flow: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Return (F̃(x_t), F̃(x_s)) of transition rows from per-state values (B·K,).

    ``state_flow`` is ``dag.state_flows`` flattened (state b·K + k); row r's x_t is state r and
    its x_s state r + 1 (clamped for the very last row, which is terminal: its value is masked
    by the loss, ``dag.log_flows_of``).
    """
    last = state_flow.shape[0] - 1
    return state_flow[rows], state_flow[jnp.minimum(rows + 1, last)]


def scatter_state_cotangents(
    cotangent: jax.Array, rows: jax.Array, g_t: jax.Array, g_s: jax.Array
) -> jax.Array:
    """Return per-state ∂L/∂F̃ (B·K,) with the rows' ∂L/∂F̃(x_t), ∂L/∂F̃(x_s) added.

    The transpose of ``row_flows``: row r's x_t is state r, its x_s state r + 1. A terminal
    row's g_s is zero (its F̃(x_s) is masked), so its spill into the next trajectory's first
    state, or past the end (dropped), adds nothing.
    """
    cotangent = cotangent.at[rows].add(g_t.astype(cotangent.dtype))
    return cotangent.at[rows + 1].add(g_s.astype(cotangent.dtype), mode="drop")


def weighted_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
    """Return Σ w·v / max(Σ w, 1): the mean over the rows a batch keeps."""
    w = weight.astype(jnp.float32)
    return jnp.sum(w * values) / jnp.maximum(jnp.sum(w), 1.0)


def take(batch: Transitions, index: jax.Array) -> Transitions:
    """Return the transitions at ``index`` (a permutation or a subset); the tables stay whole."""
    return batch.replace(**{name: getattr(batch, name)[index] for name in row_fields(batch)})


def policy_terms(
    eps_fn: Callable,
    params,
    batch: Transitions,
    uncond: jax.Array | None,
    *,
    guidance: float,
    eta: float,
    prediction_type: str = "epsilon",
    reduction: str = "mean",
) -> tuple[jax.Array, jax.Array]:
    """Return (log p_θ(x_s | x_t) (B,), guided ε̃_θ(x_t) (B, *x)) under the current params."""
    eps = guided_eps(eps_fn, params, batch.x_t, batch.t, batch.context, uncond, guidance)
    _, mean, sigma, _ = ddim.ddim_step(
        batch.x_t, eps, batch.alpha_t, batch.alpha_s, eta, None, prediction_type
    )
    return ddim.policy_logprob(batch.x_s, mean, sigma, reduction), eps


def proximal_penalty(eps: jax.Array, eps_old: jax.Array) -> jax.Array:
    """Return the (B,) mean over elements of (ε̃_θ − ε̃_old)² (DAG's proximal term)."""
    axes = tuple(range(1, eps.ndim))
    return jnp.mean((eps.astype(jnp.float32) - eps_old.astype(jnp.float32)) ** 2, axis=axes)
