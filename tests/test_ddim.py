"""One DDIM step and its log-probabilities (SPEC §2–3) against diffusers and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dag_jax.diffusion import ddim
from dag_jax.diffusion.schedule import make_schedule
from tests.test_schedule import SD1

SD2_V = dict(SD1, prediction_type="v_prediction")


def _step_vs_diffusers(config: dict, num_steps: int, eta: float, shape=(2, 4, 8, 8)) -> float:
    """Return the max |ddim_step − DDIMScheduler.step| over every step of the grid."""
    import torch
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**config)
    ref.set_timesteps(num_steps)
    sched = make_schedule(config, num_steps)
    step = jax.jit(ddim.ddim_step, static_argnames="prediction_type")
    rng = np.random.default_rng(num_steps)
    worst = 0.0
    for i, t in enumerate(ref.timesteps.tolist()):
        x, out, z = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
        expected = ref.step(
            model_output=torch.from_numpy(out),
            timestep=t,
            sample=torch.from_numpy(x),
            eta=eta,
            variance_noise=torch.from_numpy(z),
        ).prev_sample.numpy()
        assert int(sched.timesteps[i]) == t
        got, *_ = step(x, out, sched.alpha_t[i], sched.alpha_s[i], eta, z, sched.prediction_type)
        worst = max(worst, float(np.abs(np.asarray(got) - expected).max()))
    return worst


@pytest.mark.parametrize("eta", [1.0, 0.0])
@pytest.mark.parametrize("num_steps", [50, 20])
def test_ddim_step_matches_diffusers_epsilon(num_steps, eta):
    assert _step_vs_diffusers(SD1, num_steps, eta) <= 1e-5


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_ddim_step_matches_diffusers_v_prediction(eta):
    assert _step_vs_diffusers(SD2_V, 20, eta) <= 1e-5


def test_ddim_step_matches_diffusers_sample_prediction():
    assert _step_vs_diffusers(dict(SD1, prediction_type="sample"), 20, 1.0) <= 1e-5


def test_ddim_step_matches_diffusers_with_alpha_to_one():
    assert _step_vs_diffusers(dict(SD1, set_alpha_to_one=True), 20, 1.0) <= 1e-5


def test_ddim_step_matches_diffusers_trailing_spacing():
    config = dict(SD1, timestep_spacing="trailing", steps_offset=0)
    assert _step_vs_diffusers(config, 7, 1.0) <= 1e-5


def test_deterministic_step_has_zero_logprob_not_nan():
    """σ = 0 (η = 0, or the last step with set_alpha_to_one) gives log-prob 0 and no gradient."""
    rng = np.random.default_rng(9)
    x_s, mean = (jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32) for _ in range(2))
    sigma = jnp.array([0.0, 0.5], jnp.float32)
    lp = ddim.policy_logprob(x_s, mean, sigma)
    assert float(lp[0]) == 0.0
    np.testing.assert_allclose(lp[1], ddim.gaussian_logprob(x_s, mean, sigma[1])[1], rtol=1e-6)
    g = jax.grad(lambda m: ddim.policy_logprob(x_s, m, sigma).sum())(mean)
    assert np.all(np.isfinite(np.asarray(g)))
    assert not np.any(np.asarray(g[0])) and np.any(np.asarray(g[1]))
    sched = make_schedule(dict(SD1, set_alpha_to_one=True), 10)
    assert float(ddim.ddim_sigma(sched.alpha_t[-1], sched.alpha_s[-1], 1.0)) == 0.0


def test_split_prediction_rejects_unknown_type():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="flow"):
        ddim.split_prediction(x, x, 0.5, "flow")


def test_v_prediction_converts_to_consistent_x0_and_eps():
    """x_t = √ᾱ x̂₀ + √(1−ᾱ) ε̂ holds for every prediction type."""
    rng = np.random.default_rng(1)
    x, out = (
        rng.standard_normal((2, 3, 4, 4)).astype(np.float32),
        rng.standard_normal((2, 3, 4, 4)).astype(np.float32),
    )
    a = 0.3
    for kind in ("epsilon", "v_prediction", "sample"):
        x0, eps = ddim.split_prediction(x, out, a, kind)
        np.testing.assert_allclose(math.sqrt(a) * x0 + math.sqrt(1 - a) * eps, x, atol=1e-5)


def test_sigma_is_the_ddpm_posterior_std_at_eta_one():
    a_t, a_s = 0.4, 0.7
    var = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
    np.testing.assert_allclose(ddim.ddim_sigma(a_t, a_s, 1.0), math.sqrt(var), rtol=1e-6)
    np.testing.assert_allclose(ddim.ddim_sigma(a_t, a_s, 0.5), 0.5 * math.sqrt(var), rtol=1e-6)
    assert float(ddim.ddim_sigma(a_t, a_s, 0.0)) == 0.0


@pytest.mark.parametrize("step", [0, 10, 25, 49])
def test_on_policy_mean_logprob_matches_closed_form(step):
    """E[log p] (mean over d) = −½ − log σ − ½ log 2π for x_s drawn from the policy."""
    sched = make_schedule(SD1, 50)
    k1, k2, k3 = jax.random.split(jax.random.key(step), 3)
    shape = (4, 4, 64, 64)
    x = jax.random.normal(k1, shape)
    eps = jax.random.normal(k2, shape)
    z = jax.random.normal(k3, shape)
    x_s, mean, sigma, _ = ddim.ddim_step(x, eps, sched.alpha_t[step], sched.alpha_s[step], 1.0, z)
    lp = ddim.policy_logprob(x_s, mean, sigma)
    expected = -0.5 - math.log(float(sigma)) - 0.5 * math.log(2 * math.pi)
    assert lp.shape == (4,) and lp.dtype == jnp.float32
    # per-sample std of the mean is √(½/d) ≈ 0.0055; 5σ bounds
    np.testing.assert_allclose(lp, expected, atol=0.03)
    assert abs(float(lp.mean()) - expected) < 0.015


def test_sum_reduction_is_d_times_mean():
    rng = np.random.default_rng(2)
    x, m = (rng.standard_normal((3, 4, 8, 8)).astype(np.float32) for _ in range(2))
    sigma = jnp.array([0.1, 0.5, 1.0])
    d = 4 * 8 * 8
    lp_mean = ddim.policy_logprob(x, m, sigma, "mean")
    lp_sum = ddim.policy_logprob(x, m, sigma, "sum")
    np.testing.assert_allclose(lp_sum, d * lp_mean, rtol=1e-5)
    b_mean = ddim.backward_logprob(x, m, 0.3, 0.6, "mean")
    np.testing.assert_allclose(ddim.backward_logprob(x, m, 0.3, 0.6, "sum"), d * b_mean, rtol=1e-5)
    with pytest.raises(ValueError, match="max"):
        ddim.policy_logprob(x, m, sigma, "max")


def test_policy_logprob_matches_scipy():
    rng = np.random.default_rng(3)
    x, m = (rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(2))
    sigma = np.array([0.3, 0.02], np.float32)
    got = ddim.policy_logprob(x, m, sigma, "sum")
    for b in range(2):
        ref = stats.norm.logpdf(x[b], m[b], sigma[b]).sum()
        np.testing.assert_allclose(got[b], ref, rtol=1e-5)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_backward_logprob_is_the_forward_noising_density(set_alpha_to_one):
    sched = make_schedule(dict(SD1, set_alpha_to_one=set_alpha_to_one), 20)
    rng = np.random.default_rng(4)
    x_s, x_t = (rng.standard_normal((3, 4, 8, 8)).astype(np.float32) for _ in range(2))
    idx = np.array([0, 9, 19])
    a_t, a_s = np.asarray(sched.alpha_t)[idx], np.asarray(sched.alpha_s)[idx]
    for reduction in ("mean", "sum"):
        got = ddim.backward_logprob(x_t, x_s, a_t, a_s, reduction)
        for b in range(3):
            r = np.float64(a_t[b]) / np.float64(a_s[b])
            lpdf = stats.norm.logpdf(
                x_t[b].astype(np.float64), math.sqrt(r) * x_s[b], math.sqrt(1 - r)
            )
            ref = lpdf.mean() if reduction == "mean" else lpdf.sum()
            np.testing.assert_allclose(got[b], ref, rtol=2e-5)


def test_backward_logprob_has_zero_gradient():
    rng = np.random.default_rng(5)
    x_s, x_t = (jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32) for _ in range(2))
    f = lambda xt, xs, at, as_: ddim.backward_logprob(xt, xs, at, as_).sum()
    grads = jax.grad(f, argnums=(0, 1, 2, 3))(x_t, x_s, jnp.float32(0.3), jnp.float32(0.6))
    for g in grads:
        assert not np.any(np.asarray(g))


def test_policy_logprob_gradient_flows_only_through_the_mean():
    rng = np.random.default_rng(6)
    x_s, mean = (jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32) for _ in range(2))
    sigma = jnp.array([0.3, 0.7], jnp.float32)
    f = lambda xs, m, s: ddim.policy_logprob(xs, m, s).sum()
    g_xs, g_mean, g_sigma = jax.grad(f, argnums=(0, 1, 2))(x_s, mean, sigma)
    d = 4 * 4 * 4
    expected = (x_s - mean) / (sigma[:, None, None, None] ** 2 * d)
    np.testing.assert_allclose(g_mean, expected, rtol=1e-5, atol=1e-7)
    assert np.any(np.asarray(g_mean))
    assert not np.any(np.asarray(g_xs))
    assert not np.any(np.asarray(g_sigma))


def test_reparameterised_sample_still_gives_the_score_gradient():
    """Even when x_s = μ(θ) + σz is built inside the differentiated function, the gradient
    of log p is the score ∇_θ μ·(x_s − μ)/σ², not the zero of a reparameterised density."""
    rng = np.random.default_rng(7)
    x, z = (jnp.asarray(rng.standard_normal((1, 8)), jnp.float32) for _ in range(2))
    a_t, a_s = 0.5, 0.8

    def logp(theta):
        x_s, mean, sigma, _ = ddim.ddim_step(x, theta * x, a_t, a_s, 1.0, z)
        return ddim.policy_logprob(x_s, mean, sigma).sum()

    g = float(jax.grad(logp)(jnp.float32(0.3)))
    assert abs(g) > 1e-3
    # finite difference of the log-density with x_s held fixed
    x_s0, *_ = ddim.ddim_step(x, 0.3 * x, a_t, a_s, 1.0, z)

    def fixed(theta):
        _, mean, sigma, _ = ddim.ddim_step(x, theta * x, a_t, a_s, 1.0, z)
        return ddim.policy_logprob(x_s0, mean, sigma).sum()

    h = 1e-2
    fd = (float(fixed(0.3 + h)) - float(fixed(0.3 - h))) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-2)


def test_recomputed_logprob_is_exact():
    """Re-running the same step on stored (x_t, x_s) reproduces the log-prob bit for bit."""
    sched = make_schedule(SD1, 20)
    rng = np.random.default_rng(8)
    x, eps, z = (jnp.asarray(rng.standard_normal((2, 4, 8, 8)), jnp.float32) for _ in range(3))
    step = jax.jit(lambda x, e, z: ddim.ddim_step(x, e, sched.alpha_t[5], sched.alpha_s[5], 1.0, z))
    x_s, mean, sigma, _ = step(x, eps, z)
    old = ddim.policy_logprob(x_s, mean, sigma)
    _, mean2, sigma2, _ = step(x, eps, jnp.zeros_like(z))
    new = ddim.policy_logprob(x_s, mean2, sigma2)
    np.testing.assert_array_equal(old, new)
