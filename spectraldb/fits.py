"""Power-law fits of rank against width (docs/design.md §1): OLS of ln(y) on ln(x)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import lru_cache

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


# ---------------------------------------------------------------- fits per group (the one β)

MIN_WIDTHS = 3
BOOTSTRAP = 1000


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _bootstrap(widths, seed_values, draws) -> tuple[float, float]:
    """95% percentile interval of β from resampling seeds within each width; `draws` holds one
    (BOOTSTRAP, n_seeds) count matrix per width, shared by the metrics of a group."""
    lx = np.log(np.asarray(widths, dtype=float))
    # an elementwise sum, not a BLAS product: the interval is the same to the last bit on every call
    ly = np.stack([np.log((w * np.asarray(v, dtype=float)).sum(axis=1) / len(v)) for v, w in zip(seed_values, draws)],
                  axis=1)  # (B, n)
    xc = lx - lx.mean()
    slopes = ((ly - ly.mean(axis=1, keepdims=True)) * xc).sum(axis=1) / (xc**2).sum()
    lo, hi = np.percentile(slopes, [2.5, 97.5])
    return float(lo), float(hi)


def _resample_counts(rng, n: int) -> np.ndarray:
    """(BOOTSTRAP, n) counts of each seed in a resample with replacement (rows sum to n)."""
    idx = rng.integers(0, n, size=(BOOTSTRAP, n)) + np.arange(BOOTSTRAP)[:, None] * n
    return np.bincount(idx.ravel(), minlength=BOOTSTRAP * n).reshape(BOOTSTRAP, n).astype(float)


@dataclass
class GroupFit:
    """One group's fit of rank against width: the data behind it and, per metric, the whole
    PowerLaw (β, intercept, R², t-interval) or None under the width floor, plus the seed-bootstrap
    interval where some width has several seeds."""
    key: dict                      # factor → value
    widths: list                   # distinct widths, ascending
    means: dict                    # metric → seed-mean value per width
    fits: dict                     # metric → PowerLaw | None
    boot: dict | None = None       # metric → (low, high) | (None, None); None with one seed per width
    n_seeds: int | None = None     # the most seeds at any width (None: one everywhere)

    def row(self) -> dict:
        """The flat row the verbs print: beta[_m], its interval, r2, bootstrap, Δ₁,₂, widths, seeds."""
        row = dict(self.key)
        metrics = list(self.fits)
        for m in metrics:
            suffix = "" if len(metrics) == 1 and m not in ("hard", "soft") else f"_{m}"
            fit = self.fits[m]
            row[f"beta{suffix}"] = fit.beta if fit else None
            row[f"beta{suffix}_low"] = _num(fit.ci_low) if fit else None
            row[f"beta{suffix}_high"] = _num(fit.ci_high) if fit else None
            row[f"r2{suffix}"] = fit.r2 if fit else None
            if self.boot is not None:
                row[f"beta{suffix}_boot_low"], row[f"beta{suffix}_boot_high"] = self.boot[m]
        if "hard" in metrics and "soft" in metrics:
            b = self.fits["soft"], self.fits["hard"]
            row["delta_12"] = b[0].beta - b[1].beta if None not in b else None
        row["n_widths"] = len(self.widths)
        if self.n_seeds is not None:
            row["n_seeds"] = self.n_seeds
        return row

    def line(self, metric: str, points: int = 50) -> dict | None:
        """The fitted line and its 95% band on a log-spaced grid over the widths (None without a fit)."""
        fit = self.fits.get(metric)
        if fit is None:
            return None
        w, y = np.asarray(self.widths, dtype=float), np.asarray(self.means[metric], dtype=float)
        grid = np.geomspace(w.min(), w.max(), points)
        lo, hi = confidence_band(np.log(w), np.log(y), np.log(grid), fit)
        return {"x": grid.tolist(), "y": (np.exp(fit.intercept) * grid**fit.beta).tolist(),
                "lo": np.exp(lo).tolist(), "hi": np.exp(hi).tolist()}


def confidence_band(lx, ly, lgrid, fit: PowerLaw):
    """95% confidence band of the mean response of an OLS line, in log space."""
    n = lx.size
    resid = ly - (fit.intercept + fit.beta * lx)
    s = math.sqrt(float((resid**2).sum()) / (n - 2)) if n > 2 else math.nan
    sxx = float(((lx - lx.mean()) ** 2).sum())
    half = (t_quantile(0.975, n - 2) if n > 2 else math.nan) * s * np.sqrt(1 / n + (lgrid - lx.mean()) ** 2 / sxx)
    centre = fit.intercept + fit.beta * lgrid
    return centre - half, centre + half


NOTES_EACH = 3  # past this many groups saying the same, one line names them instead of one line each


def grouped_notes(why: str, names: list[str]) -> list[str]:
    """`name: why` for each group, or past NOTES_EACH groups one line naming the first of them (a
    question per step × layer would otherwise repeat one note dozens of times)."""
    if len(names) <= NOTES_EACH:
        return [f"{name}: {why}" for name in names]
    return [f"{len(names)} groups: {why} ({', '.join(names[:NOTES_EACH])}, …)"]


def fit_groups(points, metrics, key_names, notes, label=lambda k: " / ".join(map(str, k)),
               bootstrap: bool = True) -> list[GroupFit]:
    """points: (key tuple, width, seed, {metric: value}) → one GroupFit per key (with a
    seed-bootstrap interval when some width has several seeds and `bootstrap`)."""
    series: dict[tuple, dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for key, width, seed, values in sorted(points, key=lambda p: (str(p[0]), p[1], str(p[2]), repr(sorted(p[3].items())))):
        series[key][width].append(values)  # seeds in a fixed order: the bootstrap never depends on SQL's row order
    rng = np.random.default_rng(0)
    groups, floor = [], defaultdict(list)
    for key in sorted(series, key=lambda k: tuple(str(x) for x in k)):
        by_width = dict(sorted(series[key].items()))
        widths = list(by_width)
        multi_seed = bootstrap and any(len(v) > 1 for v in by_width.values())
        draws = [_resample_counts(rng, len(by_width[w])) for w in widths] if multi_seed else None
        if len(widths) < MIN_WIDTHS:
            floor[f"{len(widths)} width{'s' if len(widths) != 1 else ''}; a fit needs at least {MIN_WIDTHS} "
                  "(refused)"].append(label(key))
        elif len(widths) == MIN_WIDTHS:
            floor[f"fit on only {MIN_WIDTHS} widths"].append(label(key))
        fits, means, boot = {}, {}, ({} if multi_seed else None)
        for m in metrics:
            seeds = [[v[m] for v in by_width[w] if v[m] is not None] for w in widths]
            means[m] = [float(np.mean(s)) if s else None for s in seeds]
            fit = None
            if len(widths) >= MIN_WIDTHS and all(seeds):
                fit = power_law(widths, means[m])
            fits[m] = fit
            if multi_seed:
                boot[m] = _bootstrap(widths, seeds, draws) if fit else (None, None)
        n_seeds = max(len(v) for v in by_width.values()) if any(len(v) > 1 for v in by_width.values()) else None
        groups.append(GroupFit(dict(zip(key_names, key)), widths, means, fits, boot, n_seeds))
    for why, names in floor.items():
        notes += grouped_notes(why, names)
    # computed in the fixed text order above (it fixes the bootstrap's draws); shown in natural
    # order, so steps and layers read 1, 200, 1000 rather than 1, 1000, 200
    return sorted(groups, key=lambda g: natural(tuple(g.key.values())))


def rows(groups: list[GroupFit]) -> list[dict]:
    return [g.row() for g in groups]


def natural(key: tuple) -> tuple:
    """A sort key that orders numbers as numbers and everything else as text, numbers first."""
    return tuple((0, float(x), "") if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
                 else (1, 0.0, str(x)) for x in key)
