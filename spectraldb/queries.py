"""The study's questions as functions over a read-only store connection (DESIGN §1, §5)."""

from __future__ import annotations

import math
from collections import defaultdict

from spectraldb.fits import power_law

BETA_KEYS = ("optimizer", "beta_hard", "beta_hard_low", "beta_hard_high", "r2_hard", "beta_soft",
             "beta_soft_low", "beta_soft_high", "r2_soft", "delta_12", "n_widths")


def width_points(con, stratum: str = "all", site: str = "post") -> list[tuple]:
    """(optimizer, ffn_width, metric, mean over seeds, n_seeds, any low_n) of finished runs."""
    return con.execute(
        """SELECT optimizer, ffn_width, metric, avg(value), count(*), bool_or(low_n)
           FROM points WHERE status = 'done' AND stratum = ? AND site = ?
           GROUP BY ALL ORDER BY optimizer, ffn_width, metric""", [stratum, site]).fetchall()


def beta(con, stratum: str = "all", site: str = "post") -> list[dict]:
    """β_hard, β_soft and Δ₁,₂ = β_soft − β_hard per optimizer: OLS of ln(rank) on ln(D)."""
    series: dict[str, dict[str, list]] = defaultdict(lambda: {"hard": [], "soft": []})
    for opt, width, metric, value, _n, _low in width_points(con, stratum, site):
        series[opt][metric].append((width, value))
    rows = []
    for opt, by_metric in series.items():
        row: dict = {"optimizer": opt}
        for metric in ("hard", "soft"):
            pts = by_metric[metric]
            try:
                fit = power_law([w for w, _ in pts], [v for _, v in pts])
                row.update({f"beta_{metric}": fit.beta, f"beta_{metric}_low": _num(fit.ci_low),
                            f"beta_{metric}_high": _num(fit.ci_high), f"r2_{metric}": fit.r2})
            except ValueError:
                row.update({f"beta_{metric}": None, f"beta_{metric}_low": None,
                            f"beta_{metric}_high": None, f"r2_{metric}": None})
        row["delta_12"] = (row["beta_soft"] - row["beta_hard"]
                           if row["beta_soft"] is not None and row["beta_hard"] is not None else None)
        row["n_widths"] = len({w for w, _ in by_metric["hard"]})
        rows.append({k: row[k] for k in BETA_KEYS})
    return rows


def _num(x: float):
    return None if x is None or math.isnan(x) else x
