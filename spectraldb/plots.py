"""The study's figures (matplotlib, headless). Each function returns a Figure; the CLI saves it."""

from __future__ import annotations

from collections import defaultdict

from spectraldb import queries
from spectraldb.errors import QueryError
from spectraldb.fits import natural
from spectraldb.selection import Selection

METRIC_TITLES = {"hard": "hard rank (participation ratio)", "soft": "soft rank (exp entropy)"}


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Every panel's axes, title, grid (minor lines too, on log axes) and legend, alike."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a panel with nothing drawn gets no (empty) legend
        ax.legend(fontsize=7)


def _drawn(answer, kind: str, has=lambda row: True) -> list[dict]:
    """The rows a figure draws. None to draw is one line saying why (the question's own notes:
    an empty answer always has one), never an empty picture or matplotlib's traceback."""
    if not answer.rows:
        raise QueryError(f"plot {kind}: nothing to draw: {'; '.join(answer.all_notes())}")
    if not any(has(r) for r in answer.rows):
        raise QueryError(f"plot {kind}: nothing to draw: no group has a fit (a fit needs {queries.MIN_WIDTHS} widths)")
    return answer.rows


def _fitted(row) -> bool:
    return row.get("beta_hard") is not None or row.get("beta_soft") is not None


def _figure(nrows: int, ncols: int, **kw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False, **kw)
    return fig, axes


def scaling_series(con, sel: Selection = Selection(), metrics=("hard", "soft")) -> tuple[dict, list[str]]:
    """The scaling figure's data, for matplotlib and the dashboard alike: {metric: [series]} with
    one series per group of `specdb query beta --by …` (protocol joins when several are selected):
    name, widths, seed-mean values, β with its interval (None under the 3-width floor) and the
    fitted line with its 95% band on a 50-point grid. The fits are the query's own (one fit each)."""
    answer = queries.beta(con, sel)
    series = {m: [] for m in metrics}
    for group, row in zip(answer.groups, answer.rows):
        name = " / ".join(f"protocol {x}" if k == "protocol" else str(x) for k, x in group.key.items())
        for metric in metrics:
            series[metric].append({"name": name, "widths": [float(w) for w in group.widths],
                                   "values": group.means[metric], "beta": row.get(f"beta_{metric}"),
                                   "beta_low": row.get(f"beta_{metric}_low"), "beta_high": row.get(f"beta_{metric}_high"),
                                   "line": group.line(metric)})
    return series, answer.notes


def scaling(con, sel: Selection = Selection()):
    """Rank vs FFN width on log–log axes, one series per group of `specdb query beta` (per
    optimizer, and per protocol when runs of several are selected) with its fitted line, the
    95% confidence band of the fit and β in the legend — the same fits, floor and numbers as
    the query: a group with fewer than 3 widths gets its points but no line."""
    strata, site = sel.strata or ("all",), sel.site
    drawn = [scaling_series(con, sel.but(strata=(stratum,))) for stratum in strata]
    if not any(series for data, _ in drawn for series in data.values()):
        raise QueryError(f"plot scaling: nothing to draw: {'; '.join(drawn[0][1])}")
    fig, axes = _figure(len(strata), 2)
    for row, (stratum, (data, _)) in enumerate(zip(strata, drawn)):
        for col, metric in enumerate(("hard", "soft")):
            ax = axes[row][col]
            if not any(v is not None for s in data[metric] for v in s["values"]):  # log axes need a value
                hint = " (`measure.metrics: hard_only` stores the hard rank alone)" if metric == "soft" else ""
                ax.text(0.5, 0.5, f"no {metric} ranks among these runs{hint}", ha="center", va="center",
                        wrap=True, transform=ax.transAxes)
                ax.set_axis_off()
                continue
            for i, s in enumerate(data[metric]):
                color = f"C{i}"
                ax.scatter(s["widths"], s["values"], color=color, s=22, zorder=3)
                if s["line"] is None:
                    ax.plot(s["widths"], s["values"], color=color, lw=0.8, ls=":",
                            label=f"{s['name']}: no fit (< {queries.MIN_WIDTHS} widths)")
                    continue
                line = s["line"]
                ax.plot(line["x"], line["y"], color=color, label=f"{s['name']}: β={s['beta']:.2f}")
                ax.fill_between(line["x"], line["lo"], line["hi"], color=color, alpha=0.15, lw=0)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            _label(ax, "FFN width D", METRIC_TITLES[metric], f"{metric} rank vs width — {stratum} tokens, {site}")
    fig.tight_layout()
    return fig


