"""Power-law fits of rank against width (docs/design.md §1): OLS of ln(y) on ln(x)."""

from __future__ import annotations

import math
from functools import lru_cache
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLaw:
    beta: float
    intercept: float
    r2: float
    stderr: float
    ci_low: float
    ci_high: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def power_law(x, y) -> PowerLaw:
    """Fit y = e^intercept · x^β by unweighted least squares in log–log space.

    The interval is β ± t(0.975, n−2)·se; with n = 2 the line is exact and the interval is NaN.
    """
    lx = np.log(np.asarray(x, dtype=np.float64))
    ly = np.log(np.asarray(y, dtype=np.float64))
    n = lx.size
    if n != ly.size:
        raise ValueError("x and y differ in length")
    if n < 2 or np.ptp(lx) == 0:
        raise ValueError("a power-law fit needs at least two distinct widths")
    xm, ym = lx.mean(), ly.mean()
    sxx = float(((lx - xm) ** 2).sum())
    sxy = float(((lx - xm) * (ly - ym)).sum())
    syy = float(((ly - ym) ** 2).sum())
    beta = sxy / sxx
    intercept = ym - beta * xm
    resid = ly - (intercept + beta * lx)
    ssr = float((resid**2).sum())
    r2 = 1.0 - ssr / syy if syy > 0 else 1.0
    if n > 2:
        se = math.sqrt(ssr / (n - 2) / sxx)
        half = t_quantile(0.975, n - 2) * se
    else:
        se, half = math.nan, math.nan
    return PowerLaw(beta, float(intercept), float(r2), se, beta - half, beta + half, n)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def t_cdf(t: float, df: float) -> float:
    """Student t distribution function."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """Inverse of t_cdf by bisection (no scipy import on the query path: it costs ~0.25 s)."""
    if not 0 < p < 1:
        raise ValueError("p must lie in (0, 1)")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return (lo + hi) / 2
