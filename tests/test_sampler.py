"""Trajectory rollouts (SPEC §2, §7 branches, §10 RNG) on a toy ε-model and the tiny SD UNet."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dag_jax.diffusion import ddim
from dag_jax.diffusion.sampler import (
    branch_keys,
    branch_rollout,
    guided_eps,
    rollout,
    sample_keys,
    step_noise,
)
from dag_jax.diffusion.schedule import make_schedule
from tests.test_schedule import SD1

C, HW, L, D = 4, 8, 3, 6  # toy latents (B, 4, 8, 8), context (B, 3, 6)
GUIDANCE = 5.0


def toy_eps(params, x, t, ctx):
    """Return a (B, C, H, W) ε: the exact denoiser for N(0, I) data plus a small nonlinear
    term of latents, time and context (so latents stay O(1) and CFG matters)."""
    s1a = jnp.sqrt(1.0 - params["acp"][t])[:, None, None, None]  # (B, 1, 1, 1)
    cond = jnp.tanh(ctx.mean(axis=1) @ params["ctx"])  # (B, C)
    temb = jnp.sin(t.astype(jnp.float32)[:, None] / 1000.0 * params["freq"])  # (B, C)
    h = jnp.einsum("oc,bchw->bohw", params["w"], x)
    return s1a * x + 0.2 * jnp.tanh(h + (cond + temb)[:, :, None, None])


def toy_params(seed: int = 0) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "w": 0.5 * jax.random.normal(k1, (C, C)),
        "ctx": jax.random.normal(k2, (D, C)),
        "freq": 3.0 * jax.random.normal(k3, (C,)),
        "acp": jnp.asarray(make_schedule(SD1, 6).alphas_cumprod),
    }


@pytest.fixture(scope="module")
def world():
    """Return a dict of params, schedule, x_T, context, uncond and keys: B = 3, 6 steps."""
    k = jax.random.split(jax.random.key(42), 3)
    b = 3
    return {
        "params": toy_params(),
        "schedule": make_schedule(SD1, 6),
        "x": jax.random.normal(k[0], (b, C, HW, HW)),
        "context": jax.random.normal(k[1], (b, L, D)),
        "uncond": jax.random.normal(k[2], (1, L, D)),
        "keys": sample_keys(jax.random.key(7), jnp.arange(b)),
    }


@functools.partial(
    jax.jit,
    static_argnames=("guidance", "eta", "start", "num_steps", "reduction", "keep_x0_cond"),
)
def _toy_rollout(params, x, context, uncond, schedule, keys, **kwargs):
    return rollout(toy_eps, params, x, context, uncond, schedule, keys, **kwargs)


def _rollout(w, x=None, context=None, keys=None, **kwargs):
    """Return the jitted toy rollout of ``w``'s batch, with any of its inputs replaced."""
    return _toy_rollout(
        w["params"],
        w["x"] if x is None else x,
        w["context"] if context is None else context,
        w["uncond"],
        w["schedule"],
        w["keys"] if keys is None else keys,
        guidance=kwargs.pop("guidance", GUIDANCE),
        **kwargs,
    )


@functools.partial(jax.jit, static_argnames=("num_branches", "start", "num_steps"))
def _toy_branches(params, x, context, uncond, schedule, keys, num_branches, start, num_steps):
    return branch_rollout(
        toy_eps,
        params,
        x,
        context,
        uncond,
        schedule,
        keys,
        num_branches,
        start=start,
        num_steps=num_steps,
        guidance=GUIDANCE,
    )


@pytest.fixture(scope="module")
def traj(world):
    return _rollout(world)


