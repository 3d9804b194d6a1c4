"""The study's questions over a read-only store connection (docs/design.md §1, §5).

Every verb is `verb(con, selection, **its own options) -> Answer`: the Selection
(spectraldb.selection) says which runs and measurements; β is `power_law(width, point)` per group
(spectraldb.fits), and an Answer keeps the group fits behind its rows (`answer.groups`).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from contract.vocabulary import ARCHITECTURE_FACTORS, FACTORS, RENYI_ALPHAS, STRATA, alpha_label
from spectraldb.answer import Answer
from spectraldb.errors import QueryError
from spectraldb.fits import MIN_WIDTHS, fit_groups, natural, rows  # noqa: F401 - MIN_WIDTHS is part of this API
from spectraldb.predicates import check_metric, check_strata, check_where  # noqa: F401 - the API's checks
from spectraldb.selection import Selection
from spectraldb.catalog import count_runs, factor_counts, optimizer_names
from spectraldb.values import (Point, excluded_diverged, flag_low_n, renyi_medians, run_factors, run_values,
                               selected_protocols, split_protocols, width_means)


def answered(con, sel: Selection, rows_, notes, groups=()) -> Answer:
    excluded = 0 if sel.include_diverged else excluded_diverged(con, sel.runs)
    if not rows_ and not notes:  # an empty table alone reads like a broken command
        total = count_runs(con)
        notes = [f"no finished run of the store's {total} has values for this selection (stratum {sel.stratum}, "
                 f"site {sel.site}{', where ' + sel.where if sel.where else ''})" if total else
                 "the store holds no runs (run `specdb run SPEC` first)"]
    return Answer(rows_, notes, excluded, list(groups))


def beta(con, sel: Selection = Selection(), *, metric: str | None = None) -> Answer:
    """β of rank vs FFN width per group (default: per optimizer; hard, soft and Δ₁,₂)."""
    metrics = (metric,) if metric else ("hard", "soft")
    notes: list[str] = []
    vals = run_values(con, metrics, factors=sel.group_by() + ("protocol", "d_model"), stratum=sel.stratum,
                      site=sel.site, window=sel.window, step=sel.step, by_layer=sel.layer == "each", where=sel.runs,
                      include_diverged=sel.include_diverged)
    by = split_protocols(sel.group_by(), run_factors(vals).values(), notes)
    extra = ("layer",) if sel.layer == "each" else ()
    pts = [Point(tuple(v.factors[f] for f in by) + ((v.layer,) if extra else ()), v.factors["ffn_width"],
                 v.factors["seed"], v.values) for v in vals]
    groups = fit_groups(pts, metrics, tuple(by) + extra, notes)
    flag_confounded_width(vals, by, notes)
    out = rows(groups)
    flag_low_n(out, pts, tuple(by) + extra, notes)
    if metric:
        out = [{**{k: r[k] for k in tuple(by) + extra}, "metric": metric,
                **{k: v for k, v in r.items() if k not in tuple(by) + extra}} for r in out]
    return answered(con, sel, out, notes, groups)


def flag_confounded_width(vals, by, notes) -> None:
    """A group whose runs change d_model along with the FFN width (a suite of model sizes, not a
    width sweep) gets a note: its β mixes the FFN's width with the model's size."""
    sizes: dict[tuple, set] = {}
    for v in vals:
        sizes.setdefault(tuple(v.factors[f] for f in by), set()).add(v.factors.get("d_model"))
    for key, models in sorted(sizes.items(), key=lambda kv: str(kv[0])):
        models.discard(None)
        if len(models) > 1:
            notes.append(f"{_label(key)}: d_model changes with the width ({', '.join(map(str, sorted(models)))}): "
                         "β mixes FFN width with model size")


def dynamics(con, sel: Selection = Selection()) -> Answer:
    """β_hard and β_soft at every measured step (each run's point: median over layers)."""
    notes: list[str] = []
    vals = run_values(con, ("hard", "soft"), factors=("optimizer", "protocol"), stratum=sel.stratum, site=sel.site,
                      by_step=True, include_diverged=sel.include_diverged, where=sel.runs)
    by = split_protocols(("optimizer",), run_factors(vals).values(), notes)
    pts = [Point(tuple(v.factors[f] for f in by) + (v.step,), v.factors["ffn_width"], v.factors["seed"], v.values)
           for v in vals]
    groups = fit_groups(pts, ("hard", "soft"), by + ("step",), notes)
    return answered(con, sel, rows(groups), notes, groups)


def trajectories(con, sel: Selection = Selection()) -> Answer:
    """Rank at every measured step per optimizer × training length × width (each run's point:
    median over layers; seeds averaged): how hard and soft rank move as training goes on."""
    vals = run_values(con, ("hard", "soft"), factors=("optimizer", "steps", "ffn_mult"), stratum=sel.stratum,
                      site=sel.site, by_step=True, where=sel.runs, include_diverged=sel.include_diverged)
    groups: dict[tuple, list] = defaultdict(list)
    for v in vals:
        groups[(v.factors["optimizer"], v.factors["steps"], v.factors["ffn_mult"], v.step)].append(v.values)
    out = [{"optimizer": o, "steps": steps, "ffn_mult": mult, "step": step, "runs": len(vs),
            "hard": _seed_mean(x["hard"] for x in vs), "soft": _seed_mean(x["soft"] for x in vs)}
           for (o, steps, mult, step), vs in sorted(groups.items(), key=lambda kv: natural(kv[0]))]
    return answered(con, sel, out, [])


def _seed_mean(values) -> float | None:
    """The mean over the seeds that hold a value (a `hard_only` run stores no soft rank): None if none does."""
    held = [v for v in values if v is not None]
    return float(np.mean(held)) if held else None


def depth(con, sel: Selection = Selection()) -> Answer:
    """β per layer (each run's layer value: median over its last K measured steps)."""
    return beta(con, sel.but(layer="each"))


def renyi(con, sel: Selection = Selection(), *, ffn_mult: float) -> Answer:
    """R_α at pre and post and ρ_α = R_α(post)/R_α(pre) per optimizer × α, at one width and step
    (default: each run's final measured step): median over layers (and seeds), with the
    layer spread of ρ_α. The selection's stratum, step and predicate apply (its site does not: both
    are read)."""
    stratum, step = sel.stratum, sel.step
    if not (isinstance(ffn_mult, (int, float)) and math.isfinite(ffn_mult) and ffn_mult > 0):
        raise QueryError(f"--ffn-mult: must be a finite number > 0 (got {ffn_mult})")
    ranks, rho = renyi_medians(con, sel.runs, stratum, ffn_mult, step, sel.include_diverged)
    value = {(o, m, s): v for o, m, s, v in ranks}
    out = []
    for o, js, n_layers, *stats in sorted(rho):
        for i, a in enumerate(RENYI_ALPHAS):
            name = alpha_label(a)
            out.append({"optimizer": o, "alpha": name, "pre": value.get((o, f"renyi:{name}", "pre")),
                        "post": value.get((o, f"renyi:{name}", "post")), "rho": stats[3 * i],
                        "rho_min": stats[3 * i + 1], "rho_max": stats[3 * i + 2], "js_divergence": js,
                        "n_layers": n_layers})
    notes = []
    if not out:
        widths = sorted(w for w, _ in factor_counts(con, "ffn_mult", sel.runs, sel.include_diverged))
        if ffn_mult in widths:
            notes.append(f"the runs at ffn_mult {ffn_mult:g} hold no Rényi ranks (a run measured with "
                         "`measure.metrics: hard_only` stores the hard rank alone)")
        else:
            notes.append(f"no finished run at ffn_mult {ffn_mult:g} in this selection"
                         + (f" (its widths: {', '.join(f'{w:g}' for w in widths)})" if widths else ""))
    return answered(con, sel, out, notes)


def _label(key) -> str:
    return " / ".join(str(k) for k in key)


def matched(con, sel: Selection = Selection(), *, metric: str = "hard", ppl_tol: float = 0.03,
            min_dbeta: float = 0.1) -> Answer:
    """Pairs of groups whose validation perplexity matches within `ppl_tol` (relative; width by
    width, or as a mean over the sweep) while their β differs by at least `min_dbeta`."""
    for name, value in (("--ppl-tol", ppl_tol), ("--min-dbeta", min_dbeta)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise QueryError(f"{name}: must be a finite number ≥ 0 (got {value})")
    check_metric(metric)
    where, include_diverged = sel.runs, sel.include_diverged
    notes: list[str] = []
    by = split_protocols(sel.group_by(("optimizer", "steps")), selected_protocols(con, where, include_diverged), notes)
    means = width_means(con, (metric,), by, strata=[sel.stratum], site=sel.site, where=where,
                        include_diverged=include_diverged)
    pts, ppl = [], defaultdict(lambda: defaultdict(list))
    for m in means:
        pts.append(Point(m.key, m.width, None, m.values))
        if m.val_ppl is not None:
            ppl[m.key][m.width].append(m.val_ppl)
    groups = fit_groups(pts, (metric,), tuple(by), notes, bootstrap=False)
    fits = {tuple(row[k] for k in by): row for row in rows(groups)}
    b = "" if metric not in ("hard", "soft") else f"_{metric}"
    found = []
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
                found.append({
                    "group_a": _label(ka), "group_b": _label(kb), "metric": metric,
                    "beta_a": fa[f"beta{b}"], "beta_a_low": fa[f"beta{b}_low"], "beta_a_high": fa[f"beta{b}_high"],
                    "beta_b": fb[f"beta{b}"], "beta_b_low": fb[f"beta{b}_low"], "beta_b_high": fb[f"beta{b}_high"],
                    "dbeta": dbeta, "ppl_a": ma, "ppl_b": mb, "ppl_gap": mean_gap, "max_width_gap": max(gaps),
                    "matched_by_width": max(gaps) <= ppl_tol,
                    "width_gaps": " ".join(f"{w}:{g:.3f}" for w, g in zip(common, gaps))})
    notes.append(f"{len(found)} matched pair{'s' if len(found) != 1 else ''} with |Δβ| ≥ {min_dbeta:g} "
                 f"(perplexity within {ppl_tol:.0%}; {len(keys)} groups)")
    return answered(con, sel, found, notes, groups)


def delta(con, sel: Selection = Selection(), *, arch: str = "n_head", baseline: str = "adamw",
          reference: str | None = None, metrics=("hard", "soft")) -> Answer:
    """Architecture shift |β(variant) − β(reference)| per optimizer against the optimizer gain
    max_o β_o − β_baseline at the reference architecture; a comparison passes when gain > shift."""
    if arch not in FACTORS or arch in ("optimizer", "optimizer_name", "ffn_mult", "seed"):
        raise QueryError(f"--arch: {arch!r} is not an architecture factor of runs (e.g. {', '.join(ARCHITECTURE_FACTORS)})")
    include_diverged, site, strata = sel.include_diverged, sel.site, sel.strata_or(STRATA)
    found, notes = [], []
    protocols = selected_protocols(con, sel.runs, include_diverged)
    if len(protocols) > 1:  # the k-of-n comparison has one reference: use the current protocol only
        newest = max(f["protocol"] for f in protocols)
        notes.append(f"runs of several protocols selected; comparing those of protocol {newest} only")
        sel = sel.but(held=(*sel.held, ("protocol", int(newest))))
    where = sel.runs
    everything = width_means(con, metrics, ("optimizer", arch), strata=list(strata), site=site, where=where,
                             include_diverged=include_diverged)
    names = optimizer_names(con)
    for stratum in strata:
        pts = [Point(m.key, m.width, None, m.values) for m in everything if m.stratum == stratum]
        fits = rows(fit_groups(pts, metrics, ("optimizer", "variant"), [], bootstrap=False))
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
                found.append({"stratum": stratum, "metric": m, "optimizer": o, "reference": ref, "variant": v,
                             "beta_reference": at_ref[o], "beta_variant": b, "arch_shift": shift,
                             "optimizer_gain": gain, "passes": gain > shift})
    k = sum(r["passes"] for r in found)
    notes.append(f"{k} of {len(found)} comparisons: optimizer gain > architecture shift ({arch})")
    return answered(con, sel, found, notes)


def _match_value(ref: str, values: list[str], arch: str) -> str:
    for v in values:
        if v == ref or (_float(v) is not None and _float(v) == _float(ref)):
            return v
    raise QueryError(f"--reference: {arch}={ref} is not in the store (values: {', '.join(values)})")


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
    raise QueryError(f"--baseline: {baseline!r} matches {len(by_name)} optimizer labels "
                    f"({', '.join(sorted(by_name or labels))}); name one label exactly")
