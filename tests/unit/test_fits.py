import numpy as np
import pytest
from scipy import stats

from spectraldb.fits import power_law


def test_recovers_planted_exponent_exactly():
    x = np.array([64, 128, 256, 512])
    fit = power_law(x, 3.0 * x**0.73)
    assert fit.beta == pytest.approx(0.73, abs=1e-12)
    assert fit.intercept == pytest.approx(np.log(3.0), abs=1e-12)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.stderr == pytest.approx(0.0, abs=1e-12)
    assert fit.n == 4


def test_matches_scipy_linregress_on_noisy_points():
    rng = np.random.default_rng(0)
    x = np.array([32, 64, 128, 256, 512, 1024])
    y = 2.0 * x**0.6 * np.exp(rng.normal(0, 0.1, size=x.size))
    fit = power_law(x, y)
    ref = stats.linregress(np.log(x), np.log(y))
    assert fit.beta == pytest.approx(ref.slope)
    assert fit.intercept == pytest.approx(ref.intercept)
    assert fit.r2 == pytest.approx(ref.rvalue**2)
    assert fit.stderr == pytest.approx(ref.stderr)
    half = stats.t.ppf(0.975, x.size - 2) * ref.stderr
    assert (fit.ci_low, fit.ci_high) == pytest.approx((ref.slope - half, ref.slope + half))


def test_two_points_give_a_line_without_interval():
    fit = power_law([1, 2], [1, 2])
    assert fit.beta == pytest.approx(1.0)
    assert np.isnan(fit.ci_low) and np.isnan(fit.ci_high)


def test_needs_two_distinct_widths():
    with pytest.raises(ValueError):
        power_law([4, 4], [1, 2])


def test_a_note_many_groups_share_is_one_line():
    """A question per step or layer can put dozens of groups under the width floor: past three the
    note is one line naming the first of them; up to three, one line each, as before."""
    from spectraldb.fits import fit_groups

    def points(names, widths):
        return [((name,), w, 0, {"hard": float(w)}) for name in names for w in widths]

    notes = []
    fit_groups(points(["s1", "s2", "s3", "s4", "s5"], (1, 2, 4)) + points(["x", "y"], (1, 2)), ("hard",),
               ("step",), notes)
    assert notes == ["5 groups: fit on only 3 widths (s1, s2, s3, …)",
                     "x: 2 widths; a fit needs at least 3 (refused)", "y: 2 widths; a fit needs at least 3 (refused)"]
