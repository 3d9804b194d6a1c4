"""The study's questions, each declared once: its name, its options, the function that answers
it, its figure and its report section. The CLI (`specdb query NAME`, `specdb plot`), the HTTP
service (`GET /api/NAME`), the notebook reader (`spectraldb.open(…).NAME(…)`) and the report are
made from these declarations; adding a question means adding one `Verb` here (and its answer in
spectraldb/queries.py). Plain data: no CLI or web framework is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

from spectraldb import queries
from spectraldb.selection import Selection


@dataclass(frozen=True)
class Option:
    """One parameter of a question. `kind`: str, int, float, bool or list (repeatable, comma
    separated); `field`: the Selection field it fills (None: the verb's own keyword)."""
    name: str
    kind: type
    default: Any = None
    help: str = ""
    field: str | None = None
    required: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# what every question may read, as the CLI, the service and the notebook name them
SELECTION = {
    "stratum": Option("stratum", str, "all", "all | head | mid | tail", "strata"),
    "site": Option("site", str, "post", "pre | post", "site"),
    "include_diverged": Option("include_diverged", bool, False, "Keep diverged runs in the fits.", "include_diverged"),
    "by": Option("by", list, None, "Group by these runs factors (default: optimizer), e.g. --by optimizer,n_head", "by"),
    "window": Option("window", int, None, "Median over the last K measured steps (default: each run's "
                     "measure.last_k)", "window"),
    "layer": Option("layer", str, "agg", "agg (median over layers) | each (one fit per layer)", "layer"),
    "step": Option("step", int, None, "Fit at this measured step instead of the window.", "step"),
    "where": Option("where", str, None, 'Predicate on the runs table, e.g. "n_head = 12 AND seed < 3".', "where"),
}


def sel(name: str, **changes) -> Option:
    return replace(SELECTION[name], **changes)


COMMON = (sel("stratum"), sel("site"), sel("include_diverged"), sel("where"))


@dataclass(frozen=True)
class Verb:
    name: str
    answer: Callable              # queries.NAME(con, selection, **own options) → Answer
    help: str                     # the first line is the one-line summary (API, notebook, CLI list)
    options: tuple[Option, ...]   # in the CLI's order
    plot: str | None = None       # its figure: `specdb plot PLOT` (spectraldb.plots.PLOT)
    section: str | None = None    # its report section (a function of that name in spectraldb.report.sections)
    columns: tuple[str, ...] | None = None  # the CLI's column order (None: the answer's)

    @property
    def summary(self) -> str:
        return self.help.split("\n", 1)[0]

    def ask(self, con, values: dict):
        """The answer to this question for `values` (option name → value; missing: its default)."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(values) - set(known))
        if unknown:
            from spectraldb.errors import QueryError

            raise QueryError(f"{self.name}: unknown option {unknown[0]!r} (expected one of: {', '.join(known)})")
        values = {name: values.get(name, o.default) for name, o in known.items()}
        selection = Selection(**{o.field: values[o.name] for o in self.options if o.field})
        own = {o.name: values[o.name] for o in self.options if not o.field}
        return self.answer(con, selection, **own)


VERBS = (
    Verb("beta", queries.beta, """β of rank vs FFN width per group: β_hard, β_soft, Δ₁,₂, 95% t-intervals, R², widths.

With two or more seeds per width, points are seed means and a seed-bootstrap 95% interval
(beta_*_boot_low/high) is printed beside the t-interval. Groups with fewer than 3 widths get
no fit; fits on exactly 3 are flagged.

Examples:

  specdb query beta --stratum tail

  specdb query beta --by optimizer,n_head --metric renyi:3 --where "steps = 6000" --format json""",
         (sel("stratum"), sel("site"), sel("include_diverged"), sel("by"),
          Option("metric", str, None, "soft | hard | renyi:α | eee (default: hard and soft)"),
          sel("window"), sel("layer"), sel("step"), sel("where")),
         plot="scaling", section="beta_section"),
    Verb("dynamics", queries.dynamics, """β_hard and β_soft at every measured step, per optimizer (β over training).

Example: specdb query dynamics --stratum tail --format csv""", COMMON, plot="dynamics", section="dynamics_section"),
    Verb("trajectories", queries.trajectories, """Hard and soft rank at every measured step, per optimizer × training length × width (seed means).

The rank dynamics behind β over training.

Example: specdb query trajectories --where "optimizer = 'AdamW'" --format csv""", COMMON, plot="trajectories",
         section="trajectories_section"),
    Verb("depth", queries.depth, """β per layer, per optimizer (depth profile).

Example: specdb query depth --site pre""", COMMON, plot="depth", section="depth_section"),
    Verb("matched", queries.matched, """Pairs of groups with matched validation perplexity but divergent β.

"Matched loss does not imply matched geometry". Perplexity is compared width by width and as a
mean over the sweep.

Example: specdb query matched --stratum tail --ppl-tol 0.05""",
         (sel("stratum"), sel("site"), sel("include_diverged"), sel("by", help="Group factors (default: optimizer,steps)"),
          Option("metric", str, "hard", "soft | hard | renyi:α | eee"),
          Option("ppl_tol", float, 0.03, "Relative perplexity tolerance."),
          Option("min_dbeta", float, 0.1, "Smallest |Δβ| worth reporting."), sel("where")),
         section="matched_section"),
    Verb("delta", queries.delta, """Optimizer gain vs architecture shift of β, per stratum × metric × optimizer; prints "k of n".

A comparison passes when max_o β_o − β_baseline (at the reference architecture) exceeds
|β_o(variant) − β_o(reference)|.

Example: specdb query delta --arch n_head --baseline adamw --reference 12""",
         (Option("arch", str, "n_head", "Architecture factor: n_head, pos, norm, postln_frac, activation, n_layer, "
                                        "d_model, context"),
          Option("baseline", str, "adamw", "Baseline optimizer (label or name)."),
          Option("reference", str, None, "Reference architecture value (default: the one with most runs)."),
          sel("stratum", kind=list, default=None, help="Strata to compare (default: all four)"),
          sel("site"), sel("include_diverged"), sel("where")),
         section="architecture_section"),
    Verb("renyi", queries.renyi, """Rényi ranks R_α at pre and post and the reinjection ratio ρ_α = R_α(post)/R_α(pre) per optimizer.

Median over layers (ρ with its min and max over layers), α ∈ {0.5, 1, 1.5, 2, 3, 5, ∞}.

Example: specdb query renyi --ffn-mult 4 --stratum tail --where "steps = 1000"
""",
         (Option("ffn_mult", float, None, "The width to read (an ffn_mult of the sweep).", required=True),
          sel("step", help="Measured step (default: each run's final step)."),
          sel("stratum"), sel("include_diverged"), sel("where")),
         plot="renyi", section="renyi_section",
         columns=("optimizer", "alpha", "pre", "post", "rho", "rho_min", "rho_max", "js_divergence", "n_layers")),
)

BY_NAME = {v.name: v for v in VERBS}
PLOTS = {v.plot: v for v in VERBS if v.plot}