def _beta_lines(rows, x_key, xlabel, title):
    fig, axes = _figure(1, 2)
    for col, metric in enumerate(("hard", "soft")):
        ax = axes[0][col]
        by = defaultdict(list)
        for r in rows:
            if r[f"beta_{metric}"] is not None:
                by[r["optimizer"]].append((r[x_key], r[f"beta_{metric}"], r[f"beta_{metric}_low"], r[f"beta_{metric}_high"]))
        for i, (opt, pts) in enumerate(sorted(by.items(), key=lambda kv: natural((kv[0],)))):
            pts.sort(key=lambda p: natural(p[:1]))
            x = [p[0] for p in pts]
            ax.plot(x, [p[1] for p in pts], marker="o", color=f"C{i}", label=opt)
            lo = [p[2] if p[2] is not None else p[1] for p in pts]
            hi = [p[3] if p[3] is not None else p[1] for p in pts]
            ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.12, lw=0)
        _label(ax, xlabel, f"β_{metric}", f"{title}: β_{metric}")
    fig.tight_layout()
    return fig


def dynamics(con, sel: Selection = Selection()):
    """β_hard and β_soft over training steps, one line per optimizer (band: 95% t-interval)."""
    rows = _drawn(queries.dynamics(con, sel), "dynamics", _fitted)
    return _beta_lines(rows, "step", "training step", f"β over training ({sel.stratum}, {sel.site})")


def depth(con, sel: Selection = Selection()):
    """β per layer, one line per optimizer."""
    rows = _drawn(queries.depth(con, sel), "depth", _fitted)
    return _beta_lines(rows, "layer", "layer", f"β by depth ({sel.stratum}, {sel.site})")


def renyi(con, sel: Selection = Selection(), *, ffn_mult: float):
    """R_α at pre and post and ρ_α = R_α(post)/R_α(pre) against α, one line per optimizer."""
    rows = _drawn(queries.renyi(con, sel, ffn_mult=ffn_mult), "renyi")
    stratum = sel.stratum
    fig, axes = _figure(1, 3)
    alphas = [r["alpha"] for r in rows]
    order = list(dict.fromkeys(alphas))
    by = defaultdict(dict)
    for r in rows:
        by[r["optimizer"]][r["alpha"]] = r
    for col, (key, ylabel) in enumerate((("pre", "R_α at pre (c_fc output)"), ("post", "R_α at post (after activation)"),
                                         ("rho", "ρ_α = R_α(post) / R_α(pre)"))):
        ax = axes[0][col]
        for i, (opt, per_alpha) in enumerate(sorted(by.items())):
            ax.plot(range(len(order)), [per_alpha[a][key] for a in order], marker="o", color=f"C{i}", label=opt)
        ax.set_xticks(range(len(order)), [("∞" if a == "inf" else a) for a in order])
        _label(ax, "Rényi order α", ylabel, f"{ylabel.split(' ')[0]} — ffn_mult {ffn_mult:g}, {stratum}")
    fig.tight_layout()
    return fig


def trajectories(con, sel: Selection = Selection()):
    """Hard rank over training, one panel per optimizer × training length, one line per width."""
    rows = _drawn(queries.trajectories(con, sel), "trajectories")
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[(r["optimizer"], r["steps"])][r["ffn_mult"]].append((r["step"], r["hard"]))
    keys = sorted(by, key=lambda k: natural(k))
    cols = min(3, max(1, len(keys)))
    fig, axes = _figure((len(keys) + cols - 1) // cols, cols)
    for i, key in enumerate(keys):
        ax = axes[i // cols][i % cols]
        for j, (mult, pts) in enumerate(sorted(by[key].items())):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{j}", label=f"ffn_mult {mult:g}")
        ax.set_yscale("log")
        _label(ax, "training step", "hard rank", f"{key[0]}, {key[1]} steps ({sel.stratum}, {sel.site})")
    for k in range(len(keys), len(axes) * cols):
        axes[k // cols][k % cols].set_visible(False)
    fig.tight_layout()
    return fig
