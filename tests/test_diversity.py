"""Diversity metrics: pairwise cosine distance, Vendi score, Fréchet distance (closed forms)."""

from __future__ import annotations

import numpy as np
import pytest

from dag_jax.eval import diversity as dv


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_identical_embeddings_have_no_diversity_and_vendi_one():
    emb = np.tile(_rng().normal(size=(1, 16)), (6, 1))
    assert dv.pairwise_diversity(emb) == pytest.approx(0.0, abs=1e-12)
    assert dv.vendi_score(emb) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_orthogonal_embeddings_have_vendi_n_and_diversity_one(n):
    q, _ = np.linalg.qr(_rng(n).normal(size=(16, n)))
    emb = (q.T * _rng(1).uniform(0.5, 3.0, size=(n, 1))).astype(np.float32)  # scale is ignored
    assert dv.vendi_score(emb) == pytest.approx(n, rel=1e-6)
    if n > 1:
        assert dv.pairwise_diversity(emb) == pytest.approx(1.0, abs=1e-6)


def test_vendi_and_pairwise_match_their_definitions_on_random_embeddings():
    emb = _rng(2).normal(size=(7, 5))
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    k = x @ x.T
    lam = np.clip(np.linalg.eigvalsh(k / 7), 1e-300, None)
    assert dv.vendi_score(emb) == pytest.approx(np.exp(-np.sum(lam * np.log(lam))), rel=1e-9)
    pairs = [1 - k[i, j] for i in range(7) for j in range(7) if i != j]
    assert dv.pairwise_diversity(emb) == pytest.approx(np.mean(pairs), rel=1e-12)
    assert 1.0 < dv.vendi_score(emb) <= 5.0 + 1e-9  # at most the rank


def test_per_prompt_mean_averages_over_prompts():
    groups = np.stack([np.ones((3, 3)), np.eye(3)])  # (P=2, K=3, D=3)
    assert dv.per_prompt_mean(dv.pairwise_diversity, groups) == pytest.approx(0.5)
    assert dv.per_prompt_mean(dv.vendi_score, [np.ones((2, 3)), np.eye(3)]) == pytest.approx(2.0)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square():
    feats = _rng(3).normal(size=(50, 8)) * np.linspace(0.5, 2.0, 8)
    assert dv.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    shift = np.linspace(-1.0, 1.0, 8)
    assert dv.frechet_distance(feats + shift, feats) == pytest.approx(np.sum(shift**2), rel=1e-8)
    assert dv.frechet_distance(feats + 2 * shift, feats) > dv.frechet_distance(feats + shift, feats)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    want = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = dv.frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert got == pytest.approx(want, rel=1e-12)


def test_frechet_distance_matches_the_trace_of_sqrt_of_the_product_on_full_covariances():
    a, b = _rng(4).normal(size=(6, 6)), _rng(5).normal(size=(6, 6))
    cov_a, cov_b = a @ a.T, b @ b.T
    eig = np.linalg.eigvals(cov_a @ cov_b)  # tr((Σ_a Σ_b)^½) = Σ √eig (real, ≥ 0)
    want = np.trace(cov_a) + np.trace(cov_b) - 2 * np.sum(np.sqrt(eig.real))
    got = dv.frechet_distance_from_stats(np.zeros(6), cov_a, np.zeros(6), cov_b)
    assert got == pytest.approx(want, rel=1e-8)


def test_frechet_distance_handles_singular_covariances_of_few_samples():
    feats = _rng(6).normal(size=(5, 64))  # rank-4 covariance in 64 dimensions
    assert dv.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    assert np.isfinite(dv.frechet_distance(feats, _rng(7).normal(size=(9, 64))))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="at least 2"):
        dv.pairwise_diversity(np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        dv.vendi_score(np.ones(4))
    with pytest.raises(ValueError, match="feature sizes differ"):
        dv.frechet_distance(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        dv.vendi_score(np.array([[np.nan, 1.0]]))
