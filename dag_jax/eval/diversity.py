"""Diversity of generated images from their embeddings (SPEC §9), in float64 NumPy.

    emb = extractor(images)                        # (N, D) image embeddings of one prompt
    pairwise_diversity(emb)                        # mean 1 − cos over pairs i ≠ j, in [0, 2]
    vendi_score(emb)                               # effective number of distinct images, 1 … N
    per_prompt_mean(pairwise_diversity, emb_pk)    # (P, K, D) → mean over the P prompts
    frechet_distance(feats_aligned, feats_base)    # FID-style distance of two feature sets

- **Pairwise diversity** (Nabla-GFlowNet's metric, with CLIP embeddings instead of DreamSim):
  the mean over ordered pairs i ≠ j of 1 − cos(e_i, e_j). 0 when all images embed alike.
- **Vendi score** (Friedman & Dieng, 2023): with K the n × n cosine-similarity matrix
  (K_ii = 1), exp of the Shannon entropy of the eigenvalues of K / n (they are ≥ 0 and sum
  to 1). 1 for n identical embeddings, n for n mutually orthogonal ones.
- **Fréchet distance** (FID's formula on any features): ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b −
  2 (Σ_a^½ Σ_b Σ_a^½)^½). The trace of the matrix square root is computed from two symmetric
  eigendecompositions (Σ_a^½ from the eigenvectors of Σ_a, then the eigenvalues of the
  symmetric PSD matrix Σ_a^½ Σ_b Σ_a^½), with negative round-off eigenvalues clipped to 0: no
  complex ``sqrtm`` and no division by a singular covariance (n < D is common for small
  evaluations), and the result is the same as tr((Σ_a Σ_b)^½).

All functions accept NumPy or JAX arrays and compute in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "cosine_similarity_matrix",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "l2_normalize",
    "pairwise_diversity",
    "per_prompt_mean",
    "sqrt_psd",
    "vendi_score",
]


def _embeddings(emb, name: str, min_rows: int = 1) -> np.ndarray:
    """Return ``emb`` as a float64 (N, D) array, or raise ValueError naming ``name``."""
    x = np.asarray(emb, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected (N, D) embeddings, got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} embeddings, got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: embeddings contain NaN or inf")
    return x


def l2_normalize(emb, eps: float = 1e-12) -> np.ndarray:
    """Return float64 rows scaled to unit L2 norm (an all-zero row stays zero)."""
    x = np.asarray(emb, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_similarity_matrix(emb) -> np.ndarray:
    """Return the (N, N) float64 matrix of cosines between the rows of ``emb`` (N, D)."""
    x = l2_normalize(_embeddings(emb, "cosine_similarity_matrix"))
    k = x @ x.T
    return np.clip((k + k.T) / 2.0, -1.0, 1.0)


def pairwise_diversity(emb) -> float:
    """Return the mean over pairs i ≠ j of 1 − cos(e_i, e_j) of the N ≥ 2 rows of ``emb``.

    0 for identical embeddings, 1 for mutually orthogonal ones, at most 2.
    """
    x = _embeddings(emb, "pairwise_diversity", min_rows=2)
    n = x.shape[0]
    k = cosine_similarity_matrix(x)
    off_diagonal = k.sum() - np.trace(k)
    return float(1.0 - off_diagonal / (n * (n - 1)))


def vendi_score(emb) -> float:
    """Return exp(H(λ)), λ the eigenvalues of K / N for K the cosine-similarity matrix.

    H is the Shannon entropy (natural log, 0·log 0 = 0); eigenvalues below 0 (round-off) are
    clipped. 1 for N identical embeddings, N for N mutually orthogonal ones.
    """
    x = _embeddings(emb, "vendi_score")
    n = x.shape[0]
    lam = np.clip(np.linalg.eigvalsh(cosine_similarity_matrix(x) / n), 0.0, None)
    lam = lam[lam > 0]
    lam = lam / lam.sum()
    return float(np.exp(-np.sum(lam * np.log(lam))))


def per_prompt_mean(fn: Callable[[np.ndarray], float], emb_per_prompt) -> float:
    """Return the mean over prompts of ``fn`` applied to each prompt's embeddings.

    ``emb_per_prompt`` is a (P, K, D) array or a sequence of (K_p, D) arrays.
    """
    groups = list(emb_per_prompt)
    if not groups:
        raise ValueError("per_prompt_mean: no prompts")
    return float(np.mean([fn(g) for g in groups]))


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Return (mean (D,), covariance (D, D)) of (N, D) features, float64 (N − 1 normalised)."""
    x = _embeddings(feats, "gaussian_stats", min_rows=2)
    mu = x.mean(axis=0)
    centred = x - mu
    cov = centred.T @ centred / (x.shape[0] - 1)
    return mu, (cov + cov.T) / 2.0


def sqrt_psd(matrix) -> np.ndarray:
    """Return the symmetric square root of a symmetric PSD matrix (negative eigenvalues → 0)."""
    m = np.asarray(matrix, np.float64)
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """Return ‖μ_a − μ_b‖² + tr(Σ_a) + tr(Σ_b) − 2 tr((Σ_a^½ Σ_b Σ_a^½)^½), float64.

    The last trace is the sum of the square roots of the (clipped) eigenvalues of the
    symmetric PSD matrix Σ_a^½ Σ_b Σ_a^½. The result is clipped at 0 (round-off).
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes do not match: μ {mu_a.shape} / {mu_b.shape}, "
            f"Σ {cov_a.shape} / {cov_b.shape}"
        )
    root_a = sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    eig = np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)
    distance = (
        np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sum(np.sqrt(eig))
    )
    return float(max(distance, 0.0))


def frechet_distance(feats_a, feats_b) -> float:
    """Return the Fréchet distance between Gaussians fitted to two (N, D) feature sets.

    FID's formula (``frechet_distance_from_stats``) on any features: Inception pool features
    give FID, CLIP image embeddings give the "FD_CLIP" of the evaluation. Each set needs at
    least 2 rows; the two sets may differ in size but not in D.
    """
    a = _embeddings(feats_a, "frechet_distance", min_rows=2)
    b = _embeddings(feats_b, "frechet_distance", min_rows=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))
