"""The study's questions as functions over a read-only store connection (docs/design.md §1, §5).

A run's value for (layer, site, stratum, metric) is the median over its last K measured steps
(or the value at one step); its point is the median over layers; points of the same width are
averaged over seeds; β is power_law(width, point) per group. Diverged runs are left out unless
`include_diverged`; failed runs never enter a fit. Every value the user passes reaches SQL as a
bound parameter, except `where`, which is checked to be a single expression.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from spectraldb.errors import SpecError
from spectraldb.fits import MIN_WIDTHS, fit_groups  # noqa: F401 - MIN_WIDTHS is part of this API
from spectraldb.points import point_ctes
from spectraldb.predicates import (FACTORS, METRICS, STRATA, check_factors, check_metric,  # noqa: F401
                                   check_site, check_strata, check_where)
from spectraldb.spectra import RENYI_ALPHAS, alpha_name

LOW_N = 4  # tokens per dimension under which a rank is capped by N rather than by the spectrum (as view `points`)
N_TOKENS = "_n_tokens"  # rides in run_values' value dicts: the fewest tokens behind a run's point


class RunValue(NamedTuple):
    """One run's value (per layer or step where asked) for the metrics of a question."""
    run_id: str
    layer: int | None
    step: int | None
    values: dict          # metric → value (plus N_TOKENS: the fewest tokens behind it)
    factors: dict         # the run's factors (ffn_width, val_ppl, seed, …), shared by its rows
    stratum: str


class WidthMean(NamedTuple):
    """A group's seed-mean values at one width (run_points, averaged in SQL)."""
    stratum: str
    key: tuple
    width: int
    values: dict
    val_ppl: float | None


class Point(NamedTuple):
    """What a fit takes: the group key, the width, the seed, {metric: value}."""
    key: tuple
    width: int
    seed: int | None
    values: dict


@dataclass
class Answer:
    rows: list[dict]
    notes: list[str] = field(default_factory=list)


def _statuses(include_diverged: bool) -> list[str]:
    return ["done", "diverged"] if include_diverged else ["done"]


def excluded_diverged(con, where: str | None = None) -> int:
    """Diverged runs that the predicate selects (all diverged runs without one)."""
    return con.execute(f"SELECT count(*) FROM runs WHERE status = 'diverged' AND {check_where(con, where)}"
                       ).fetchone()[0]


def run_values(con, metrics, *, stratum="all", site="post", window=None, step=None, by_layer=False,
               by_step=False, where=None, include_diverged=False, factors=FACTORS) -> list[tuple]:
    """(run_id, layer | None, step | None, {metric: value}, {factor: value}, stratum) per run
    (and layer / step).

    The factors are ffn_width, val_ppl, stratum and every name in FACTORS, read in the same
    query. `stratum` may be a list: then rows come per run × stratum (one scan for all)."""
    cols = [check_metric(m) for m in metrics]
    where = check_where(con, where)
    strata = check_strata(stratum)
    check_site(site)
    statuses = _statuses(include_diverged)
    factors = tuple(dict.fromkeys(("optimizer", "seed", *(f for f in factors if f in FACTORS))))
    fast = window is None and step is None and not by_layer
    if fast:  # the stored aggregates (run_points; step_points per step) answer directly
        table, step_col = ("step_points", "p.step, ") if by_step else ("run_points", "")
        sql = f"""
            SELECT p.run_id, p.stratum, {step_col}{", ".join(f"max(p.value) FILTER (WHERE p.metric = ?) AS m{i}"
                                                    for i in range(len(metrics)))},
                   min(p.n_tokens) AS n_tokens,
                   any_value(r.ffn_width) AS ffn_width, any_value(r.final_val_ppl) AS val_ppl,
                   {", ".join(f"any_value(r.{f}) AS {f}" for f in factors)}
            FROM {table} p JOIN runs r USING (run_id)
            WHERE r.status IN ({", ".join("?" * len(statuses))}) AND ({where}) AND p.site = ?
              AND p.stratum IN ({", ".join("?" * len(strata))})
              AND p.metric IN ({", ".join("?" * len(metrics))})
            GROUP BY p.run_id, p.stratum{", p.step" if by_step else ""}"""
        cur = con.execute(sql, [*metrics, *statuses, site, *strata, *metrics])
        return _rows(cur, (*metrics, N_TOKENS), by_layer, by_step)
    if by_step:
        clause, params = "TRUE", []
    elif step is not None:
        clause, params = "k.step = ?", [step]
    else:
        clause, params = "k.from_end <= coalesce(?::INTEGER, sel.last_k)", [window]
    # plain placeholders (not IN (SELECT unnest(?))) keep the filters pushed into the scan
    ctes = point_ctes(cols, filters=f"k.site = ? AND k.stratum IN ({', '.join('?' * len(strata))})",
                      window=clause, by_layer=by_layer, by_step=by_step)
    sql = f"""
        WITH sel AS (SELECT run_id, last_k FROM runs
                     WHERE status IN ({", ".join("?" * len(statuses))}) AND ({where})),
        {ctes}
        SELECT p.* EXCLUDE (n_layers), r.ffn_width, r.final_val_ppl AS val_ppl, {", ".join(f"r.{f}" for f in factors)}
        FROM per_run p JOIN runs r USING (run_id)"""
    cur = con.execute(sql, [*statuses, site, *strata, *params])
    return _rows(cur, (*metrics, N_TOKENS), by_layer, by_step)


