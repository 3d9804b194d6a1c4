"""Spectral metrics of a covariance spectrum (DESIGN §1). Pure functions on 1-D arrays.

All metrics act on p_i = λ_i / Σλ of a non-negative spectrum; the order of the eigenvalues
does not matter. Invariant: 1 ≤ hard_rank ≤ soft_rank ≤ D.
"""

from __future__ import annotations

import math

import numpy as np

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
