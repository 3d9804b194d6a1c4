import math

import numpy as np
import pytest

from spectraldb.spectra import hard_rank, renyi_rank, soft_rank, spectral_entropy


def test_flat_spectrum_has_full_rank():
    eig = np.full(37, 2.5)
    assert soft_rank(eig) == pytest.approx(37)
    assert hard_rank(eig) == pytest.approx(37)
    assert spectral_entropy(eig) == pytest.approx(math.log(37))


def test_one_hot_spectrum_has_rank_one():
    eig = np.zeros(50)
    eig[3] = 7.0
    assert soft_rank(eig) == pytest.approx(1, abs=1e-6)
    assert hard_rank(eig) == pytest.approx(1, abs=1e-9)


def test_hand_computed_two_level_spectrum():
    eig = np.array([3.0, 1.0])  # p = (3/4, 1/4)
    assert hard_rank(eig) == pytest.approx(1 / (0.75**2 + 0.25**2))
    assert soft_rank(eig) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


@pytest.mark.parametrize("seed", range(5))
def test_hard_le_soft_le_dim(seed):
    rng = np.random.default_rng(seed)
    eig = rng.exponential(size=64) ** rng.uniform(0.5, 4)
    assert 1 <= hard_rank(eig) <= soft_rank(eig) <= 64 + 1e-9


def test_renyi_family_matches_soft_and_hard():
    eig = np.random.default_rng(1).exponential(size=30)
    assert renyi_rank(eig, 1) == pytest.approx(soft_rank(eig))
    assert renyi_rank(eig, 2) == pytest.approx(hard_rank(eig))
    assert renyi_rank(eig, math.inf) == pytest.approx(eig.sum() / eig.max())


def test_gaussian_sample_hard_rank_follows_marchenko_pastur():
    # Identity covariance sampled N times: E Σλ² ≈ D²(1 + D/N)/D, so hard ≈ D / (1 + D/N).
    from workers.extract import StreamingCovariance

    D, N = 100, 2000
    x = np.random.default_rng(0).standard_normal((N, D))
    eig = StreamingCovariance(D).update(x).eigenvalues()
    assert hard_rank(eig) == pytest.approx(D / (1 + D / N), rel=0.03)
    assert hard_rank(eig) < D * 0.97  # sampling noise visibly lowers the rank of a flat spectrum