def _rows(cur, metrics, by_layer, by_step) -> list[RunValue]:
    """RunValues from a run_values cursor; one factors dict per run, shared by its rows."""
    names = [d[0] for d in cur.description]
    n_keys = 2 + by_layer + by_step
    n_vals = len(metrics)
    fact_names = names[n_keys + n_vals:]
    facts: dict[str, dict] = {}
    rows = []
    for r in cur.fetchall():
        f = facts.get(r[0])
        if f is None:
            f = facts[r[0]] = dict(zip(fact_names, r[n_keys + n_vals:]))
        rows.append(RunValue(r[0], r[2] if by_layer else None, r[2 + by_layer] if by_step else None,
                             dict(zip(metrics, r[n_keys:n_keys + n_vals])), f, r[1]))
    return rows


def width_means(con, metrics, by, *, strata, site="post", where=None, include_diverged=False) -> list[WidthMean]:
    """Seed means per stratum × group × width from run_points, averaged in SQL, for questions
    that need no per-seed values (matched, delta)."""
    for m in metrics:
        check_metric(m)
    where = check_where(con, where)
    strata, site = check_strata(strata), check_site(site)
    statuses = _statuses(include_diverged)
    by = check_factors(by)
    sql = f"""
        WITH per_run AS (
            SELECT p.run_id, p.stratum, {", ".join(f"max(p.value) FILTER (WHERE p.metric = ?) AS m{i}"
                                                    for i in range(len(metrics)))}
            FROM run_points p JOIN runs r USING (run_id)
            WHERE r.status IN ({", ".join("?" * len(statuses))}) AND ({where}) AND p.site = ?
              AND p.stratum IN ({", ".join("?" * len(strata))}) AND p.metric IN ({", ".join("?" * len(metrics))})
            GROUP BY p.run_id, p.stratum)
        SELECT q.stratum, {", ".join(f"r.{f}" for f in by)}, r.ffn_width,
               {", ".join(f"avg(q.m{i})" for i in range(len(metrics)))}, avg(r.final_val_ppl)
        FROM per_run q JOIN runs r USING (run_id)
        GROUP BY q.stratum, {", ".join(f"r.{f}" for f in by)}, r.ffn_width"""
    out = []
    for row in con.execute(sql, [*metrics, *statuses, site, *strata, *metrics]).fetchall():
        k = len(by)
        out.append(WidthMean(row[0], tuple(row[1:1 + k]), row[1 + k],
                             dict(zip(metrics, row[2 + k:2 + k + len(metrics)])), row[-1]))
    return out


def run_factors(rows: list[RunValue]) -> dict[str, dict]:
    """run_id → factors, from run_values rows."""
    return {r.run_id: r.factors for r in rows}