def recompute(eps_fn, params, traj, uncond, schedule, guidance, eta=1.0, reduction="mean"):
    """Return (log-probs (B, K), guided ε (B, K, ...)) re-evaluated on the stored states.

    All B·K transitions go through the model in one batch with per-sample ᾱ gathers, the way a
    training step sees them.
    """
    b, k = traj.log_probs.shape
    shape = traj.latents.shape[2:]
    idx = jnp.tile(traj.start + jnp.arange(k), b)  # (B·K,) step index of each transition
    x_t = traj.latents[:, :-1].reshape(b * k, *shape)
    x_s = traj.latents[:, 1:].reshape(b * k, *shape)
    ctx = jnp.repeat(traj.context, k, axis=0)
    eps = guided_eps(eps_fn, params, x_t, schedule.timesteps[idx], ctx, uncond, guidance)
    _, mean, sigma, _ = ddim.ddim_step(
        x_t, eps, schedule.alpha_t[idx], schedule.alpha_s[idx], eta, None, schedule.prediction_type
    )
    logp = ddim.policy_logprob(x_s, mean, sigma, reduction)
    return logp.reshape(b, k), eps.reshape(b, k, *shape)


@functools.partial(jax.jit, static_argnames="reduction")
def _toy_recompute(params, traj, uncond, schedule, reduction="mean"):
    return recompute(toy_eps, params, traj, uncond, schedule, GUIDANCE, reduction=reduction)


def test_trajectory_shapes_and_dtypes(world, traj):
    b, n = 3, 6
    assert traj.latents.shape == (b, n + 1, C, HW, HW) and traj.latents.dtype == jnp.float32
    assert traj.log_probs.shape == (b, n) and traj.log_probs.dtype == jnp.float32
    assert traj.eps.shape == (b, n, C, HW, HW) and traj.eps.dtype == jnp.float32
    assert traj.timesteps.shape == (n,) and traj.timesteps.dtype == jnp.int32
    np.testing.assert_array_equal(traj.timesteps, world["schedule"].timesteps)
    np.testing.assert_array_equal(traj.latents[:, 0], world["x"])
    np.testing.assert_array_equal(traj.final, traj.latents[:, -1])
    assert traj.start == 0
    assert np.all(np.isfinite(np.asarray(traj.latents)))
    assert np.all(np.isfinite(np.asarray(traj.log_probs)))


def test_ratio_is_one_for_unchanged_params(world, traj):
    new, _ = _toy_recompute(world["params"], traj, world["uncond"], world["schedule"])
    ratio = np.exp(np.asarray(new, np.float64) - np.asarray(traj.log_probs, np.float64))
    np.testing.assert_allclose(ratio, 1.0, atol=1e-6, rtol=0)


def test_ratio_moves_when_params_change(world, traj):
    changed = dict(world["params"], w=world["params"]["w"] * 1.05)
    new, _ = _toy_recompute(changed, traj, world["uncond"], world["schedule"])
    assert np.abs(np.asarray(new) - np.asarray(traj.log_probs)).max() > 1e-3


def test_stored_eps_is_the_recomputed_guided_eps(world, traj):
    _, eps = _toy_recompute(world["params"], traj, world["uncond"], world["schedule"])
    np.testing.assert_allclose(eps, traj.eps, atol=1e-5, rtol=1e-5)


def test_kept_x0_cond_is_each_states_conditional_prediction_and_changes_nothing_else(world, traj):
    assert traj.x0_cond is None  # kept only on request
    kept = _rollout(world, keep_x0_cond=True)
    for name in ("latents", "log_probs", "eps", "context", "timesteps"):
        np.testing.assert_array_equal(getattr(kept, name), getattr(traj, name), err_msg=name)
    sched, (b, k) = world["schedule"], traj.log_probs.shape
    assert kept.x0_cond.shape == (b, k, C, HW, HW) and kept.x0_cond.dtype == jnp.float32
    for step in range(k):
        x = traj.latents[:, step]
        e_c = toy_eps(world["params"], x, jnp.full((b,), sched.timesteps[step]), world["context"])
        want, _ = ddim.split_prediction(x, e_c, sched.alpha_t[step])
        np.testing.assert_allclose(kept.x0_cond[:, step], want, rtol=1e-5, atol=1e-5)
    # the conditional branch, not the guided ε̃ the step used
    guided, _ = ddim.split_prediction(traj.latents[:, 0], traj.eps[:, 0], sched.alpha_t[0])
    assert np.abs(np.asarray(guided - kept.x0_cond[:, 0])).max() > 1e-3


