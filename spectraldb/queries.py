"""The study's questions as functions over a read-only store connection (DESIGN §1, §5).

Points come from the SQL views (`points`, `layer_points`, `rank_metrics`); fits are
spectraldb.fits.power_law of ln(rank) on ln(D) across widths, seeds averaged first.
Diverged runs are left out unless `include_diverged`; failed runs never enter a fit.
"""

from __future__ import annotations

import math
from collections import defaultdict

from spectraldb.fits import power_law
from spectraldb.spectra import RENYI_ALPHAS, alpha_name

BETA_KEYS = ("optimizer", "beta_hard", "beta_hard_low", "beta_hard_high", "r2_hard", "beta_soft",
             "beta_soft_low", "beta_soft_high", "r2_soft", "delta_12", "n_widths")


def _statuses(include_diverged: bool) -> list[str]:
    return ["done", "diverged"] if include_diverged else ["done"]


def excluded_diverged(con) -> int:
    return con.execute("SELECT count(*) FROM runs WHERE status = 'diverged'").fetchone()[0]


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _fits(series: dict[str, list[tuple[float, float]]]) -> dict:
    """β, interval and R² per metric ('hard', 'soft') from (width, value) points; Δ₁,₂ and n."""
    row: dict = {}
    for metric in ("hard", "soft"):
        pts = series.get(metric, [])
        try:
            fit = power_law([w for w, _ in pts], [v for _, v in pts])
            row.update({f"beta_{metric}": fit.beta, f"beta_{metric}_low": _num(fit.ci_low),
                        f"beta_{metric}_high": _num(fit.ci_high), f"r2_{metric}": fit.r2})
        except ValueError:  # fewer than two widths
            row.update({f"beta_{metric}": None, f"beta_{metric}_low": None, f"beta_{metric}_high": None,
                        f"r2_{metric}": None})
    row["delta_12"] = (row["beta_soft"] - row["beta_hard"]
                       if row["beta_soft"] is not None and row["beta_hard"] is not None else None)
    row["n_widths"] = len({w for w, _ in series.get("hard", [])})
    return row


def _grouped_fits(rows, key_names: tuple[str, ...]) -> list[dict]:
    """rows: (*key, width, metric, value) → one fit row per key."""
    series: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for *key, width, metric, value in rows:
        series[tuple(key)][metric].append((width, value))
    return [{**dict(zip(key_names, key)), **_fits(by_metric)} for key, by_metric in series.items()]


def beta(con, stratum: str = "all", site: str = "post", include_diverged: bool = False) -> list[dict]:
    """β_hard, β_soft and Δ₁,₂ = β_soft − β_hard per optimizer (median over the last K steps,
    then over layers; seeds averaged)."""
    rows = con.execute(
        """SELECT optimizer, ffn_width, metric, avg(value) FROM points
           WHERE status IN (SELECT unnest(?)) AND stratum = ? AND site = ? AND metric IN ('soft', 'hard')
           GROUP BY ALL ORDER BY optimizer, ffn_width, metric""",
        [_statuses(include_diverged), stratum, site]).fetchall()
    return [{k: r[k] for k in BETA_KEYS} for r in _grouped_fits(rows, ("optimizer",))]


def dynamics(con, stratum: str = "all", site: str = "post", include_diverged: bool = False) -> list[dict]:
    """β_hard and β_soft at every measured step (each run's point: median over layers)."""
    rows = con.execute(
        """WITH per_run AS (
               SELECT run_id, step, metric, median(value) AS value FROM rank_metrics
               WHERE site = ? AND stratum = ? AND metric IN ('soft', 'hard') GROUP BY ALL)
           SELECT r.optimizer, p.step, r.ffn_width, p.metric, avg(p.value)
           FROM per_run p JOIN runs r USING (run_id) WHERE r.status IN (SELECT unnest(?))
           GROUP BY ALL ORDER BY ALL""", [site, stratum, _statuses(include_diverged)]).fetchall()
    return _grouped_fits(rows, ("optimizer", "step"))


def depth(con, stratum: str = "all", site: str = "post", include_diverged: bool = False) -> list[dict]:
    """β per layer (each run's layer value: median over its last K measured steps)."""
    rows = con.execute(
        """SELECT r.optimizer, l.layer, r.ffn_width, l.metric, avg(l.value)
           FROM layer_points l JOIN runs r USING (run_id)
           WHERE l.site = ? AND l.stratum = ? AND l.metric IN ('soft', 'hard') AND r.status IN (SELECT unnest(?))
           GROUP BY ALL ORDER BY ALL""", [site, stratum, _statuses(include_diverged)]).fetchall()
    return _grouped_fits(rows, ("optimizer", "layer"))


def renyi(con, ffn_mult: float, step: int | None = None, stratum: str = "all",
          include_diverged: bool = False) -> list[dict]:
    """R_α at pre and post and ρ_α = R_α(post)/R_α(pre) per optimizer × α, at one width and step
    (default: each run's final measured step): median over layers (and seeds), with the
    layer spread of ρ_α."""
    step_filter = "k.step = ?" if step is not None else \
        "k.step = (SELECT max(step) FROM ranks x WHERE x.run_id = k.run_id)"
    params = [stratum, ffn_mult, _statuses(include_diverged)] + ([step] if step is not None else [])
    ranks = con.execute(
        f"""SELECT r.optimizer, k.metric, k.site, median(k.value)
            FROM rank_metrics k JOIN runs r USING (run_id)
            WHERE k.stratum = ? AND r.ffn_mult = ? AND r.status IN (SELECT unnest(?)) AND {step_filter}
              AND k.metric LIKE 'renyi:%' GROUP BY ALL""", params).fetchall()
    rho_cols = ", ".join(f"median(rho_{alpha_name(a)}), min(rho_{alpha_name(a)}), max(rho_{alpha_name(a)})"
                         for a in RENYI_ALPHAS)
    rho = con.execute(
        f"""SELECT r.optimizer, median(k.js_divergence), count(DISTINCT k.layer), {rho_cols}
            FROM reinjection k JOIN runs r USING (run_id)
            WHERE k.stratum = ? AND r.ffn_mult = ? AND r.status IN (SELECT unnest(?)) AND {step_filter}
            GROUP BY ALL""", params).fetchall()
    value = {(o, m, s): v for o, m, s, v in ranks}
    out = []
    for o, js, n_layers, *stats in sorted(rho):
        for i, a in enumerate(RENYI_ALPHAS):
            name = "inf" if math.isinf(a) else f"{a:g}"
            out.append({"optimizer": o, "alpha": name, "pre": value.get((o, f"renyi:{name}", "pre")),
                        "post": value.get((o, f"renyi:{name}", "post")), "rho": stats[3 * i],
                        "rho_min": stats[3 * i + 1], "rho_max": stats[3 * i + 2], "js_divergence": js,
                        "n_layers": n_layers})
    return out