def beta(con, stratum: str = "all", site: str = "post", include_diverged: bool = False, *, by=("optimizer",),
         metric: str | None = None, window: int | None = None, layer: str = "agg", step: int | None = None,
         where: str | None = None) -> Answer:
    """β of rank vs FFN width per group (default: per optimizer; hard, soft and Δ₁,₂)."""
    metrics = (metric,) if metric else ("hard", "soft")
    by = check_factors(by)
    if window is not None and window < 1:
        raise SpecError(f"--window: must be at least 1 measured step (got {window})")
    if layer not in ("agg", "each"):
        raise SpecError(f"--layer: expected agg or each, got {layer!r}")
    notes: list[str] = []
    vals = run_values(con, metrics, factors=tuple(by) + ("protocol",), stratum=stratum, site=site, window=window,
                      step=step, by_layer=layer == "each", where=where, include_diverged=include_diverged)
    by = split_protocols(by, run_factors(vals).values(), notes)
    extra = ("layer",) if layer == "each" else ()
    pts = [Point(tuple(v.factors[f] for f in by) + ((v.layer,) if extra else ()), v.factors["ffn_width"],
                 v.factors["seed"], v.values) for v in vals]
    rows = fit_groups(pts, metrics, tuple(by) + extra, notes)
    _flag_low_n(rows, pts, tuple(by) + extra, notes)
    if metric:
        rows = [{**{k: r[k] for k in tuple(by) + extra}, "metric": metric,
                 **{k: v for k, v in r.items() if k not in tuple(by) + extra}} for r in rows]
    return Answer(rows, notes)


def selected_protocols(con, where, include_diverged) -> list[dict]:
    """[{"protocol": p}, …] of the runs a question selects (for split_protocols)."""
    statuses = _statuses(include_diverged)
    sql = (f"SELECT DISTINCT coalesce(protocol, 1) FROM runs WHERE status IN ({', '.join('?' * len(statuses))}) "
           f"AND {check_where(con, where)}")
    return [{"protocol": p} for (p,) in con.execute(sql, statuses).fetchall()]


def split_protocols(by, facts, notes) -> tuple:
    """Runs measured under different protocols are never pooled into one fit: when the selection
    holds several, `protocol` joins the group key and a note says so (docs/design.md)."""
    by = tuple(by)
    found = sorted({f.get("protocol") or 1 for f in facts})
    if len(found) > 1 and "protocol" not in by:
        notes.append(f"runs of protocols {', '.join(map(str, found))} are fitted separately (column protocol); "
                     f"--where \"protocol = {found[-1]}\" keeps only the current one")
        by += ("protocol",)
    return by


def _flag_low_n(rows, pts, key_names, notes) -> None:
    """Add min_n_over_d (fewest tokens per dimension behind any point of the fit) to each row,
    and a note where it is under LOW_N: there the rank measures the sample size, not the width."""
    worst: dict[tuple, tuple[float, float]] = {}
    for key, width, _seed, values in pts:
        n = values.get(N_TOKENS)
        if n is not None and width:
            ratio = n / width
            if key not in worst or ratio < worst[key][0]:
                worst[key] = (ratio, width)
    for row in rows:
        key = tuple(row[k] for k in key_names)
        ratio, width = worst.get(key, (None, None))
        row["min_n_over_d"] = ratio
        if ratio is not None and ratio < LOW_N:
            notes.append(f"{' / '.join(map(str, key))}: a point has only {ratio:.1f} tokens per dimension "
                         f"(width {width}; under {LOW_N}, its rank is capped by N, not by the spectrum)")


def dynamics(con, stratum: str = "all", site: str = "post", include_diverged: bool = False, **kw) -> Answer:
    """β_hard and β_soft at every measured step (each run's point: median over layers)."""
    notes: list[str] = []
    vals = run_values(con, ("hard", "soft"), factors=("optimizer", "protocol"), stratum=stratum, site=site,
                      by_step=True, include_diverged=include_diverged, **kw)
    by = split_protocols(("optimizer",), run_factors(vals).values(), notes)
    pts = [Point(tuple(v.factors[f] for f in by) + (v.step,), v.factors["ffn_width"], v.factors["seed"], v.values)
           for v in vals]
    return Answer(fit_groups(pts, ("hard", "soft"), by + ("step",), notes), notes)


