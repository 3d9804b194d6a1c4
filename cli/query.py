"""`specdb query …`: the study's questions, answered from the store (docs/design.md §1)."""

from __future__ import annotations

from typing import List, Optional

import typer

from cli.common import DEFAULT_DB, DbOpt, FormatOpt, capped_memory, check_format, cli_time_limit, translated
from cli.output import render

query_app = typer.Typer(no_args_is_help=True, help="The study's questions, answered from the store.")

StratumOpt = typer.Option("all", help="all | head | mid | tail")
SiteOpt = typer.Option("post", help="pre | post")
DivergedOpt = typer.Option(False, "--include-diverged", help="Keep diverged runs in the fits.")
WhereOpt = typer.Option(None, "--where", help='Predicate on the runs table, e.g. "n_head = 12 AND seed < 3".')


def _ask(verb, fmt: str, db, sel_options: dict, columns=None, **options) -> None:
    """Build the Selection, ask the library verb, print rows (stdout) and notes (stderr)."""
    from spectraldb.bounds import ReadLimits
    from spectraldb.selection import Selection
    from spectraldb.store import connect

    check_format(fmt)
    with translated(sel_options.get("where")):
        sel = Selection(**sel_options)
        with capped_memory(ReadLimits.from_env().process_bytes), \
                connect(db or DEFAULT_DB, read_only=True, time_limit_s=cli_time_limit()) as con:
            answer = verb(con, sel, **options)
    render(answer.rows, fmt, columns or answer.columns)
    for note in answer.all_notes():
        typer.echo(note, err=True)


@query_app.command("beta")
def query_beta(stratum: str = StratumOpt, site: str = SiteOpt, include_diverged: bool = DivergedOpt,
               by: Optional[List[str]] = typer.Option(None, "--by", help="Group by these runs factors "
                                                      "(default: optimizer), e.g. --by optimizer,n_head"),
               metric: Optional[str] = typer.Option(None, help="soft | hard | renyi:α | eee (default: hard and soft)"),
               window: Optional[int] = typer.Option(None, help="Median over the last K measured steps "
                                                    "(default: each run's measure.last_k)"),
               layer: str = typer.Option("agg", help="agg (median over layers) | each (one fit per layer)"),
               step: Optional[int] = typer.Option(None, help="Fit at this measured step instead of the window."),
               where: Optional[str] = WhereOpt, db: Optional[str] = DbOpt, fmt: str = FormatOpt):
    """β of rank vs FFN width per group: β_hard, β_soft, Δ₁,₂, 95% t-intervals, R², widths.

    With two or more seeds per width, points are seed means and a seed-bootstrap 95% interval
    (beta_*_boot_low/high) is printed beside the t-interval. Groups with fewer than 3 widths get
    no fit; fits on exactly 3 are flagged.

    Examples:

      specdb query beta --stratum tail

      specdb query beta --by optimizer,n_head --metric renyi:3 --where "steps = 6000" --format json
    """
    from spectraldb.queries import beta

    _ask(beta, fmt, db, dict(strata=stratum, site=site, where=where, include_diverged=include_diverged, by=by,
                             window=window, step=step, layer=layer), metric=metric)


@query_app.command("dynamics")
def query_dynamics(stratum: str = StratumOpt, site: str = SiteOpt, include_diverged: bool = DivergedOpt,
                   where: Optional[str] = WhereOpt, db: Optional[str] = DbOpt, fmt: str = FormatOpt):
    """β_hard and β_soft at every measured step, per optimizer (β over training).

    Example: specdb query dynamics --stratum tail --format csv
    """
    from spectraldb.queries import dynamics

    _ask(dynamics, fmt, db, dict(strata=stratum, site=site, where=where, include_diverged=include_diverged))


@query_app.command("trajectories")
def query_trajectories(stratum: str = StratumOpt, site: str = SiteOpt, include_diverged: bool = DivergedOpt,
                       where: Optional[str] = WhereOpt, db: Optional[str] = DbOpt, fmt: str = FormatOpt):
    """Hard and soft rank at every measured step, per optimizer × training length × width (seed
    means): the rank dynamics behind β over training.

    Example: specdb query trajectories --where "optimizer = 'AdamW'" --format csv
    """
    from spectraldb.queries import trajectories

    _ask(trajectories, fmt, db, dict(strata=stratum, site=site, where=where, include_diverged=include_diverged))


