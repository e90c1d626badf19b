"""DAG-DB and DAG-KL: detailed balance with a forward-looking flow (SPEC §4–5).

log F(x_t) = F̃_φ(x_t, t, c) + β_e·r(x̂₀^cond(x_t)); at the terminal state log F(x_0) = β_e·r(x_0).
Per transition Δ = log F(x_t) + log p_θ(x_s|x_t) − log P_B(x_t|x_s) − log F(x_s).
Rewards are constants computed before the loss, once per *state* (``forward_looking_rewards``).

With φ fixed inside an accumulation window, F̃_φ of each state can be computed once too
(``state_flows``, forward only, at the window's start): the loss then takes those values as
inputs (``params["flow_values"]``), its gradient with respect to them is a cotangent per
state (``transitions.scatter_state_cotangents``), and φ's gradient is one VJP of F̃ over the
window's states at its end (``flow_vjp_loss``). Same math as evaluating F̃ on [x_t; x_s] in
every micro-batch with the gradient, for half the flow evaluations with a backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dag_jax.algos.ddpo import ppo_surrogate
from dag_jax.algos.transitions import Transitions, policy_terms, proximal_penalty, weighted_mean
from dag_jax.diffusion import ddim

FlowFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]


def annealed_beta(beta: float, epoch: int, num_epochs: int, anneal_fraction: float = 0.5) -> float:
    """Return β_e = β·min(1, e / (E·fraction)) (release: 0 at epoch 0, β from E/2 on)."""
    horizon = num_epochs * anneal_fraction
    if horizon <= 0:
        return float(beta)
    return float(beta) * min(1.0, epoch / horizon)


def forward_looking_rewards(
    eps_fn: Callable,
    params,
    latents: jax.Array,
    timesteps: jax.Array,
    alpha_t: jax.Array,
    context: jax.Array,
    score_fn: Callable[[jax.Array], jax.Array],
    prediction_type: str = "epsilon",
    x0_cond: jax.Array | None = None,
) -> jax.Array:
    """Return (B, K+1) rewards, one per state: r(x̂₀^cond(x_k)) for k < K and r(x_K) at the end.

    ``latents`` (B, K+1, *x) are the states of a trajectory (``Trajectory.latents``), with
    ``timesteps``/``alpha_t`` (K,) those of its K steps; x̂₀ uses the conditional branch only
    (no CFG) under stop_gradient; ``score_fn`` maps (N, *x) clean latents to (N,) rewards.
    ``x0_cond`` (B, K, *x), when given, are those x̂₀ already (``Trajectory.x0_cond``, from the
    sampling pass: SPEC §4's ``fl_source: sampling``), and the model is not called.
    """
    b, k1 = latents.shape[:2]
    k = k1 - 1

    def predicted_x0(step):
        x = latents[:, step]
        out = eps_fn(params, x, jnp.broadcast_to(timesteps[step], (b,)), context)
        x0, _ = ddim.split_prediction(x, out.astype(jnp.float32), alpha_t[step], prediction_type)
        return x0

    if x0_cond is None:
        x0s = jax.lax.map(predicted_x0, jnp.arange(k))  # (K, B, *x)
    else:
        if x0_cond.shape[:2] != (b, k):
            raise ValueError(f"x0_cond has shape {x0_cond.shape}; expected ({b}, {k}, ...)")
        x0s = jnp.moveaxis(x0_cond.astype(jnp.float32), 1, 0)
    x0s = jnp.concatenate([x0s, latents[:, -1][None]], axis=0)
    x0s = jax.lax.stop_gradient(x0s)
    rewards = jax.lax.map(score_fn, x0s)  # (K+1, B)
    return jnp.moveaxis(rewards, 0, 1).astype(jnp.float32)


def state_flows(
    flow_fn: FlowFn, flow_params, latents: jax.Array, timesteps: jax.Array, context: jax.Array
) -> jax.Array:
    """Return (B, K) F̃_φ(x_k, t_k, c) of the K states before each step, one forward per state.

    ``latents`` (B, K+1, *x) and ``timesteps`` (K,) are a trajectory's (``Trajectory``); the
    final state gets no F̃ (its log-flow is β·r(x_0)). Row b·K + k of ``from_trajectory``'s
    transitions has F̃(x_t) = out[b, k] and, unless terminal, F̃(x_s) = out[b, k+1]: exact
    when each step's s is the next step's t (``transitions.states_are_shared``).
    """
    b = latents.shape[0]

    def one(step):
        t = jnp.broadcast_to(timesteps[step], (b,))
        return flow_fn(flow_params, latents[:, step], t, context).astype(jnp.float32)

    flows = jax.lax.map(one, jnp.arange(timesteps.shape[0]))  # (K, B)
    return jnp.moveaxis(flows, 0, 1)


def flow_vjp_loss(
    flow_fn: FlowFn, flow_params, batch: Transitions, cotangent: jax.Array
) -> jax.Array:
    """Return Σ_rows cotangent · F̃_φ(x_t, t, c): its φ-gradient is the flow's VJP over states.

    ``batch`` holds one row per state (``from_trajectory``'s x_t rows), ``cotangent`` (B,) the
    accumulated ∂L/∂F̃ of each state over every transition that touches it.
    """
    f = flow_fn(flow_params, batch.x_t, batch.t, batch.context).astype(jnp.float32)
    return jnp.sum(jax.lax.stop_gradient(cotangent) * f)


def log_flows(
    flow_fn: FlowFn,
    flow_params,
    batch: Transitions,
    beta: jax.Array,
    log_z: jax.Array | None = None,
    reduction: str = "mean",
) -> tuple[jax.Array, jax.Array]:
    """Return (log F(x_t), log F(x_s)), each (B,) fp32, with one flow call on [x_t; x_s]."""
    b = batch.size
    f = flow_fn(
        flow_params,
        jnp.concatenate([batch.x_t, batch.x_s]),
        jnp.concatenate([batch.t, batch.s]),
        jnp.concatenate([batch.context, batch.context]),
    ).astype(jnp.float32)
    return log_flows_of(f[:b], f[b:], batch, beta, log_z, reduction)


def log_flows_of(
    f_t: jax.Array,
    f_s: jax.Array,
    batch: Transitions,
    beta: jax.Array,
    log_z: jax.Array | None = None,
    reduction: str = "mean",
) -> tuple[jax.Array, jax.Array]:
    """Return (log F(x_t), log F(x_s)) from the flow values F̃(x_t), F̃(x_s) (each (B,)).

    With ``log_z`` (a learned scalar) the flow of the first state is anchored to the prior,
    log F(x_T) = log Z + log N(x_T; 0, I) (reduced like the log-probs). Without it F(x_T) is as
    free as any other state's (the release): then DB/KL can be satisfied by terminal marginals
    other than ∝ R, because the prior over x_T is fixed while F(x_T) is not (see
    ``anchored_initial_flow``).
    """
    log_f_t = f_t.astype(jnp.float32) + beta * batch.reward_t
    if log_z is not None:
        prior = ddim.gaussian_logprob(
            batch.x_t.astype(jnp.float32), 0.0, jnp.float32(1.0), reduction
        )
        log_f_t = jnp.where(batch.initial, log_z.astype(jnp.float32) + prior, log_f_t)
    f_s = jnp.where(batch.terminal, 0.0, f_s.astype(jnp.float32))
    log_f_s = f_s + beta * batch.reward_s
    return log_f_t, log_f_s


def _terms(eps_fn, flow_fn, params, batch, uncond, beta, **policy):
    reduction = policy["reduction"]
    log_p, eps = policy_terms(eps_fn, params["policy"], batch, uncond, **policy)
    log_pb = ddim.backward_logprob(batch.x_t, batch.x_s, batch.alpha_t, batch.alpha_s, reduction)
    log_z = params.get("log_z")
    if "flow_values" in params:  # F̃(x_t), F̃(x_s) computed once per state (``state_flows``)
        f_t, f_s = params["flow_values"]
        log_f_t, log_f_s = log_flows_of(f_t, f_s, batch, beta, log_z, reduction)
    else:
        log_f_t, log_f_s = log_flows(flow_fn, params["flow"], batch, beta, log_z, reduction)
    reg = proximal_penalty(eps, batch.eps)
    return log_p, log_pb, log_f_t, log_f_s, reg


def db_loss(
    eps_fn: Callable,
    flow_fn: FlowFn,
    params: dict,
    batch: Transitions,
    uncond: jax.Array | None,
    beta: float | jax.Array,
    *,
    guidance: float,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    reduction: str = "mean",
    reg_coef: float = 1.0,
    baseline_group: int = 0,
) -> tuple[jax.Array, dict]:
    """Return (mean of Δ² + λ_reg·reg, metrics).

    ``params`` = {"policy": …, "flow": …} and optionally "log_z" (a scalar: anchor the first
    state's flow to the prior, ``log_flows_of``) and "flow_values" (F̃(x_t), F̃(x_s), each
    (B,): given, the loss uses them instead of calling the flow network, and its gradient
    with respect to them is what ``flow_vjp_loss`` takes back to φ).

    ``baseline_group`` = n ≥ 2 gives θ's gradient a leave-one-out baseline: the flow (and
    log Z) still get ∇Δ², but θ gets 2·(Δ − m)·∇log p_θ instead of 2·Δ·∇log p_θ, with m the
    mean Δ of the other n − 1 rows of its group of n consecutive rows (``dag.baseline =
    "step"`` makes a group one denoising step of n trajectories). m does not depend on the
    row's own action x_s, so the expected gradient is unchanged, while the per-step offsets of
    log p_θ − log P_B (0.04 to 2.1 nats per element in the tiny world's 10-step sampler, which
    a young flow has not learnt) leave θ's gradient. The loss value is unchanged. 0: released.
    """
    log_p, log_pb, log_f_t, log_f_s, reg = _terms(
        eps_fn,
        flow_fn,
        params,
        batch,
        uncond,
        beta,
        guidance=guidance,
        eta=eta,
        prediction_type=prediction_type,
        reduction=reduction,
    )
    delta = log_f_t + log_p - log_pb - log_f_s
    if baseline_group:
        sg = jax.lax.stop_gradient
        centred = sg(delta - leave_one_out_mean(delta, baseline_group))
        flow_delta = log_f_t + sg(log_p) - log_pb - log_f_s  # = delta in value
        policy = 2.0 * centred * (log_p - sg(log_p))  # value 0, gradient 2(Δ − m)∇log p
        loss = weighted_mean(flow_delta**2 + policy + reg_coef * reg, batch.weight)
    else:
        loss = weighted_mean(delta**2 + reg_coef * reg, batch.weight)
    return loss, {
        "loss": loss,
        "db_residual_sq": jnp.mean(delta**2),
        "db_residual_abs": jnp.mean(jnp.abs(delta)),
        "log_prob": jnp.mean(log_p),
        "log_flow": jnp.mean(log_f_t),
        "proximal": jnp.mean(reg),
    }


def leave_one_out_mean(values: jax.Array, group: int) -> jax.Array:
    """Return m_i = (Σ_j b_j − b_i)/(n − 1) over consecutive groups of n = ``group`` rows."""
    n = group
    if n < 2 or values.shape[0] % n:
        raise ValueError(f"baseline_group must be ≥ 2 and divide the batch {values.shape[0]}")
    b = values.reshape(-1, n)
    return ((jnp.sum(b, axis=1, keepdims=True) - b) / (n - 1)).reshape(values.shape)


def leave_one_out_advantages(
    signal: jax.Array, group: int, clip: float = 5.0, present: jax.Array | None = None
) -> jax.Array:
    """Return RLOO-normalised advantages over consecutive groups of ``group`` values (SPEC §5).

    m_i = (Σ_j b_j − b_i)/(n−1), u_i = b_i − m_i, v_i = (Σ_j u_j² − u_i²)/(n−1),
    A_i = clip(u_i / (√v_i + 1e-8), ±clip).

    ``present`` (B,) bool, when given, leaves the other rows (padding, empty slots of
    ``transitions.distinct_group_order``) out: the sums run over a group's present rows and
    n is their count; absent rows, and a present row with no present peer, get advantage 0.
    All present: the formulas above, bit for bit.
    """
    n = group
    if n < 2 or signal.shape[0] % n:
        raise ValueError(f"baseline_group must be ≥ 2 and divide the batch {signal.shape[0]}")
    b = signal.reshape(-1, n)  # (groups, n)
    if present is None:
        p = jnp.ones(b.shape, bool)
    else:
        p = present.reshape(-1, n).astype(bool)
    b = jnp.where(p, b, 0.0)
    peers = jnp.sum(p, axis=1, keepdims=True) - p  # present rows besides each row
    denom = jnp.maximum(peers, 1).astype(b.dtype)
    m = (jnp.sum(b, axis=1, keepdims=True) - b) / denom
    u = jnp.where(p, b - m, 0.0)
    v = (jnp.sum(u**2, axis=1, keepdims=True) - u**2) / denom
    adv = jnp.clip(u / (jnp.sqrt(jnp.maximum(v, 0.0)) + 1e-8), -clip, clip)
    return jnp.where(p & (peers > 0), adv, 0.0).reshape(signal.shape)


def kl_loss(
    eps_fn: Callable,
    flow_fn: FlowFn,
    params: dict,
    batch: Transitions,
    uncond: jax.Array | None,
    beta: float | jax.Array,
    *,
    guidance: float,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    reduction: str = "mean",
    reg_coef: float = 1.0,
    kl_coef: float = 1.0,
    clip_range: float = 1e-4,
    adv_clip: float = 5.0,
    baseline_group: int = 8,
) -> tuple[jax.Array, dict]:
    """Return (L_flow + κ·L_kl + λ_reg·reg, metrics): flow by DB with sg[log p], θ by REINFORCE.

    The per-transition signal is b = sg[log F(x_s) + log P_B − log p_θ − log F(x_t)] (= −Δ),
    made into leave-one-out advantages over groups of ``baseline_group`` consecutive rows
    (their rows of weight 0 left out). A group should hold one row per trajectory
    (``transitions.distinct_group_order``): two rows of one trajectory bias the baseline.
    """
    log_p, log_pb, log_f_t, log_f_s, reg = _terms(
        eps_fn,
        flow_fn,
        params,
        batch,
        uncond,
        beta,
        guidance=guidance,
        eta=eta,
        prediction_type=prediction_type,
        reduction=reduction,
    )
    sg = jax.lax.stop_gradient
    flow_residual = log_f_t + sg(log_p) - log_pb - log_f_s
    signal = sg(log_f_s + log_pb - log_p - log_f_t)
    # rows of weight 0 (padding, empty group slots) stay out of their group's baseline
    advantage = leave_one_out_advantages(signal, baseline_group, adv_clip, batch.weight > 0)
    surrogate, ppo_metrics = ppo_surrogate(log_p, batch.log_prob, advantage, clip_range)
    loss = weighted_mean(flow_residual**2 + kl_coef * surrogate + reg_coef * reg, batch.weight)
    return loss, {
        "loss": loss,
        "db_residual_sq": jnp.mean(flow_residual**2),
        "kl_surrogate": jnp.mean(surrogate),
        "signal_mean": jnp.mean(signal),
        "log_prob": jnp.mean(log_p),
        "log_flow": jnp.mean(log_f_t),
        "proximal": jnp.mean(reg),
        **ppo_metrics,
    }
