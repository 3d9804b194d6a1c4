"""Spectral metrics of a covariance spectrum (docs/design.md §1). Pure functions on 1-D arrays;
the worker computes them, the driver computes them for results that lack them: one definition.

All metrics act on p_i = λ_i / Σλ of a non-negative spectrum; the order of the eigenvalues
does not matter. Invariant: 1 ≤ hard_rank ≤ soft_rank ≤ D.
"""

from __future__ import annotations

import math

import numpy as np

from contract.vocabulary import RENYI_ALPHAS, alpha_name

EIG_FLOOR = 1e-12


def _probabilities(eigs) -> np.ndarray:
    lam = np.clip(np.asarray(eigs, dtype=np.float64).ravel(), EIG_FLOOR, None)
    if lam.size == 0:
        raise ValueError("empty spectrum")
    return lam / lam.sum()


def spectral_entropy(eigs) -> float:
    """SE = −Σ p log p (natural log)."""
    p = _probabilities(eigs)
    return float(-(p * np.log(p)).sum())


def soft_rank(eigs) -> float:
    """exp(spectral entropy): the Rényi effective rank of order 1."""
    return math.exp(spectral_entropy(eigs))


def hard_rank(eigs) -> float:
    """Participation ratio (Σλ)²/Σλ²: the Rényi effective rank of order 2."""
    p = _probabilities(eigs)
    return float(1.0 / (p * p).sum())


def hard_rank_of_covariance(cov) -> float:
    """The hard rank without an eigendecomposition: (Σλ)²/Σλ² = tr(C)²/‖C‖_F² exactly, since
    tr(C) = Σλ and ‖C‖_F² = tr(C²) = Σλ² for a symmetric C. The cross-check of `hard_rank`."""
    c = np.asarray(cov, dtype=np.float64)
    return float(np.trace(c) ** 2 / np.square(c).sum())


def renyi_rank(eigs, alpha: float) -> float:
    """R_α = exp(log(Σ p^α)/(1−α)); α=1 is the soft rank, α=∞ is 1/max p."""
    p = _probabilities(eigs)
    if alpha == 1:
        return soft_rank(eigs)
    if math.isinf(alpha):
        return float(1.0 / p.max())
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return float(math.exp(math.log((p**alpha).sum()) / (1.0 - alpha)))




def eee(eigs) -> float:
    """Eigenvalue early enrichment (NerVE): (2/D)·Σ_k (S_k − k/D), clamped to [0, 1].

    S_k is the share of the top k eigenvalues: 0 for a flat spectrum, (D−1)/D for a one-hot one.
    """
    p = np.sort(_probabilities(eigs))[::-1]
    D = p.size
    S = np.cumsum(p)
    value = 2.0 / D * float((S - np.arange(1, D + 1) / D).sum())
    return min(1.0, max(0.0, value))


def js_divergence(eigs_a, eigs_b) -> float:
    """Jensen–Shannon divergence (natural log, in [0, ln 2]) between two spectra, each
    normalised and sorted descending, matched index by index."""
    p = np.sort(_probabilities(eigs_a))[::-1]
    q = np.sort(_probabilities(eigs_b))[::-1]
    if p.size != q.size:
        raise ValueError(f"spectra differ in size: {p.size} vs {q.size}")
    m = (p + q) / 2

    def kl(a, b):
        return float((a * np.log(a / b)).sum())

    return min(math.log(2), max(0.0, (kl(p, m) + kl(q, m)) / 2))


def metrics(eigs) -> dict[str, float]:
    """The per-spectrum suite the `ranks` table stores (column name → value)."""
    return {"soft_rank": soft_rank(eigs), "hard_rank": hard_rank(eigs), "spectral_entropy": spectral_entropy(eigs),
            **{f"renyi_{alpha_name(a)}": renyi_rank(eigs, a) for a in RENYI_ALPHAS}, "eee": eee(eigs)}


def reinjection(pre, post) -> dict[str, float]:
    """What the `reinjection` table stores for one (pre, post) pair: JS and ρ_α = R_α(post)/R_α(pre)."""
    return {"js_divergence": js_divergence(pre, post),
            **{f"rho_{alpha_name(a)}": renyi_rank(post, a) / renyi_rank(pre, a) for a in RENYI_ALPHAS}}


def attach_metrics(spectra: list) -> list:
    """Give every computed `contract.records.Spectrum` its `metrics`, and every `pre` one whose
    `post` partner (same step, layer, stratum) was computed its `reinjection`. Spectra that
    already carry them are left alone. Runs in the worker; the driver calls it for results that
    lack them (spooled by an older version), so both paths share these definitions."""
    post = {(s.step, s.layer, s.stratum): s.eigenvalues for s in spectra if s.site == "post"}
    for s in spectra:
        if s.eigenvalues is None:
            continue
        if s.metrics is None:
            s.metrics = metrics(s.eigenvalues)
        partner = post.get((s.step, s.layer, s.stratum))
        if s.site == "pre" and partner is not None and s.reinjection is None:
            s.reinjection = reinjection(s.eigenvalues, partner)
    return spectra
