import math

import numpy as np
import pytest

from contract.metrics import hard_rank, renyi_rank, soft_rank, spectral_entropy


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


from contract.metrics import RENYI_ALPHAS, eee, js_divergence  # noqa: E402


@pytest.mark.parametrize("seed", range(4))
def test_renyi_ranks_are_non_increasing_in_alpha(seed):
    eig = np.random.default_rng(seed).exponential(size=40) ** 3
    values = [renyi_rank(eig, a) for a in RENYI_ALPHAS]
    assert all(a >= b - 1e-9 for a, b in zip(values, values[1:]))
    assert renyi_rank(eig, 0.5) <= 40 + 1e-9


def test_every_renyi_rank_is_d_on_a_flat_spectrum():
    for a in RENYI_ALPHAS:
        assert renyi_rank(np.ones(23), a) == pytest.approx(23)


def test_eee_known_answers():
    assert eee(np.ones(50)) == pytest.approx(0.0, abs=1e-12)
    one_hot = np.zeros(1000)
    one_hot[0] = 1.0
    assert eee(one_hot) == pytest.approx(0.999, abs=1e-6)
    # p = (.4, .3, .2, .1): S = (.4, .7, .9, 1), k/D = (.25, .5, .75, 1) → (2/4)·0.5
    assert eee([1, 3, 2, 4]) == pytest.approx(0.25)


def test_js_divergence_bounds():
    rng = np.random.default_rng(0)
    a, b = rng.exponential(size=30), rng.exponential(size=30) ** 4
    assert js_divergence(a, a) == pytest.approx(0.0, abs=1e-12)
    assert 0 < js_divergence(a, b) <= math.log(2)
    assert js_divergence(a, b) == pytest.approx(js_divergence(b, a))
    one_hot = np.zeros(2000)
    one_hot[0] = 1.0
    assert js_divergence(one_hot, np.ones(2000)) == pytest.approx(math.log(2), rel=0.01)


@pytest.mark.parametrize("seed, D, N", [(0, 40, 400), (1, 200, 100), (2, 64, 64)])
def test_the_hard_rank_equals_trace_squared_over_frobenius_squared(seed, D, N):
    """(Σλ)²/Σλ² = tr(C)²/‖C‖_F²: the eigenvalue path against the identity, rank-deficient too."""
    from contract.metrics import hard_rank_of_covariance

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)) @ np.diag(rng.exponential(size=D)) + rng.standard_normal(D)
    cov = np.cov(x, rowvar=False)
    eig = np.clip(np.linalg.eigvalsh(cov)[::-1], 1e-12, None)
    assert hard_rank(eig) == pytest.approx(hard_rank_of_covariance(cov), rel=1e-10)
    assert hard_rank_of_covariance(np.eye(D)) == pytest.approx(D) and hard_rank_of_covariance(np.diag([5.0] + [0] * 9)) == 1
