"""SPEC §4–6 checks of the objectives on toy models: DB pieces, gradients, RLOO, PPO, Prop. 4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dag_jax.algos import dag, ddpo
from dag_jax.algos.transitions import from_trajectory, policy_terms
from dag_jax.diffusion import ddim
from dag_jax.diffusion.sampler import rollout, sample_keys
from dag_jax.diffusion.schedule import make_schedule

SCHED = make_schedule(
    dict(beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False), 4
)


def eps_fn(params, x, t, ctx):
    """A toy ε-model on (B, 2) 'latents' with a (B, L, D) context."""
    h = x @ params["w"] + params["b"] + jnp.mean(ctx, axis=(1, 2))[:, None]
    return h + 1e-3 * t[:, None] * params["c"]


def flow_fn(params, x, t, ctx):
    return x @ params["v"] + 1e-3 * t * params["a"] + jnp.mean(ctx, axis=(1, 2))


def _params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    policy = {
        "w": 0.3 * jax.random.normal(k[0], (2, 2)),
        "b": 0.1 * jax.random.normal(k[1], (2,)),
        "c": jnp.ones((2,)),
    }
    flow = {"v": jax.random.normal(k[2], (2,)), "a": jnp.asarray(0.5)}
    return {"policy": policy, "flow": flow}


def _batch(params, n=4, rewards=True):
    ctx = jax.random.normal(jax.random.PRNGKey(9), (n, 3, 5))
    keys = sample_keys(jax.random.PRNGKey(1), jnp.arange(n))
    x_T = jax.random.normal(jax.random.PRNGKey(2), (n, 2))
    traj = rollout(eps_fn, params["policy"], x_T, ctx, jnp.zeros((3, 5)), SCHED, keys, guidance=3.0)
    state_r = jax.random.uniform(jax.random.PRNGKey(3), (n, SCHED.num_steps + 1))
    return traj, from_trajectory(
        traj, SCHED, jnp.arange(n), state_rewards=state_r if rewards else None
    )


KW = dict(guidance=3.0, eta=1.0)


def test_transitions_flatten_trajectories_step_by_step():
    params = _params()
    traj, batch = _batch(params)
    k = SCHED.num_steps
    assert batch.size == 4 * k
    np.testing.assert_array_equal(batch.x_t[k + 1], traj.latents[1, 1])
    np.testing.assert_array_equal(batch.x_s[k + 1], traj.latents[1, 2])
    assert batch.t[k + 1] == SCHED.timesteps[1] and batch.s[k + 1] == SCHED.prev_timesteps[1]
    assert bool(batch.terminal[2 * k - 1]) and not bool(batch.terminal[2 * k - 2])
    # a state's reward is shared by the two transitions that touch it
    np.testing.assert_array_equal(batch.reward_s[k], batch.reward_t[k + 1])


def test_forward_looking_rewards_can_take_x0_from_the_sampler_without_a_model_call():
    params = _params()
    n, k = 3, SCHED.num_steps
    ctx = jax.random.normal(jax.random.PRNGKey(9), (n, 3, 5))
    keys = sample_keys(jax.random.PRNGKey(1), jnp.arange(n))
    x_T = jax.random.normal(jax.random.PRNGKey(2), (n, 2))
    uncond = jnp.zeros((3, 5))
    policy = params["policy"]
    traj = rollout(eps_fn, policy, x_T, ctx, uncond, SCHED, keys, guidance=3.0, keep_x0_cond=True)
    score = lambda x0: jnp.sum(x0**2, axis=-1) + x0[:, 0]
    args = (traj.latents, traj.timesteps, SCHED.alpha_t[:k], traj.context, score)
    current = dag.forward_looking_rewards(eps_fn, params["policy"], *args)
    calls = []

    def counting(*a):
        calls.append(1)
        return eps_fn(*a)

    sampled = dag.forward_looking_rewards(counting, params["policy"], *args, x0_cond=traj.x0_cond)
    assert calls == [] and sampled.shape == (n, k + 1)
    np.testing.assert_allclose(sampled, current, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sampled[:, -1], score(traj.latents[:, -1]), rtol=1e-6)
    with pytest.raises(ValueError, match="x0_cond"):
        dag.forward_looking_rewards(eps_fn, params["policy"], *args, x0_cond=traj.x0_cond[:, 1:])


def test_recomputed_log_prob_equals_stored_one():
    params = _params()
    _, batch = _batch(params)
    log_p, eps = policy_terms(eps_fn, params["policy"], batch, jnp.zeros((3, 5)), **KW)
    np.testing.assert_allclose(np.exp(log_p - batch.log_prob), 1.0, atol=1e-6)
    np.testing.assert_allclose(eps, batch.eps, atol=1e-6)


def test_terminal_log_flow_is_beta_times_reward():
    params = _params()
    _, batch = _batch(params)
    beta = 7.0
    log_f_t, log_f_s = dag.log_flows(flow_fn, params["flow"], batch, beta)
    term = np.asarray(batch.terminal)
    np.testing.assert_allclose(log_f_s[term], beta * batch.reward_s[term], rtol=1e-6)
    f_t = flow_fn(params["flow"], batch.x_t, batch.t, batch.context)
    np.testing.assert_allclose(log_f_t, f_t + beta * batch.reward_t, rtol=1e-5, atol=1e-6)
    f_s = flow_fn(params["flow"], batch.x_s, batch.s, batch.context)
    np.testing.assert_allclose(
        log_f_s[~term], (f_s + beta * batch.reward_s)[~term], rtol=1e-5, atol=1e-6
    )


def test_anchored_initial_flow_is_log_z_plus_the_prior_log_density():
    params = _params()
    _, batch = _batch(params)
    log_z = jnp.float32(1.5)
    free_t, free_s = dag.log_flows(flow_fn, params["flow"], batch, 3.0)
    log_f_t, log_f_s = dag.log_flows(flow_fn, params["flow"], batch, 3.0, log_z, "sum")
    first = np.asarray(batch.initial)
    assert first.sum() == 4 and first[:: SCHED.num_steps].all()
    prior = -0.5 * np.sum(np.asarray(batch.x_t) ** 2, axis=1) - np.log(2 * np.pi)
    np.testing.assert_allclose(log_f_t[first], 1.5 + prior[first], rtol=1e-5)
    np.testing.assert_allclose(log_f_t[~first], free_t[~first], rtol=1e-6)
    np.testing.assert_array_equal(log_f_s, free_s)
    grad = jax.grad(
        lambda z: dag.db_loss(
            eps_fn, flow_fn, {**params, "log_z": z}, batch, None, 3.0, reg_coef=0.0, **KW
        )[0]
    )(log_z)
    assert np.isfinite(grad) and grad != 0


def test_db_residual_is_the_sum_of_its_pieces():
    params = _params()
    _, batch = _batch(params)
    beta = 2.0
    loss, m = dag.db_loss(
        eps_fn, flow_fn, params, batch, jnp.zeros((3, 5)), beta, reg_coef=0.0, **KW
    )
    log_p = batch.log_prob  # on-policy: unchanged params reproduce the stored log-prob
    log_pb = ddim.backward_logprob(batch.x_t, batch.x_s, batch.alpha_t, batch.alpha_s)
    log_f_t, log_f_s = dag.log_flows(flow_fn, params["flow"], batch, beta)
    delta = log_f_t + log_p - log_pb - log_f_s
    np.testing.assert_allclose(loss, np.mean(delta**2), rtol=1e-4)
    assert float(m["proximal"]) < 1e-10


def test_db_gradient_reaches_flow_and_policy_only_through_log_p_and_proximal_term():
    params = _params()
    _, batch = _batch(params)
    uncond = jnp.zeros((3, 5))
    grad = jax.grad(lambda p: dag.db_loss(eps_fn, flow_fn, p, batch, uncond, 2.0, **KW)[0])(params)
    assert float(jnp.abs(grad["flow"]["v"]).max()) > 0 and float(jnp.abs(grad["flow"]["a"])) > 0

    # θ-gradient = mean(2Δ·∇log p) + λ·∇reg, rewards and P_B being constants
    def by_hand(policy):
        log_p, eps = policy_terms(eps_fn, policy, batch, uncond, **KW)
        log_pb = ddim.backward_logprob(batch.x_t, batch.x_s, batch.alpha_t, batch.alpha_s)
        log_f_t, log_f_s = dag.log_flows(flow_fn, params["flow"], batch, 2.0)
        delta = jax.lax.stop_gradient(log_f_t - log_pb - log_f_s) + log_p
        reg = jnp.mean((eps - batch.eps) ** 2, axis=1)
        return jnp.mean(delta**2 + reg)

    expected = jax.grad(by_hand)(params["policy"])
    for k in expected:
        np.testing.assert_allclose(grad["policy"][k], expected[k], rtol=1e-4, atol=1e-7)


def test_db_step_baseline_centres_only_the_policy_gradient():
    params = _params()
    _, batch = _batch(params)  # 16 rows: groups of 4 consecutive rows
    uncond, n = jnp.zeros((3, 5)), 4
    loss_of = lambda p, g: dag.db_loss(
        eps_fn, flow_fn, p, batch, uncond, 2.0, baseline_group=g, **KW
    )
    released, grad0 = jax.value_and_grad(lambda p: loss_of(p, 0)[0])(params)
    value, grad = jax.value_and_grad(lambda p: loss_of(p, n)[0])(params)
    np.testing.assert_allclose(value, released, rtol=1e-6)  # the loss value is the released one
    for k in grad["flow"]:  # the flow (and log Z) still descend Δ²
        np.testing.assert_allclose(grad["flow"][k], grad0["flow"][k], rtol=1e-5)

    # θ-gradient = mean(2·(Δ − m)·∇log p) + ∇reg, m the mean Δ of the group's other rows
    log_pb = ddim.backward_logprob(batch.x_t, batch.x_s, batch.alpha_t, batch.alpha_s)
    log_f_t, log_f_s = dag.log_flows(flow_fn, params["flow"], batch, 2.0)
    delta = np.asarray(log_f_t + batch.log_prob - log_pb - log_f_s).reshape(-1, n)
    centred = delta - (delta.sum(1, keepdims=True) - delta) / (n - 1)
    assert np.abs(centred).max() > 1e-3

    def by_hand(policy):
        log_p, eps = policy_terms(eps_fn, policy, batch, uncond, **KW)
        reg = jnp.mean((eps - batch.eps) ** 2, axis=1)
        return jnp.mean(2.0 * jnp.asarray(centred.reshape(-1)) * log_p + reg)

    expected = jax.grad(by_hand)(params["policy"])
    for k in expected:
        np.testing.assert_allclose(grad["policy"][k], expected[k], rtol=1e-4, atol=1e-7)
        assert not np.allclose(grad["policy"][k], grad0["policy"][k])


def test_kl_flow_loss_gives_policy_no_gradient():
    params = _params()
    _, batch = _batch(params)
    f = lambda p: dag.kl_loss(
        eps_fn, flow_fn, p, batch, jnp.zeros((3, 5)), 2.0, kl_coef=0.0, reg_coef=0.0, **KW
    )[0]
    grad = jax.grad(f)(params)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(grad["policy"]))
    assert float(jnp.abs(grad["flow"]["v"]).max()) > 0


def test_leave_one_out_advantages_match_the_formulas():
    b = np.array([1.0, 2.0, 4.0, 7.0, -1.0, 0.0, 3.0, 3.5])
    n = 4
    out = np.asarray(dag.leave_one_out_advantages(jnp.asarray(b), n, clip=5.0))
    expected = []
    for g in b.reshape(-1, n):
        m = (g.sum() - g) / (n - 1)
        u = g - m
        v = ((u**2).sum() - u**2) / (n - 1)
        expected.append(np.clip(u / (np.sqrt(v) + 1e-8), -5, 5))
    np.testing.assert_allclose(out, np.concatenate(expected), rtol=1e-5)
    # one outlier in a group of 8 scores u/√v = 7 before clipping
    clipped = dag.leave_one_out_advantages(jnp.zeros(8).at[7].set(100.0), 8, clip=5.0)
    assert float(clipped[7]) == 5.0
    with pytest.raises(ValueError, match="baseline_group"):
        dag.leave_one_out_advantages(jnp.arange(6.0), 4)


def test_ppo_gate_blocks_gradient_outside_the_trust_region():
    eps = 1e-4
    old = jnp.zeros(4)
    adv = jnp.array([1.0, 1.0, -1.0, -1.0])
    # ratios just inside and well outside [1-ε, 1+ε], each pushed further by its advantage
    new = jnp.array([0.5e-4, 3e-4, -0.5e-4, -3e-4])
    g = jax.grad(lambda lp: jnp.sum(ddpo.ppo_surrogate(lp, old, adv, eps)[0]))(new)
    assert float(g[0]) != 0 and float(g[2]) != 0
    assert float(g[1]) == 0 and float(g[3]) == 0
    # on the other side of the region the gradient still pulls back
    back = jax.grad(lambda lp: jnp.sum(ddpo.ppo_surrogate(lp, old, adv, eps)[0]))(-new)
    assert float(back[1]) != 0 and float(back[3]) != 0


def test_beta_is_annealed_linearly_over_the_first_half():
    values = [dag.annealed_beta(100.0, e, 100) for e in (0, 1, 25, 50, 99)]
    assert values == [0.0, 2.0, 50.0, 100.0, 100.0]


def test_ddpo_loss_is_minus_advantage_on_policy():
    params = _params()
    _, batch = _batch(params, rewards=False)
    adv = jnp.linspace(-7.0, 7.0, batch.size)
    batch = batch.replace(advantage=adv)
    loss, m = ddpo.ddpo_loss(eps_fn, params["policy"], batch, jnp.zeros((3, 5)), **KW)
    np.testing.assert_allclose(loss, -np.mean(np.clip(adv, -5, 5)), atol=1e-5)
    np.testing.assert_allclose(m["ratio_mean"], 1.0, atol=1e-6)


def test_kl_gradient_equals_finite_difference_kl_gradient_on_a_1d_gaussian():
    """SPEC §5, Prop. 4: ∇_θ KL(p_θ ‖ π) = E[Δ ∇ log p_θ], and DB's θ-gradient is twice it."""
    sigma, a, sigma_b, x_t = 0.7, 0.9, 0.5, 0.3
    c, k = 1.2, 0.8  # log F(x_s) = −(x_s − c)² / (2k); log F(x_t) = 0

    def log_target(x_s):  # log P_B(x_t | x_s) + log F(x_s) − log F(x_t)
        pb = ddim.gaussian_logprob(jnp.full_like(x_s, x_t), a * x_s, sigma_b, "sum")
        return pb - (x_s[:, 0] - c) ** 2 / (2 * k)

    def kl(theta, n=4000):
        # exact E_p[log p − log π] by Gauss–Hermite quadrature
        z, w = np.polynomial.hermite_e.hermegauss(80)
        xs = jnp.asarray(theta + sigma * z)[:, None]
        lp = ddim.gaussian_logprob(xs, jnp.full_like(xs, theta), sigma, "sum")
        return float(np.sum(w * np.asarray(lp - log_target(xs))) / np.sqrt(2 * np.pi))

    theta, h = 0.25, 1e-3
    fd = (kl(theta + h) - kl(theta - h)) / (2 * h)
    xs = theta + sigma * jax.random.normal(jax.random.PRNGKey(0), (400_000, 1))

    def log_p(th):
        return ddim.gaussian_logprob(xs, jnp.full_like(xs, th), sigma, "sum")

    signal = jax.lax.stop_gradient(log_target(xs) - log_p(theta))  # b = −Δ
    surrogate = lambda th: jnp.mean(
        ddpo.ppo_surrogate(log_p(th), jax.lax.stop_gradient(log_p(theta)), signal, 1e9)[0]
    )
    reinforce = float(jax.grad(surrogate)(theta))
    db = float(jax.grad(lambda th: jnp.mean((log_p(th) - log_target(xs)) ** 2))(theta))
    assert abs(reinforce - fd) < 0.03 * abs(fd) + 1e-3
    assert abs(db - 2 * fd) < 0.06 * abs(fd) + 2e-3


