"""The report's sections: each asks the same library verbs the CLI and the service ask
(spectraldb.queries, spectraldb.plots, spectraldb.catalog), on the selected runs held at the
study's baseline where it compares one factor at a time; a section the store cannot answer says
which spec or factor would produce it."""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime, timezone

from contract.vocabulary import ARCHITECTURE_FACTORS, STRATA
from spectraldb import catalog, plots, queries
from spectraldb.errors import QueryError
from spectraldb.predicates import check_where
from spectraldb.report.model import Figure, Report, Section, Table, cell
from spectraldb.selection import Selection


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("specdb")
    except PackageNotFoundError:
        return "unknown"


def _table(name, caption, answer, rows=None) -> Table:
    return Table(name, caption, answer.columns, answer.rows if rows is None else rows, answer.all_notes())


def _varied(con, sel: Selection, factor: str) -> list:
    """The distinct values of a runs column among the selected runs (a factor from the vocabulary)."""
    return sorted(v for v, _ in catalog.factor_counts(con, factor, sel.runs, sel.include_diverged))


def _labels(con, sel: Selection, name: str) -> dict[str, int]:
    """Runs per optimizer label of one optimizer (a store may hold several arms of it: Dion at
    several rank fractions, AdamW at several learning rates)."""
    counts: dict[str, int] = {}
    for r in catalog.list_runs(con, where=sel.runs, limit=100_000).rows:
        if r["optimizer_name"] == name:
            counts[r["optimizer"]] = counts.get(r["optimizer"], 0) + 1
    return counts


def shown_where(sel: Selection) -> str:
    """The selection as a `--where` a reader can paste (display only: the report's own queries
    bind the held values, never this text)."""
    held = [f"{f} = " + ("'" + v.replace("'", "''") + "'" if isinstance(v, str) else cell(v)) for f, v in sel.held]
    parts = ([f"({sel.where})"] if sel.where and held else [sel.where] if sel.where else []) + held
    return " AND ".join(parts)


def narrowed(con, sel: Selection, factors) -> tuple[Selection, str]:
    """`sel` with each of `factors` that varies among its runs held at its most common value
    (ties: the smallest): the study's baseline, against which one factor at a time is varied.
    Returns the selection and a description of what was held."""
    held = []
    for f in factors:
        counts = catalog.factor_counts(con, f, sel.runs, sel.include_diverged)
        if len(counts) > 1:
            held.append((f, counts[0][0]))
    if not held:
        return sel, ""
    return sel.but(held=(*sel.held, *held)), "held at the most common value: " + \
        ", ".join(f"{f} = {cell(v)}" for f, v in held)


COUPLED = {"norm": ("norm", "postln_frac"), "postln_frac": ("norm", "postln_frac")}


@dataclass
class Scope:
    """What each section reads: `runs` the user's selection; `arch` those at the baseline
    architecture (every training length); `base` those at the baseline architecture and length."""
    runs: Selection
    arch: Selection
    base: Selection
    arch_note: str
    base_note: str

    @classmethod
    def of(cls, con, sel: Selection) -> "Scope":
        arch, arch_note = narrowed(con, sel, ARCHITECTURE_FACTORS)
        base, base_note = narrowed(con, arch, ("steps",))
        return cls(sel, arch, base, arch_note, "; ".join(n for n in (arch_note, base_note) if n))


def _held(note: str) -> str:
    return f" Runs {note}." if note else ""


# ------------------------------------------------------------------ sections


def beta_section(con, scope: Scope) -> Section:
    sel = scope.arch
    by = ("optimizer", "steps") if len(_varied(con, sel, "steps")) > 1 else ("optimizer",)
    sel = sel.but(by=by)
    s = Section("β of rank against FFN width, per stratum",
                "β_hard and β_soft with 95 % t-intervals, R², Δ₁,₂ = β_soft − β_hard and the widths fitted "
                "(site post; each run's point is the median over layers of its last `last_k` measured values). "
                f"The same numbers as `specdb query beta --stratum S --by {','.join(by)}"
                + (f' --where "{shown_where(sel)}"`.' if shown_where(sel) else "`.") + _held(scope.arch_note))
    for stratum in STRATA:
        s.tables.append(_table(f"beta_{stratum}", stratum, queries.beta(con, sel.but(strata=(stratum,)))))
    fitted = tuple(t.caption for t in s.tables if any(r.get("beta_hard") is not None for r in t.rows))
    if not fitted:
        s.missing = ("no optimizer has 3 or more FFN widths: sweep `model.ffn_mult` over at least 3 values "
                     "(experiments.yaml does: 1, 2, 4, 8)")
    else:
        s.figures.append(Figure("scaling", "Rank against FFN width (log–log), fitted lines with 95 % bands; "
                                           f"one row per stratum: {', '.join(fitted)} (`specdb plot scaling`)",
                                _png(plots.scaling(con, sel.but(strata=fitted)))))
    return s


