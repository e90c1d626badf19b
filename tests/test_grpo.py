"""GRPO (``algo=grpo``): group advantages, the closed-form KL to the reference, DDPO at kl=0,
the reference policy is the base UNet, a tiny run trains, and bad ``grpo.*`` keys are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dag_jax import train
from dag_jax.algos import ddpo, grpo
from dag_jax.algos.stats import group_advantages
from dag_jax.diffusion import ddim
from dag_jax.train.objectives import grpo as grpo_objective
from tests.test_algos import KW, _batch, _params, eps_fn
from tests.test_train import _first_epoch, flat_params, read_metrics, tiny_config

UNCOND = jnp.zeros((3, 5))


def test_group_advantages_are_the_closed_form_and_zero_for_a_group_without_spread():
    rewards = np.array([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0, -1.0, 1.0, -1.0, 1.0])
    adv = group_advantages(rewards, 4, "group")
    expected = [
        (np.array([1, 2, 3, 6]) - 3.0) / (np.sqrt(3.5) + 1e-6),  # mean 3, population std √3.5
        np.zeros(4),  # std 0: every advantage 0, not NaN
        np.array([-1, 1, -1, 1]) / (1.0 + 1e-6),
    ]
    np.testing.assert_allclose(adv, np.concatenate(expected), rtol=1e-6, atol=1e-7)


def _numerical_kl(mu_p: float, mu_q: float, sigma: float) -> float:
    """Return ∫ p log(p/q) of two 1-D Gaussians by quadrature on a fine grid."""
    x = np.linspace(min(mu_p, mu_q) - 12 * sigma, max(mu_p, mu_q) + 12 * sigma, 200_001)
    log_p = -((x - mu_p) ** 2) / (2 * sigma**2) - np.log(sigma * np.sqrt(2 * np.pi))
    log_q = -((x - mu_q) ** 2) / (2 * sigma**2) - np.log(sigma * np.sqrt(2 * np.pi))
    return float(np.trapezoid(np.exp(log_p) * (log_p - log_q), x))


def test_the_kl_term_equals_a_numerical_kl_of_the_two_gaussians():
    rng = np.random.default_rng(0)
    mean, ref = rng.normal(size=(3, 2, 2)), rng.normal(size=(3, 2, 2))
    sigma = np.array([0.3, 1.2, 0.0])  # the last row is a deterministic step
    numeric = np.array(
        [
            [_numerical_kl(m, r, s) for m, r in zip(mi.ravel(), ri.ravel())]
            for mi, ri, s in zip(mean[:2], ref[:2], sigma[:2])
        ]
    )
    for reduction, reduce in (("mean", np.mean), ("sum", np.sum)):
        kl = np.asarray(grpo.gaussian_kl_same_std(mean, ref, sigma, reduction))
        np.testing.assert_allclose(kl[:2], reduce(numeric, axis=1), rtol=1e-5)
        assert kl[2] == 0.0  # σ = 0: no density, no KL (and no NaN)
    with pytest.raises(ValueError, match="reduction"):
        grpo.gaussian_kl_same_std(mean, ref, sigma, "max")


def _grouped(batch, group=2):
    """Return ``batch`` with group-standardised advantages of made-up rewards per trajectory."""
    n = int(batch.context_index.max()) + 1
    adv = group_advantages(np.linspace(-1.0, 2.0, n) ** 2, group, "group")
    return batch.replace(advantage=jnp.asarray(adv)[batch.context_index])


def test_kl_zero_is_ddpo_clipped_loss_with_group_advantages_and_the_kl_adds_its_closed_form():
    params = _params()
    _, batch = _batch(params)
    batch = _grouped(batch)
    policy = jax.tree.map(lambda a: a * 1.1, params["policy"])  # ratios away from 1
    ref = params["policy"]
    clip = dict(clip_range=0.05, adv_clip=5.0)

    def ddpo_of(p):
        return ddpo.ddpo_loss(eps_fn, p, batch, UNCOND, **KW, **clip)[0]

    def grpo_of(p, kl_coef):
        return grpo.grpo_loss(eps_fn, p, ref, batch, UNCOND, **KW, **clip, kl_coef=kl_coef)[0]

    want, want_grad = jax.value_and_grad(ddpo_of)(policy)
    got, got_grad = jax.value_and_grad(grpo_of)(policy, 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), got_grad, want_grad
    )
    # kl > 0: DDPO's loss + kl · mean over rows of Σ (μ_θ − μ_ref)² / (2σ²) / elements
    mu, sigma = grpo.step_means(eps_fn, policy, batch, UNCOND, **KW)
    mu_ref, _ = grpo.step_means(eps_fn, ref, batch, UNCOND, **KW)
    s = np.asarray(sigma)[:, None]
    by_hand = np.mean(np.mean((np.asarray(mu) - np.asarray(mu_ref)) ** 2 / (2 * s**2), axis=1))
    assert by_hand > 1e-4
    np.testing.assert_allclose(grpo_of(policy, 0.5), want + 0.5 * by_hand, rtol=1e-5)
    # the penalty's gradient moves μ_θ toward μ_ref: a small step lowers the KL
    kl_of = lambda p: grpo_of(p, 1.0) - ddpo_of(p)
    g = jax.grad(kl_of)(policy)
    stepped = jax.tree.map(lambda p, d: p - 1e-3 * d, policy, g)
    assert float(kl_of(stepped)) < float(kl_of(policy))


def test_ddim_sigma_is_zero_at_eta_zero_so_the_kl_config_is_refused():
    assert float(ddim.ddim_sigma(0.5, 0.7, 0.0)) == 0.0
    cfg = tiny_config(algo="grpo", sample__eta=0.0, grpo__kl=0.1)
    with pytest.raises(train.ConfigError, match=r"grpo.kl=0.1 needs sample.eta > 0"):
        train.validate(cfg, num_devices=1)
    cfg.grpo.kl = 0.0  # η = 0 without the KL trains (with zero log-probs, as DDPO would)
    train.validate(cfg, num_devices=1)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(grpo__group=1), "grpo.group=1 is out of range"),
        (dict(grpo__group=3), r"sample.trajectories=8 is not divisible by grpo.group \(3\)"),
        (dict(grpo__kl=-0.1), "grpo.kl=-0.1 is out of range"),
        (dict(grpo__clip_range=0.0), "grpo.clip_range=0.0 is out of range"),
    ],
)
def test_bad_grpo_keys_fail_before_compiling(override, message):
    cfg = tiny_config(algo="grpo", **override)
    with pytest.raises(train.ConfigError, match=message):
        train.validate(cfg, num_devices=1)


@pytest.fixture(scope="module")
def shared_epoch():
    """Return (context, collected epoch) of a tiny GRPO config: groups of 4 sharing x_T."""
    cfg = tiny_config(algo="grpo", grpo__group=4, grpo__share_noise=True)
    ctx, state = _first_epoch(cfg)
    data, _ = ctx.objective.collect(ctx, state, jax.random.key(3))
    return ctx, state, data


def _groups(ctx, data, group):
    shape = (-1, group, *ctx.model.latent_shape)
    return data.prompt_idx.reshape(-1, group), np.asarray(data.traj.latents[:, 0]).reshape(shape)


def test_groups_share_their_prompt_and_x_t_and_get_group_advantages(shared_epoch):
    ctx, _, data = shared_epoch
    prompts, x_t = _groups(ctx, data, 4)
    assert (prompts == prompts[:, :1]).all()
    assert np.array_equal(x_t, np.broadcast_to(x_t[:, :1], x_t.shape))
    assert not np.array_equal(x_t[0, 0], x_t[1, 0])
    final = np.asarray(data.traj.latents[:, -1])
    assert len({row.tobytes() for row in final}) == final.shape[0]  # own step noise each
    np.testing.assert_allclose(data.advantage, group_advantages(data.rewards, 4), rtol=1e-6)
    assert (data.weight == 1).all()


def test_without_shared_noise_each_trajectory_of_a_group_has_its_own_x_t():
    cfg = tiny_config(algo="grpo", grpo__group=4, grpo__share_noise=False)
    ctx, state = _first_epoch(cfg)
    data, _ = ctx.objective.collect(ctx, state, jax.random.key(3))
    prompts, x_t = _groups(ctx, data, 4)
    assert (prompts == prompts[:, :1]).all()
    assert len({row.tobytes() for row in x_t.reshape(8, -1)}) == 8


def test_the_reference_policy_is_the_base_unet_with_the_lora_off(shared_epoch):
    ctx, state, data = shared_epoch
    model = ctx.model
    lora = jax.tree.map(  # a LoRA that changes the output (B = 0 at init would not)
        lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape),
        state.trainable["lora"],
    )
    policy = model.policy_of(model.frozen, {"lora": lora})
    x = data.traj.latents[:2, 0]
    t = jnp.full((2,), 500, jnp.int32)
    ctx_emb = data.traj.context[:2]
    base = model.pipe.unet.apply({"params": model.frozen["unet"]}, x, t, ctx_emb).sample
    ref = model.eps_fn(grpo_objective.reference_policy(policy), x, t, ctx_emb)
    adapted = model.eps_fn(policy, x, t, ctx_emb)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(base))
    assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-4
    assert grpo_objective.reference_policy(policy)["base"] is policy["base"]  # no copy


def test_a_tiny_grpo_run_trains_with_the_kl_penalty(tmp_path):
    cfg = tiny_config(algo="grpo", train__epochs=1, grpo__kl=0.04)
    state = train.train_and_evaluate(cfg, str(tmp_path))
    row = read_metrics(tmp_path)[-1]
    assert row["epoch"] == 1 and np.isfinite(row["loss"])
    assert row["kl_ref"] >= 0 and np.isfinite(row["policy_loss"])
    lora = flat_params(state)
    assert any(k.endswith("/B") and np.abs(v).max() > 0 for k, v in lora.items())
    assert not any(k.startswith("flow/") for k in lora)
