"""The study assembled: every finding a store can answer, as one page (`specdb report`).

`build(con, selection, store=…)` asks the same library verbs the CLI and the service ask
(spectraldb.queries, spectraldb.plots, spectraldb.catalog) and returns a `Report`: sections of
tables and figures, or, where the store lacks the runs a section needs, one line saying which
spec or factor would produce them. `to_html` renders it as one self-contained page (inline CSS,
figures as PNG data URIs, no script: it opens offline); `write_markdown` as a folder (report.md,
one PNG per figure, one CSV per table). Both render every cell with `cell()`, so their tables
agree; HTML cells also carry the full value (`data-value`).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from contract.vocabulary import ARCHITECTURE_FACTORS, STRATA
from spectraldb import catalog, plots, queries
from spectraldb.errors import QueryError
from spectraldb.predicates import check_where
from spectraldb.selection import Selection
from spectraldb.values import selected_statuses


@dataclass
class Table:
    name: str                     # file name of its CSV, and its id on the page
    caption: str
    columns: list[str]
    rows: list[dict]
    notes: list[str] = field(default_factory=list)


@dataclass
class Figure:
    name: str
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    missing: str | None = None    # one line: what would produce this section


@dataclass
class Report:
    store: str
    where: str | None
    version: str
    protocols: dict
    runs: dict
    generated: str
    sections: list[Section]


def cell(v) -> str:
    """One value as both renderings show it."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


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
    statuses = selected_statuses(sel.include_diverged)
    return [v for (v,) in con.execute(
        f"SELECT DISTINCT {factor} FROM runs WHERE status IN (SELECT unnest(?)) AND {check_where(con, sel.runs)} "
        "ORDER BY 1", [statuses]).fetchall()]


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
    statuses = selected_statuses(sel.include_diverged)
    held = []
    for f in factors:
        counts = con.execute(f"SELECT {f}, count(*) FROM runs WHERE status IN (SELECT unnest(?)) AND "
                             f"{check_where(con, sel.runs)} AND {f} IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1",
                             [statuses]).fetchall()
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
    dion = {r["optimizer"] for r in catalog.list_runs(con, where=sel.runs, limit=100_000).rows
            if r["optimizer_name"] == "dion"}
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
    labels = {}
    for r in catalog.list_runs(con, where=sel.runs, limit=100_000).rows:
        if r["optimizer_name"] == "adamw":
            labels[r["optimizer"]] = labels.get(r["optimizer"], 0) + 1
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


def build(con, sel: Selection = Selection(), *, store: str) -> Report:
    """Every section of the study the selected runs can answer. Raises QueryError when the
    store holds no runs or the selection selects none (nothing to report)."""
    check_where(con, sel.where)
    total = catalog.count_runs(con)
    if not total:
        raise QueryError(f"{store}: the store holds no runs (run `specdb run SPEC` first)")
    if not catalog.count_runs(con, where=sel.where):
        raise QueryError(f"--where: selects none of the store's {total} runs")
    scope = Scope.of(con, sel)
    return Report(store=store, where=sel.where, version=_version(), protocols=catalog.protocols(con),
                  runs=catalog.status_counts(con), generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  sections=[make(con, scope) for make in SECTIONS])


# ------------------------------------------------------------------ rendering

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f4f4f4}td{text-align:right}td.text{text-align:left}caption{text-align:left;font-weight:600}
.missing{color:#8a5a00}.note{color:#555;font-size:12px}img{max-width:100%}"""


def _id(name: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "_", name.lower())


def to_html(report: Report) -> str:
    e = html.escape
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
           "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
           "style-src 'unsafe-inline'\">", f"<title>specdb report — {e(report.store)}</title>",
           f"<style>{CSS}</style></head><body>", "<h1>specdb report</h1>", "<ul class='meta'>"]
    for key, value in _meta(report):
        out.append(f"<li><b>{e(key)}</b>: {e(value)}</li>")
    out.append("</ul>")
    for section in report.sections:
        out.append(f"<section><h2>{e(section.title)}</h2><p>{e(section.text)}</p>")
        if section.missing:
            out.append(f"<p class='missing'>Not in this store: {e(section.missing)}</p>")
        for t in section.tables:
            out.append(f"<table id='{_id(t.name)}'><caption>{e(t.caption)}</caption><tr>"
                       + "".join(f"<th>{e(c)}</th>" for c in t.columns) + "</tr>")
            for r in t.rows:
                out.append("<tr>" + "".join(
                    f"<td class='{'text' if isinstance(r.get(c), str) else 'num'}' data-value='{e(repr(r.get(c)))}'>"
                    f"{e(cell(r.get(c)))}</td>" for c in t.columns) + "</tr>")
            out.append("</table>")
            out += [f"<p class='note'>{e(n)}</p>" for n in t.notes]
        for f in section.figures:
            data = base64.b64encode(f.png).decode()
            out.append(f"<figure><img alt='{e(f.caption)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{e(f.caption)}</figcaption></figure>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def _meta(report: Report) -> list[tuple[str, str]]:
    return [("store", report.store), ("selection", report.where or "every finished run"),
            ("specdb", report.version),
            ("protocols", ", ".join(f"{p} ({n} runs)" for p, n in report.protocols.items())),
            ("runs", ", ".join(f"{n} {s}" for s, n in report.runs.items())), ("generated", report.generated)]


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(report: Report) -> str:
    out = ["# specdb report", ""] + [f"- **{k}**: {_md_cell(v)}" for k, v in _meta(report)] + [""]
    for section in report.sections:
        out += [f"## {section.title}", "", section.text, ""]
        if section.missing:
            out += [f"*Not in this store: {section.missing}*", ""]
        for t in section.tables:
            out += [f"**{_md_cell(t.caption)}** (`tables/{t.name}.csv`)", "",
                    "| " + " | ".join(_md_cell(c) for c in t.columns) + " |",
                    "|" + "|".join("---" for _ in t.columns) + "|"]
            out += ["| " + " | ".join(_md_cell(cell(r.get(c))) for c in t.columns) + " |" for r in t.rows]
            out += [""] + [f"> {_md_cell(n)}" for n in t.notes] + ([""] if t.notes else [])
        for f in section.figures:
            out += [f"![{_md_cell(f.caption)}](figures/{f.name}.png)", ""]
    return "\n".join(out) + "\n"


def write_html(report: Report, path: str | Path) -> None:
    """One file, written whole (a temporary file in the same folder, renamed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(to_html(report))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a page to share: the permissions of any new file, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_markdown(report: Report, folder: str | Path) -> None:
    """report.md with figures/NAME.png and tables/NAME.csv beside it."""
    folder = Path(folder)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    (folder / "tables").mkdir(exist_ok=True)
    for section in report.sections:
        for f in section.figures:
            (folder / "figures" / f"{f.name}.png").write_bytes(f.png)
        for t in section.tables:
            with open(folder / "tables" / f"{t.name}.csv", "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(t.columns)
                w.writerows([["" if r.get(c) is None else r.get(c) for c in t.columns] for r in t.rows])
    (folder / "report.md").write_text(to_markdown(report), encoding="utf-8")
