"""DDIM grids and ᾱ tables match SPEC §1 and diffusers' DDIMScheduler."""

import numpy as np
import pytest

from dag_jax.diffusion import ddim
from dag_jax.diffusion.schedule import (
    alphas_cumprod_from_config,
    ddim_timesteps,
    make_schedule,
)

SD1 = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def _diffusers(config: dict, num_steps: int | None = None):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**config)
    if num_steps is not None:
        sched.set_timesteps(num_steps)
    return sched


@pytest.mark.parametrize(
    "num_steps, expected_head",
    [(50, [981, 961, 941]), (20, [951, 901, 851])],
)
def test_sd1_leading_timesteps_match_spec_and_diffusers(num_steps, expected_head):
    sched = make_schedule(SD1, num_steps)
    ts = np.asarray(sched.timesteps)
    stride = 1000 // num_steps
    assert ts.dtype == np.int32 and ts.shape == (num_steps,)
    np.testing.assert_array_equal(ts, np.arange(num_steps)[::-1] * stride + 1)
    assert list(ts[:3]) == expected_head and ts[-1] == 1
    np.testing.assert_array_equal(ts, _diffusers(SD1, num_steps).timesteps.numpy())


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [50, 20, 7])
def test_other_spacings_match_diffusers(spacing, num_steps):
    config = dict(SD1, timestep_spacing=spacing, steps_offset=0)
    ts = np.asarray(make_schedule(config, num_steps).timesteps)
    np.testing.assert_array_equal(ts, _diffusers(config, num_steps).timesteps.numpy())


def test_unknown_spacing_and_step_counts_raise():
    with pytest.raises(ValueError, match="sideways"):
        ddim_timesteps(1000, 10, "sideways")
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 1001)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    config = dict(SD1, beta_schedule=beta_schedule)
    ours = alphas_cumprod_from_config(config)
    ref = _diffusers(config).alphas_cumprod.numpy()
    assert ours.dtype == np.float32 and ours.shape == (1000,)
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_sd1_betas_follow_the_spec_formula():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(alphas_cumprod_from_config(SD1), np.cumprod(1 - betas), rtol=1e-6)


def test_unknown_beta_schedule_raises_naming_it():
    with pytest.raises(ValueError, match="cubic_wiggle"):
        alphas_cumprod_from_config(dict(SD1, beta_schedule="cubic_wiggle"))
    with pytest.raises(ValueError, match="cubic_wiggle"):
        make_schedule(dict(SD1, beta_schedule="cubic_wiggle"), 10)


def test_unknown_prediction_type_raises():
    with pytest.raises(ValueError, match="flow"):
        make_schedule(dict(SD1, prediction_type="flow"), 10)


@pytest.mark.parametrize("num_steps", [50, 20])
def test_previous_times_and_alphas_follow_the_stride(num_steps):
    sched = make_schedule(SD1, num_steps)
    acp = alphas_cumprod_from_config(SD1)
    ts, prev = np.asarray(sched.timesteps), np.asarray(sched.prev_timesteps)
    stride = 1000 // num_steps
    np.testing.assert_array_equal(prev[:-1], ts[:-1] - stride)
    np.testing.assert_array_equal(prev[:-1], ts[1:])  # s of step i is t of step i+1
    assert prev[-1] == 0 and prev.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(sched.alpha_t), acp[ts])
    np.testing.assert_array_equal(np.asarray(sched.alpha_s)[:-1], acp[ts[:-1] - stride])
    assert sched.num_steps == num_steps


def test_final_alpha_is_alpha_bar_zero_without_set_alpha_to_one():
    sched = make_schedule(SD1, 50)
    acp = alphas_cumprod_from_config(SD1)
    assert float(sched.alpha_s[-1]) == float(acp[0])
    np.testing.assert_allclose(float(sched.alpha_s[-1]), 1 - 0.00085, rtol=1e-7)
    ref = _diffusers(SD1, 50)
    assert float(sched.alpha_s[-1]) == pytest.approx(float(ref.final_alpha_cumprod), abs=1e-7)


def test_final_alpha_is_one_with_set_alpha_to_one():
    sched = make_schedule(dict(SD1, set_alpha_to_one=True), 50)
    assert float(sched.alpha_s[-1]) == 1.0


def test_schedule_takes_prediction_type_from_config():
    assert make_schedule(SD1, 4).prediction_type == "epsilon"
    assert make_schedule(dict(SD1, prediction_type="v_prediction"), 4).prediction_type == (
        "v_prediction"
    )


def test_per_sample_gathers_feed_ddim_functions():
    """A batch whose samples sit at different steps gets each sample's own ᾱ_t, ᾱ_s."""
    sched = make_schedule(SD1, 20)
    idx = np.array([0, 7, 13, 19])  # (B,) step index per sample; 19 is the last step
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    z = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    a_t, a_s = sched.alpha_t[idx], sched.alpha_s[idx]  # (B,)
    x_s, mean, sigma, x0 = ddim.ddim_step(x, eps, a_t, a_s, 1.0, z)
    logp = ddim.policy_logprob(x_s, mean, sigma)
    back = ddim.backward_logprob(x, x_s, a_t, a_s)
    assert sigma.shape == (4,) and logp.shape == (4,) and back.shape == (4,)
    for b, i in enumerate(idx):
        a_ti, a_si = float(sched.alpha_t[i]), float(sched.alpha_s[i])
        xs1, m1, s1, x01 = ddim.ddim_step(
            x[b : b + 1], eps[b : b + 1], a_ti, a_si, 1.0, z[b : b + 1]
        )
        np.testing.assert_allclose(x_s[b], xs1[0], atol=1e-6)
        np.testing.assert_allclose(x0[b], x01[0], atol=1e-6)
        np.testing.assert_allclose(sigma[b], s1, rtol=1e-6)
        np.testing.assert_allclose(logp[b], ddim.policy_logprob(xs1, m1, s1)[0], rtol=1e-6)
        ref_back = ddim.backward_logprob(x[b : b + 1], xs1, a_ti, a_si)[0]
        np.testing.assert_allclose(back[b], ref_back, rtol=1e-6)