def test_step_group_order_makes_blocks_of_one_step_of_consecutive_trajectories():
    from dag_jax.algos.transitions import step_group_order

    n, k, g = 8, 3, 4
    order = step_group_order(n, k, g, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(n * k))  # a permutation of the rows b·K + k
    blocks = order.reshape(-1, g)
    steps, trajs = blocks % k, blocks // k
    assert (steps == steps[:, :1]).all()  # one step per block
    assert (np.sort(trajs, 1) == trajs[:, :1] // g * g + np.arange(g)).all()  # one group's rows
    assert not (order == np.sort(order)).all()  # the blocks are shuffled
    with pytest.raises(ValueError, match="must divide"):
        step_group_order(6, k, g, np.random.default_rng(0))


def _per_transition_grads(loss, params, batch, order, mb):
    """Σ over micro-batches of ``order`` of ∇ loss, the flow evaluated on [x_t; x_s] in each."""
    from dag_jax.algos.transitions import take

    total = jax.tree.map(jnp.zeros_like, params)
    for lo in range(0, order.size, mb):
        sub = take(batch, jnp.asarray(order[lo : lo + mb]))
        g = jax.grad(lambda p, b: loss(p, b)[0])(params, sub)
        total = jax.tree.map(jnp.add, total, g)
    return total


def _per_state_grads(loss, params, traj, batch, order, mb):
    """The same sum with F̃ once per state: values in, cotangents out, one VJP at the end."""
    from dag_jax.algos.transitions import row_flows, scatter_state_cotangents, take

    flows = dag.state_flows(flow_fn, params["flow"], traj.latents, traj.timesteps, traj.context)
    flows = flows.reshape(-1)
    cot = jnp.zeros_like(flows)
    rest = {k: v for k, v in params.items() if k != "flow"}
    total = jax.tree.map(jnp.zeros_like, rest)
    for lo in range(0, order.size, mb):
        rows = jnp.asarray(order[lo : lo + mb])
        sub = take(batch, rows)
        with_values = lambda p, v, b: loss({**p, "flow": None, "flow_values": v}, b)[0]
        g, (g_t, g_s) = jax.grad(with_values, argnums=(0, 1))(rest, row_flows(flows, rows), sub)
        total = jax.tree.map(jnp.add, total, g)
        cot = scatter_state_cotangents(cot, rows, g_t, g_s)
    total["flow"] = jax.grad(lambda f: dag.flow_vjp_loss(flow_fn, f, batch, cot))(params["flow"])
    return total


@pytest.mark.parametrize("objective", ["db", "db_step_baseline", "kl"])
def test_flow_once_per_state_gives_the_per_transition_gradient(objective):
    from dag_jax.algos.transitions import states_are_shared

    params = {**_params(3), "log_z": jnp.float32(0.7)}
    traj, batch = _batch(params, n=4)
    assert states_are_shared(SCHED, 0, SCHED.num_steps)
    uncond = jnp.zeros((3, 5))
    if objective == "kl":
        loss = lambda p, b: dag.kl_loss(eps_fn, flow_fn, p, b, uncond, 2.0, baseline_group=2, **KW)
    else:
        group = 2 if objective == "db_step_baseline" else 0
        loss = lambda p, b: dag.db_loss(
            eps_fn, flow_fn, p, b, uncond, 2.0, baseline_group=group, **KW
        )
    order = np.random.default_rng(0).permutation(batch.size)
    want = _per_transition_grads(loss, params, batch, order, 4)
    got = _per_state_grads(loss, params, traj, batch, order, 4)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert np.abs(np.asarray(w)).max() > 0, path  # every part of the gradient is exercised
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6, err_msg=str(path))