def matched_section(con, scope: Scope) -> Section:
    sel = scope.arch
    s = Section("Matched loss, divergent geometry",
                "β per optimizer × training length, and pairs whose validation perplexity matches within 3 % "
                "while β_hard differs by at least 0.1 (`specdb query matched`)." + _held(scope.arch_note))
    s.tables.append(_table("matched_groups", "β per optimizer × steps (all tokens)",
                           queries.beta(con, sel.but(by=("optimizer", "steps")))))
    pairs = queries.matched(con, sel)
    if pairs.rows:
        s.tables.append(_table("matched_pairs", "matched pairs", pairs))
    else:
        s.missing = ("no pair of groups matches in perplexity here: add a longer-trained baseline, e.g. AdamW at "
                     "2× the steps (examples/cpu_reproduction.yaml, examples/paper_160m_matched_loss.yaml)")
    return s


def dynamics_section(con, scope: Scope) -> Section:
    sel = scope.base
    s = Section("β over training", "β at every measured step (`specdb query dynamics`); the study finds "
                                   "AdamW's aggregate β_hard falling as training goes on." + _held(scope.base_note))
    answer = queries.dynamics(con, sel)
    s.tables.append(_table("dynamics", "β per optimizer × measured step (all tokens)", answer))
    if len({r["step"] for r in answer.rows if r.get("beta_hard") is not None}) < 2:
        s.missing = "fewer than two measured steps with a fit: measure more often (`measure.every`)"
    else:
        s.figures.append(Figure("dynamics", "β over training (`specdb plot dynamics`)", _png(plots.dynamics(con, sel))))
    return s


def rank_fraction_section(con, scope: Scope) -> Section:
    sel = scope.base
    s = Section("Dion's rank fraction", "β per Dion rank fraction (TAIL and all tokens; the full-rank "
                                        "optimizers are in the first section)." + _held(scope.base_note))
    dion = set(_labels(con, sel, "dion"))
    if len(dion) < 2:
        s.missing = ("needs Dion at two or more rank fractions: `optimizer: {dion: {rank_fraction: [0.5, 0.0625]}}` "
                     "(examples/cpu_reproduction.yaml, examples/paper_160m_dion_rank_sweep.yaml)")
        return s
    for stratum in ("tail", "all"):
        answer = queries.beta(con, sel.but(strata=(stratum,)))
        s.tables.append(_table(f"rank_fraction_{stratum}", stratum, answer,
                               [r for r in answer.rows if r.get("optimizer") in dion]))
    return s


def architecture_section(con, scope: Scope) -> Section:
    sel, _ = narrowed(con, scope.runs, ("steps",))
    s = Section("Optimizer gain against architecture shift",
                "For each architecture factor the store varies: |β(variant) − β(reference)| per optimizer "
                "against the optimizer gain max β − β(AdamW) at the reference (`specdb query delta --arch F`), "
                "every other architecture factor and the training length held at their most common value; "
                "the study finds the gain larger in 28 of 30 comparisons.")
    varied = [f for f in ARCHITECTURE_FACTORS if len(_varied(con, sel, f)) > 1]
    if not varied:
        s.missing = ("no architecture factor varies among these runs: sweep `model.n_head`, `model.pos` or "
                     "`model.postln_frac` beside the optimizers (examples/paper_160m_architecture_vs_optimizer.yaml)")
        return s
    # the baseline: the AdamW label with the most runs (a store may hold several AdamW arms)
    labels = _labels(con, sel, "adamw")
    if not labels:
        s.missing = "no AdamW runs to measure the optimizer gain from: add `adamw` to the optimizers"
        return s
    baseline = max(sorted(labels), key=lambda label: labels[label])
    for factor in varied:
        coupled = COUPLED.get(factor, (factor,))  # norm and postln_frac describe one choice
        held, _ = narrowed(con, sel, [f for f in ARCHITECTURE_FACTORS if f not in coupled])
        try:
            answer = queries.delta(con, held, arch=factor, baseline=baseline)
        except QueryError as exc:  # e.g. no fit for the baseline at the reference value
            s.text += f" {factor}: {exc}."
            continue
        if not answer.rows:
            s.text += (f" {factor}: no comparison (a fit needs 3 widths for the baseline and the optimizer at the "
                       "reference value and at another).")
            continue
        s.tables.append(_table(f"delta_{factor}", f"{factor} (baseline {baseline})", answer))
    if not s.tables:
        s.missing = ("no factor varies over 3 or more widths for AdamW and another optimizer: sweep "
                     "`model.ffn_mult` in each architecture arm")
    return s