@query_app.command("depth")
def query_depth(stratum: str = StratumOpt, site: str = SiteOpt, include_diverged: bool = DivergedOpt,
                where: Optional[str] = WhereOpt, db: Optional[str] = DbOpt, fmt: str = FormatOpt):
    """β per layer, per optimizer (depth profile).

    Example: specdb query depth --site pre
    """
    from spectraldb.queries import depth

    _ask(depth, fmt, db, dict(strata=stratum, site=site, where=where, include_diverged=include_diverged))


@query_app.command("matched")
def query_matched(stratum: str = StratumOpt, site: str = SiteOpt, include_diverged: bool = DivergedOpt,
                  by: Optional[List[str]] = typer.Option(None, "--by", help="Group factors (default: optimizer,steps)"),
                  metric: str = typer.Option("hard", help="soft | hard | renyi:α | eee"),
                  ppl_tol: float = typer.Option(0.03, "--ppl-tol", help="Relative perplexity tolerance."),
                  min_dbeta: float = typer.Option(0.1, "--min-dbeta", help="Smallest |Δβ| worth reporting."),
                  where: Optional[str] = WhereOpt, db: Optional[str] = DbOpt, fmt: str = FormatOpt):
    """Pairs of groups with matched validation perplexity but divergent β ("matched loss does
    not imply matched geometry"). Perplexity is compared width by width and as a mean over the sweep.

    Example: specdb query matched --stratum tail --ppl-tol 0.05
    """
    from spectraldb.queries import matched

    _ask(matched, fmt, db, dict(strata=stratum, site=site, where=where, include_diverged=include_diverged, by=by),
         metric=metric, ppl_tol=ppl_tol, min_dbeta=min_dbeta)


@query_app.command("delta")
def query_delta(arch: str = typer.Option("n_head", "--arch", help="Architecture factor: n_head, pos, norm, "
                                         "postln_frac, activation, n_layer, d_model, context"),
                baseline: str = typer.Option("adamw", help="Baseline optimizer (label or name)."),
                reference: Optional[str] = typer.Option(None, help="Reference architecture value "
                                                        "(default: the one with most runs)."),
                stratum: List[str] = typer.Option(["all,head,mid,tail"], "--stratum", help="Strata to compare "
                                                  "(default: all four)"),
                site: str = SiteOpt, include_diverged: bool = DivergedOpt, where: Optional[str] = WhereOpt,
                db: Optional[str] = DbOpt, fmt: str = FormatOpt):
    """Optimizer gain vs architecture shift of β, per stratum × metric × optimizer; prints "k of n".

    A comparison passes when max_o β_o − β_baseline (at the reference architecture) exceeds
    |β_o(variant) − β_o(reference)|.

    Example: specdb query delta --arch n_head --baseline adamw --reference 12
    """
    from spectraldb.queries import delta

    _ask(delta, fmt, db, dict(strata=stratum, site=site, where=where, include_diverged=include_diverged),
         arch=arch, baseline=baseline, reference=reference)


@query_app.command("renyi")
def query_renyi(ffn_mult: float = typer.Option(..., "--ffn-mult", help="The width to read (an ffn_mult of the sweep)."),
                step: Optional[int] = typer.Option(None, help="Measured step (default: each run's final step)."),
                stratum: str = StratumOpt, include_diverged: bool = DivergedOpt,
                where: Optional[str] = WhereOpt, db: Optional[str] = DbOpt, fmt: str = FormatOpt):
    """Rényi ranks R_α at pre and post and the reinjection ratio ρ_α = R_α(post)/R_α(pre) per
    optimizer, median over layers (ρ with its min and max over layers), α ∈ {0.5, 1, 1.5, 2, 3, 5, ∞}.

    Example: specdb query renyi --ffn-mult 4 --stratum tail --where "steps = 1000"
    """
    from spectraldb.queries import renyi

    _ask(renyi, fmt, db, dict(strata=stratum, step=step, include_diverged=include_diverged, where=where),
         ["optimizer", "alpha", "pre", "post", "rho", "rho_min", "rho_max", "js_divergence", "n_layers"],
         ffn_mult=ffn_mult)
