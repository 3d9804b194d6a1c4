"""Reading the values a question fits, from a read-only store connection (docs/design.md §1, §5).

A run's value for (layer, site, stratum, metric) is the median over its last K measured steps
(or the value at one step); its point is the median over layers; `width_means` averages points
of the same width over seeds in SQL. Diverged runs are left out unless asked for; failed runs
never enter a fit. Every value the user passes reaches SQL as a bound parameter, except `where`,
which is checked to be a single expression.
"""

from __future__ import annotations

from typing import NamedTuple

from contract.vocabulary import FACTORS, FINISHED, RENYI_ALPHAS, alpha_name
from spectraldb.fits import NOTES_EACH
from spectraldb.points import point_ctes
from spectraldb.predicates import (check_factors, check_metric, check_site, check_strata, check_where,
                                   declared_factors, runs_relation)

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


def selected_statuses(include_diverged: bool) -> list[str]:
    return list(FINISHED) if include_diverged else ["done"]


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
    statuses = selected_statuses(include_diverged)
    declared = declared_factors(con)
    check_factors(factors, declared)
    factors = tuple(dict.fromkeys(("optimizer", "seed", *(f for f in factors if f in FACTORS or f in declared))))
    runs = runs_relation(con, declared)
    fast = window is None and step is None and not by_layer
    if fast:  # the stored aggregates (run_points; step_points per step) answer directly
        table, step_col = ("step_points", "p.step, ") if by_step else ("run_points", "")
        sql = f"""
            SELECT p.run_id, p.stratum, {step_col}{", ".join(f"max(p.value) FILTER (WHERE p.metric = ?) AS m{i}"
                                                    for i in range(len(metrics)))},
                   min(p.n_tokens) AS n_tokens,
                   any_value(r.ffn_width) AS ffn_width, any_value(r.final_val_ppl) AS val_ppl,
                   {", ".join(f"any_value(r.{f}) AS {f}" for f in factors)}
            FROM {table} p JOIN {runs} r USING (run_id)
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
        FROM per_run p JOIN {runs} r USING (run_id)"""
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
    # in one order whatever order the scan's threads return: a mean over runs is then the same
    # to the last bit on every call (the CLI, the service and the notebook agree exactly)
    rows.sort(key=lambda v: (v.run_id, v.stratum, -1 if v.layer is None else v.layer, -1 if v.step is None else v.step))
    return rows


def width_means(con, metrics, by, *, strata, site="post", where=None, include_diverged=False) -> list[WidthMean]:
    """Seed means per stratum × group × width from run_points, averaged in SQL, for questions
    that need no per-seed values (matched, delta)."""
    for m in metrics:
        check_metric(m)
    where = check_where(con, where)
    strata, site = check_strata(strata), check_site(site)
    statuses = selected_statuses(include_diverged)
    declared = declared_factors(con)
    by = check_factors(by, declared)
    runs = runs_relation(con, declared)
    sql = f"""
        WITH per_run AS (
            SELECT p.run_id, p.stratum, {", ".join(f"max(p.value) FILTER (WHERE p.metric = ?) AS m{i}"
                                                    for i in range(len(metrics)))}
            FROM run_points p JOIN {runs} r USING (run_id)
            WHERE r.status IN ({", ".join("?" * len(statuses))}) AND ({where}) AND p.site = ?
              AND p.stratum IN ({", ".join("?" * len(strata))}) AND p.metric IN ({", ".join("?" * len(metrics))})
            GROUP BY p.run_id, p.stratum)
        SELECT q.stratum, {", ".join(f"r.{f}" for f in by)}, r.ffn_width,
               {", ".join(f"avg(q.m{i})" for i in range(len(metrics)))}, avg(r.final_val_ppl)
        FROM per_run q JOIN {runs} r USING (run_id)
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


def selected_protocols(con, where, include_diverged) -> list[dict]:
    """[{"protocol": p}, …] of the runs a question selects (for split_protocols)."""
    statuses = selected_statuses(include_diverged)
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


def flag_low_n(rows, pts, key_names, notes) -> None:
    """Add min_n_over_d (fewest tokens per dimension behind any point of the fit) to each row,
    and a note where it is under LOW_N: there the rank measures the sample size, not the width."""
    worst: dict[tuple, tuple[float, float]] = {}
    for key, width, _seed, values in pts:
        n = values.get(N_TOKENS)
        if n is not None and width:
            ratio = n / width
            if key not in worst or ratio < worst[key][0]:
                worst[key] = (ratio, width)
    low = []
    for row in rows:
        key = tuple(row[k] for k in key_names)
        ratio, width = worst.get(key, (None, None))
        row["min_n_over_d"] = ratio
        if ratio is not None and ratio < LOW_N:
            low.append((" / ".join(map(str, key)), ratio, width))
    why = f"under {LOW_N}, its rank is capped by N, not by the spectrum"
    if len(low) <= NOTES_EACH:
        notes += [f"{name}: a point has only {ratio:.1f} tokens per dimension (width {width}; {why})"
                  for name, ratio, width in low]
    else:  # one line, not one per group × layer: which groups, and the worst point among them
        name, ratio, width = min(low, key=lambda g: g[1])
        shown = ", ".join(g[0] for g in low[:NOTES_EACH])
        notes.append(f"{len(low)} groups have a point under {LOW_N} tokens per dimension ({shown}, …; min_n_over_d "
                     f"per row); the fewest: {name}, {ratio:.1f} at width {width} ({why})")


def renyi_medians(con, runs, stratum: str, ffn_mult: float, step: int | None, include_diverged: bool):
    """At one width and step (None: each run's last measured one): (optimizer, metric, site, median
    R_α over layers and seeds) rows, and (optimizer, median JS, layers, then median/min/max ρ_α for
    each α) rows — what `renyi` answers from."""
    # a run's last measured step is the latest of its series' last steps (from_end = 1): read from
    # those rows alone, not by a max over every rank row of the run for each row (14x faster at 10k runs)
    last = ("" if step is not None else
            "JOIN (SELECT run_id, max(step) AS last_step FROM ranks WHERE from_end = 1 GROUP BY run_id) l USING (run_id)")
    step_filter = "k.step = ?" if step is not None else "k.step = l.last_step"
    step_filter += f" AND {check_where(con, runs)}"
    params = [stratum, ffn_mult, selected_statuses(include_diverged)] + ([step] if step is not None else [])
    ranks = con.execute(
        f"""SELECT r.optimizer, k.metric, k.site, median(k.value)
            FROM rank_metrics k JOIN runs r USING (run_id) {last}
            WHERE k.stratum = ? AND r.ffn_mult = ? AND r.status IN (SELECT unnest(?)) AND {step_filter}
              AND k.metric LIKE 'renyi:%' GROUP BY ALL""", params).fetchall()
    rho_cols = ", ".join(f"median(rho_{alpha_name(a)}), min(rho_{alpha_name(a)}), max(rho_{alpha_name(a)})"
                         for a in RENYI_ALPHAS)
    rho = con.execute(
        f"""SELECT r.optimizer, median(k.js_divergence), count(DISTINCT k.layer), {rho_cols}
            FROM reinjection k JOIN runs r USING (run_id) {last}
            WHERE k.stratum = ? AND r.ffn_mult = ? AND r.status IN (SELECT unnest(?)) AND {step_filter}
            GROUP BY ALL""", params).fetchall()
    return ranks, rho