def depth(con, stratum: str = "all", site: str = "post", include_diverged: bool = False, **kw) -> Answer:
    """β per layer (each run's layer value: median over its last K measured steps)."""
    return beta(con, stratum, site, include_diverged, layer="each", **kw)


def renyi(con, ffn_mult: float, step: int | None = None, stratum: str = "all",
          include_diverged: bool = False) -> list[dict]:
    """R_α at pre and post and ρ_α = R_α(post)/R_α(pre) per optimizer × α, at one width and step
    (default: each run's final measured step): median over layers (and seeds), with the
    layer spread of ρ_α."""
    check_strata(stratum)
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
    return Answer(out)


def _label(key) -> str:
    return " / ".join(str(k) for k in key)


def matched(con, stratum: str = "all", site: str = "post", include_diverged: bool = False, *,
            by=("optimizer", "steps"), metric: str = "hard", ppl_tol: float = 0.03, min_dbeta: float = 0.1,
            where: str | None = None) -> Answer:
    """Pairs of groups whose validation perplexity matches within `ppl_tol` (relative; width by
    width, or as a mean over the sweep) while their β differs by at least `min_dbeta`."""
    for name, value in (("--ppl-tol", ppl_tol), ("--min-dbeta", min_dbeta)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise SpecError(f"{name}: must be a finite number ≥ 0 (got {value})")
    notes: list[str] = []
    by = split_protocols(by, selected_protocols(con, where, include_diverged), notes)
    means = width_means(con, (metric,), by, strata=[stratum], site=site, where=where,
                        include_diverged=include_diverged)
    pts, ppl = [], defaultdict(lambda: defaultdict(list))
    for m in means:
        pts.append(Point(m.key, m.width, None, m.values))
        if m.val_ppl is not None:
            ppl[m.key][m.width].append(m.val_ppl)
    fits = {tuple(row[k] for k in by): row for row in fit_groups(pts, (metric,), tuple(by), notes, bootstrap=False)}
    b = "" if metric not in ("hard", "soft") else f"_{metric}"
    rows = []
    keys = sorted(fits, key=lambda k: tuple(str(x) for x in k))
    for i, ka in enumerate(keys):
        for kb in keys[i + 1:]:
            fa, fb = fits[ka], fits[kb]
            common = sorted(set(ppl[ka]) & set(ppl[kb]))
            if fa[f"beta{b}"] is None or fb[f"beta{b}"] is None or not common:
                continue
            pa = [float(np.mean(ppl[ka][w])) for w in common]
            pb = [float(np.mean(ppl[kb][w])) for w in common]
            gaps = [abs(x - y) / ((x + y) / 2) for x, y in zip(pa, pb)]
            ma, mb = float(np.mean(pa)), float(np.mean(pb))
            mean_gap = abs(ma - mb) / ((ma + mb) / 2)
            dbeta = fb[f"beta{b}"] - fa[f"beta{b}"]
            if (max(gaps) <= ppl_tol or mean_gap <= ppl_tol) and abs(dbeta) >= min_dbeta:
                rows.append({
                    "group_a": _label(ka), "group_b": _label(kb), "metric": metric,
                    "beta_a": fa[f"beta{b}"], "beta_a_low": fa[f"beta{b}_low"], "beta_a_high": fa[f"beta{b}_high"],
                    "beta_b": fb[f"beta{b}"], "beta_b_low": fb[f"beta{b}_low"], "beta_b_high": fb[f"beta{b}_high"],
                    "dbeta": dbeta, "ppl_a": ma, "ppl_b": mb, "ppl_gap": mean_gap, "max_width_gap": max(gaps),
                    "matched_by_width": max(gaps) <= ppl_tol,
                    "width_gaps": " ".join(f"{w}:{g:.3f}" for w, g in zip(common, gaps))})
    notes.append(f"{len(rows)} matched pair{'s' if len(rows) != 1 else ''} with |Δβ| ≥ {min_dbeta:g} "
                 f"(perplexity within {ppl_tol:.0%}; {len(keys)} groups)")
    return Answer(rows, notes)


def delta(con, arch: str = "n_head", *, baseline: str = "adamw", reference: str | None = None,
          site: str = "post", strata=("all", "head", "mid", "tail"), metrics=("hard", "soft"),
          include_diverged: bool = False, where: str | None = None) -> Answer:
    """Architecture shift |β(variant) − β(reference)| per optimizer against the optimizer gain
    max_o β_o − β_baseline at the reference architecture; a comparison passes when gain > shift."""
    if arch not in FACTORS or arch in ("optimizer", "optimizer_name", "ffn_mult", "seed"):
        raise SpecError(f"--arch: {arch!r} is not an architecture factor of runs")
    rows, notes = [], []
    check_where(con, where)  # one balanced predicate before it is combined with the protocol below
    found = selected_protocols(con, where, include_diverged)
    if len(found) > 1:  # the k-of-n comparison has one reference: use the current protocol only
        newest = max(f["protocol"] for f in found)
        notes.append(f"runs of several protocols selected; comparing those of protocol {newest} only")
        where = f"({where}) AND protocol = {int(newest)}" if where else f"protocol = {int(newest)}"
    everything = width_means(con, metrics, ("optimizer", arch), strata=list(strata), site=site, where=where,
                             include_diverged=include_diverged)
    names = dict(con.execute("SELECT DISTINCT optimizer, optimizer_name FROM runs").fetchall())
    for stratum in strata:
        pts = [Point(m.key, m.width, None, m.values) for m in everything if m.stratum == stratum]
        fits = fit_groups(pts, metrics, ("optimizer", "variant"), [], bootstrap=False)
        if not fits:
            continue
        values = sorted({str(f["variant"]) for f in fits})
        if reference is None:  # the value with the most fitted groups; ties → the first
            reference_value = max(values, key=lambda v: (sum(str(f["variant"]) == v for f in fits), -values.index(v)))
        else:
            reference_value = reference
        ref = _match_value(reference_value, values, arch)
        base = _match_optimizer(baseline, {f["optimizer"] for f in fits}, names)
        for m in metrics:
            beta = {(f["optimizer"], str(f["variant"])): f[f"beta_{m}"] for f in fits}
            at_ref = {o: b for (o, v), b in beta.items() if v == ref and b is not None}
            if base not in at_ref:
                notes.append(f"{stratum}/{m}: no fit for baseline {base!r} at {arch}={ref}")
                continue
            gain = max(at_ref.values()) - at_ref[base]
            for (o, v), b in sorted(beta.items()):
                if v == ref or b is None or o not in at_ref:
                    continue
                shift = abs(b - at_ref[o])
                rows.append({"stratum": stratum, "metric": m, "optimizer": o, "reference": ref, "variant": v,
                             "beta_reference": at_ref[o], "beta_variant": b, "arch_shift": shift,
                             "optimizer_gain": gain, "passes": gain > shift})
    k = sum(r["passes"] for r in rows)
    notes.append(f"{k} of {len(rows)} comparisons: optimizer gain > architecture shift ({arch})")
    return Answer(rows, notes)


def _match_value(ref: str, values: list[str], arch: str) -> str:
    for v in values:
        if v == ref or (_float(v) is not None and _float(v) == _float(ref)):
            return v
    raise SpecError(f"--reference: {arch}={ref} is not in the store (values: {', '.join(values)})")


def _float(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _match_optimizer(baseline: str, labels: set, names: dict) -> str:
    """A label, or an optimizer name that stands for exactly one label (names: label → name)."""
    if baseline in labels:
        return baseline
    by_name = {label for label in labels
               if names.get(label) == baseline.lower() or label.lower() == baseline.lower()}
    if len(by_name) == 1:
        return by_name.pop()
    raise SpecError(f"--baseline: {baseline!r} matches {len(by_name)} optimizer labels "
                    f"({', '.join(sorted(by_name or labels))}); name one label exactly")