def test_states_chain_only_on_grids_whose_s_is_the_next_t():
    from dag_jax.algos.transitions import states_are_shared

    base = dict(beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False)
    leading = make_schedule(base, 20)
    assert states_are_shared(leading, 0, 20)
    assert states_are_shared(leading, 6, 14)  # a B² interval, ending at the last step
    assert not states_are_shared(leading, 0, 10)  # stops short: its last row is not terminal
    linspace = make_schedule(dict(base, timestep_spacing="linspace"), 20)
    assert not states_are_shared(linspace, 0, 20)  # s = t − 50 is not the next t there


def test_row_flows_and_the_cotangent_scatter_are_transposes():
    from dag_jax.algos.transitions import row_flows, scatter_state_cotangents

    flows = jnp.arange(12.0) ** 2
    rows = jnp.asarray([5, 11, 0, 7, 5])
    g_t = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0])
    g_s = jnp.asarray([0.5, 0.0, 1.5, 2.5, 3.5])  # row 11 is the last: terminal, zero
    _, vjp = jax.vjp(lambda f: row_flows(f, rows), flows)
    want = vjp((g_t, g_s))[0]
    got = scatter_state_cotangents(jnp.zeros(12), rows, g_t, g_s)
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(row_flows(flows, rows)[1], flows[jnp.asarray([6, 11, 1, 8, 6])])
