"""Power-law fits of rank against width (DESIGN §1): OLS of ln(y) on ln(x)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import stdtrit  # the t quantile; lighter to import than scipy.stats


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
        half = float(stdtrit(n - 2, 0.975)) * se
    else:
        se, half = math.nan, math.nan
    return PowerLaw(beta, float(intercept), float(r2), se, beta - half, beta + half, n)