def renyi_section(con, scope: Scope) -> Section:
    sel = scope.base
    s = Section("The Rényi family", "R_α at pre and post and the reinjection ratio ρ_α = R_α(post)/R_α(pre) at the "
                                    "widest width (`specdb query renyi`)." + _held(scope.base_note))
    widths = _varied(con, sel, "ffn_mult")
    if not widths:
        s.missing = "no finished runs"
        return s
    answer = queries.renyi(con, sel, ffn_mult=widths[-1])
    s.tables.append(_table("renyi", f"ffn_mult {cell(widths[-1])}, all tokens, final step", answer))
    if not answer.rows:  # e.g. runs measured with `metrics: hard_only` store no Rényi ranks
        s.missing = f"no Rényi ranks at ffn_mult {cell(widths[-1])}: measure with `measure.metrics: full`"
        return s
    s.figures.append(Figure("renyi", f"R_α and ρ_α against α at ffn_mult {cell(widths[-1])} (`specdb plot renyi`)",
                            _png(plots.renyi(con, sel, ffn_mult=widths[-1]))))
    return s


def depth_section(con, scope: Scope) -> Section:
    sel = scope.base
    s = Section("β by layer", "β fitted per layer (`specdb query beta --layer each`)." + _held(scope.base_note))
    answer = queries.depth(con, sel)
    s.tables.append(_table("depth", "β per optimizer × layer (all tokens)", answer))
    if len({r.get("layer") for r in answer.rows}) < 2:
        s.missing = "one layer only: a depth profile needs `model.n_layer` ≥ 2"
    elif not any(r.get("beta_hard") is not None or r.get("beta_soft") is not None for r in answer.rows):
        s.missing = "no layer has a fit: sweep `model.ffn_mult` over at least 3 values"
    else:
        s.figures.append(Figure("depth", "β by layer (`specdb plot depth`)", _png(plots.depth(con, sel))))
    return s


def trajectories_section(con, scope: Scope) -> Section:
    sel = scope.arch
    s = Section("Hard-rank dynamics per width", "Hard rank at every measured step per width "
                "(`specdb query trajectories`); the study finds AdamW's rank at large widths falling back "
                "under extended training, so its β_hard shrinks." + _held(scope.arch_note))
    answer = queries.trajectories(con, sel)
    s.tables.append(_table("trajectories", "rank per optimizer × steps × width × measured step (all tokens)", answer))
    if len({r["step"] for r in answer.rows}) < 2:
        s.missing = "fewer than two measured steps: measure more often (`measure.every`)"
    else:
        s.figures.append(Figure("trajectories", "Hard rank over training, one line per width",
                                _png(plots.trajectories(con, sel))))
    return s


def trainability_section(con, scope: Scope) -> Section:
    sel = scope.runs
    s = Section("Trainability", "Final validation perplexity per architecture × optimizer; × marks a diverged "
                                "run (the study's post-LN table).")
    varied = [f for f in ARCHITECTURE_FACTORS if len(_varied(con, sel.but(include_diverged=True), f)) > 1]
    if not varied:
        s.missing = ("no architecture factor varies: `examples/paper_160m_postln.yaml` sweeps the post-LN "
                     "fraction against the optimizers")
        return s
    answer = catalog.trainability(con, varied, where=sel.runs)
    s.tables.append(_table("trainability", " × ".join(varied), answer))
    return s


SECTIONS = (beta_section, matched_section, dynamics_section, trajectories_section, rank_fraction_section,
            architecture_section, renyi_section, depth_section, trainability_section)


def build(con, sel: Selection = Selection(), *, store: str, progress=None) -> Report:
    """Every section of the study the selected runs can answer. Raises QueryError when the
    store holds no runs or the selection selects none (nothing to report). `progress(done,
    total, title)` is called as each section is built (a large store takes seconds a section)."""
    check_where(con, sel.where)
    total = catalog.count_runs(con)
    if not total:
        raise QueryError(f"{store}: the store holds no runs (run `specdb run SPEC` first)")
    if not catalog.count_runs(con, where=sel.where):
        raise QueryError(f"--where: selects none of the store's {total} runs")
    scope = Scope.of(con, sel)
    sections = []
    for make in SECTIONS:
        sections.append(make(con, scope))
        if progress is not None:
            progress(len(sections), len(SECTIONS), sections[-1].title)
    return Report(store=store, where=sel.where, version=_version(), protocols=catalog.protocols(con),
                  runs=catalog.status_counts(con), generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  sections=sections)