def test_stored_log_probs_are_on_policy(world, traj):
    """Each stored x_s was drawn from N(μ, σ²I): its log-prob is −½|z|²/d − log σ − ½ log 2π."""
    sched = world["schedule"]
    for k in range(6):
        x_s, mean, sigma, _ = ddim.ddim_step(
            traj.latents[:, k], traj.eps[:, k], sched.alpha_t[k], sched.alpha_s[k], 1.0
        )
        z = step_noise(world["keys"], k, (C, HW, HW))
        expected = (
            -0.5 * jnp.mean(z**2, axis=(1, 2, 3)) - jnp.log(sigma) - 0.5 * jnp.log(2 * jnp.pi)
        )
        np.testing.assert_allclose(traj.log_probs[:, k], expected, atol=1e-4)
        np.testing.assert_allclose(traj.latents[:, k + 1], x_s + sigma * z, atol=1e-5)


def test_sum_reduction_scales_log_probs_by_d(world, traj):
    summed = _rollout(world, reduction="sum")
    np.testing.assert_allclose(summed.latents, traj.latents, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(summed.log_probs, C * HW * HW * traj.log_probs, rtol=1e-4)


def test_sample_does_not_depend_on_batch_composition(world, traj):
    key = jax.random.key(7)
    alone = _rollout(
        world,
        x=world["x"][1:2],
        context=world["context"][1:2],
        keys=sample_keys(key, jnp.array([1])),
    )
    np.testing.assert_allclose(alone.latents[0], traj.latents[1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(alone.log_probs[0], traj.log_probs[1], atol=1e-6, rtol=0)
    # the same sample at another position of another batch
    order = jnp.array([2, 1])
    other = _rollout(
        world,
        x=world["x"][order],
        context=world["context"][order],
        keys=sample_keys(key, order),
    )
    np.testing.assert_allclose(other.latents[1], traj.latents[1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(other.latents[0], traj.latents[2], atol=1e-5, rtol=1e-5)


def test_different_samples_get_different_noise(world):
    keys = sample_keys(jax.random.key(0), jnp.arange(4))
    z = step_noise(keys, 3, (C, HW, HW))
    assert len({float(v) for v in z[:, 0, 0, 0]}) == 4
    assert not np.allclose(z, step_noise(keys, 4, (C, HW, HW)))


def test_split_rollout_equals_full_rollout(world, traj):
    """Step noise is keyed by the global step index, so [0, k) then [k, N) is the full run."""
    k = 2
    head = _rollout(world, num_steps=k)
    tail = _rollout(world, x=head.final, start=k, num_steps=6 - k)
    assert head.start == 0 and tail.start == k
    np.testing.assert_array_equal(tail.timesteps, world["schedule"].timesteps[k:])
    joined = jnp.concatenate([head.latents[:, :-1], tail.latents], axis=1)
    np.testing.assert_allclose(joined, traj.latents, atol=1e-5, rtol=1e-5)
    lps = jnp.concatenate([head.log_probs, tail.log_probs], axis=1)
    np.testing.assert_allclose(lps, traj.log_probs, atol=1e-6, rtol=0)


def test_rollout_rejects_steps_outside_the_schedule(world):
    with pytest.raises(ValueError, match="outside"):
        _rollout(world, start=4, num_steps=3)
    with pytest.raises(ValueError, match="outside"):
        _rollout(world, num_steps=0)


@pytest.fixture(scope="module")
def branched(world):
    """Return (prefix over steps [0, 2), branch rollout over [2, 6) with 3 branches)."""
    k, nb = 2, 3
    prefix = _rollout(world, num_steps=k)
    branches = _toy_branches(
        world["params"],
        prefix.final,
        world["context"],
        world["uncond"],
        world["schedule"],
        world["keys"],
        nb,
        k,
        6 - k,
    )
    return prefix, branches


def test_branches_start_bit_for_bit_at_the_prefix_state(branched):
    prefix, branches = branched
    nb = 3
    assert branches.latents.shape == (3 * nb, 5, C, HW, HW)
    assert branches.log_probs.shape == (3 * nb, 4) and branches.start == 2
    first = np.asarray(branches.latents[:, 0]).reshape(3, nb, C, HW, HW)
    for i in range(3):
        for b in range(nb):
            np.testing.assert_array_equal(first[i, b], prefix.final[i])
    np.testing.assert_array_equal(branches.context, jnp.repeat(prefix.context, nb, axis=0))


def test_branches_of_a_sample_differ_after_the_prefix(branched):
    _, branches = branched
    nb = 3
    lat = np.asarray(branches.latents).reshape(3, nb, 5, C, HW, HW)
    for i in range(3):
        for b in range(nb):
            for c in range(b + 1, nb):
                for step in range(1, 5):
                    diff = np.abs(lat[i, b, step] - lat[i, c, step]).max()
                    assert diff > 1e-3, (i, b, c, step)


def test_branch_keys_are_distinct_and_index_based(world):
    bk = branch_keys(world["keys"], 4)
    assert bk.shape == (3, 4)
    z = step_noise(bk.reshape(-1), 2, (C, HW, HW))
    assert len({float(v) for v in z[:, 0, 0, 0]}) == 12
    # branch keys of sample 1 do not depend on the other samples in the batch
    alone = branch_keys(sample_keys(jax.random.key(7), jnp.array([1])), 4)
    np.testing.assert_array_equal(jax.random.key_data(alone[0]), jax.random.key_data(bk[1]))


def test_prefix_then_branches_share_the_prefix(world, branched):
    prefix, branches = branched
    nb = 3
    full = jnp.concatenate(
        [jnp.repeat(prefix.latents[:, :-1], nb, axis=0), branches.latents], axis=1
    )  # (B·N_b, N+1, ...)
    assert full.shape == (3 * nb, 7, C, HW, HW)
    timesteps = jnp.concatenate([prefix.timesteps, branches.timesteps])
    np.testing.assert_array_equal(timesteps, world["schedule"].timesteps)
    lat = np.asarray(full).reshape(3, nb, 7, C, HW, HW)
    for i in range(3):
        for b in range(1, nb):
            np.testing.assert_array_equal(lat[i, b, :3], lat[i, 0, :3])  # x_T, x_1, x_2
            assert not np.allclose(lat[i, b, 3:], lat[i, 0, 3:])
    # branch log-probs recompute like any trajectory's (ratio 1)
    new, _ = _toy_recompute(world["params"], branches, world["uncond"], world["schedule"])
    np.testing.assert_allclose(np.exp(new - branches.log_probs), 1.0, atol=1e-6, rtol=0)


def test_branch_rollout_accepts_per_sample_uncond(world, branched):
    _, branches = branched
    per_sample = jnp.broadcast_to(world["uncond"], world["context"].shape)
    prefix, _ = branched
    again = _toy_branches(
        world["params"],
        prefix.final,
        world["context"],
        per_sample,
        world["schedule"],
        world["keys"],
        3,
        2,
        4,
    )
    np.testing.assert_allclose(again.latents, branches.latents, atol=1e-5, rtol=1e-5)


def test_guided_eps_is_the_cfg_combination_of_separate_calls(world):
    p, x, ctx = world["params"], world["x"], world["context"]
    t = jnp.int32(501)
    unc = world["uncond"]
    got = guided_eps(toy_eps, p, x, t, ctx, unc, 7.5)
    tb = jnp.full((3,), 501, jnp.int32)
    e_c = toy_eps(p, x, tb, ctx)
    e_u = toy_eps(p, x, tb, jnp.broadcast_to(unc, ctx.shape))
    assert not np.allclose(e_c, e_u)
    np.testing.assert_allclose(got, e_u + 7.5 * (e_c - e_u), atol=1e-5, rtol=0)


def test_guidance_one_makes_a_single_conditional_call(world):
    calls = []

    def counting(params, x, t, ctx):
        calls.append(x.shape[0])
        return toy_eps(params, x, t, ctx)

    p, x, ctx, unc = world["params"], world["x"], world["context"], world["uncond"]
    got = guided_eps(counting, p, x, jnp.int32(3), ctx, unc, 1.0)
    assert calls == [3]
    np.testing.assert_array_equal(got, toy_eps(p, x, jnp.full((3,), 3), ctx))
    calls.clear()
    guided_eps(counting, p, x, jnp.int32(3), ctx, None, 5.0)
    assert calls == [3]
    calls.clear()
    guided_eps(counting, p, x, jnp.int32(3), ctx, unc, 5.0)
    assert calls == [6]  # one call on the [uncond; cond] batch


def test_eta_zero_rollout_is_deterministic_with_zero_log_probs(world):
    a = _rollout(world, eta=0.0)
    b = _rollout(world, eta=0.0, keys=sample_keys(jax.random.key(123), jnp.arange(3)))
    np.testing.assert_array_equal(a.latents, b.latents)
    np.testing.assert_array_equal(a.log_probs, np.zeros((3, 6), np.float32))
    # every step is the plain DDIM mean of the stored ε
    sched = world["schedule"]
    for k in range(6):
        _, mean, _, _ = ddim.ddim_step(
            a.latents[:, k], a.eps[:, k], sched.alpha_t[k], sched.alpha_s[k], 0.0
        )
        np.testing.assert_allclose(a.latents[:, k + 1], mean, atol=1e-5, rtol=1e-5)


def test_last_step_with_alpha_to_one_is_deterministic_not_nan(world):
    schedule = make_schedule(dict(SD1, set_alpha_to_one=True), 6)
    traj = _toy_rollout(
        world["params"], world["x"], world["context"], world["uncond"], schedule, world["keys"]
    )
    assert np.all(np.isfinite(np.asarray(traj.latents)))
    np.testing.assert_array_equal(traj.log_probs[:, -1], 0.0)
    assert np.all(np.asarray(traj.log_probs[:, :-1]) != 0.0)


# --- the tiny random SD pipeline -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd():
    from dag_jax.tinyworld.random_tiny import random_tiny_pipeline

    pipe = random_tiny_pipeline()
    schedule = make_schedule(pipe.scheduler_config, 3)
    traces = []

    def run(unet_params, x, context, uncond, keys):
        traces.append(1)  # Python side effect: runs once per trace
        return rollout(
            pipe.eps_fn, unet_params, x, context, uncond, schedule, keys, guidance=GUIDANCE
        )

    return pipe, schedule, jax.jit(run), traces


def _sd_inputs(seed: int, b: int = 2):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (b, 4, 16, 16))
    context = jax.random.normal(k[1], (b, 77, 32))
    uncond = jax.random.normal(k[2], (1, 77, 32))
    return x, context, uncond, sample_keys(jax.random.key(seed), jnp.arange(b))


def test_tiny_sd_rollout_traces_once_and_reproduces_log_probs(tiny_sd):
    pipe, schedule, run, traces = tiny_sd
    params = pipe.params["unet"]
    first = run(params, *_sd_inputs(0))
    x, context, uncond, keys = _sd_inputs(1)
    second = run(params, x, context, uncond, keys)
    assert len(traces) == 1
    assert not np.allclose(first.latents, second.latents)
    assert second.latents.shape == (2, 4, 4, 16, 16) and second.latents.dtype == jnp.float32
    assert second.log_probs.shape == (2, 3) and second.eps.shape == (2, 3, 4, 16, 16)
    assert np.all(np.isfinite(np.asarray(second.latents)))
    new, eps = jax.jit(lambda p, t: recompute(pipe.eps_fn, p, t, uncond, schedule, GUIDANCE))(
        params, second
    )
    np.testing.assert_allclose(np.exp(new - second.log_probs), 1.0, atol=1e-6, rtol=0)
    np.testing.assert_allclose(eps, second.eps, atol=1e-5, rtol=0)
