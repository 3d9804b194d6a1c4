"""What a question is asked of: one `Selection`, built once at each edge (CLI, HTTP, notebook).

Every verb takes `(con, selection, **its own options)`. A Selection checks its own fields when it
is made (one line naming the option, a QueryError); the predicate `where` is checked against the
store by each verb (spectraldb.predicates.check_where).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from contract.vocabulary import STRATA
from spectraldb.errors import QueryError
from spectraldb.predicates import RunFilter, check_factors, check_site, check_strata

LAYER_MODES = ("agg", "each")


def split(values) -> tuple[str, ...]:
    """Option values as the CLI and the HTTP API take them: repeated and/or comma separated."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    return tuple(x.strip() for part in values for x in str(part).split(",") if x.strip())


@dataclass(frozen=True)
class Selection:
    """Which runs and which measurements a question reads.

    strata: strata to read (None: the verb's default, `all`, or all four for delta);
    site: pre | post; where: a predicate on `runs`; include_diverged: keep diverged runs in fits;
    by: factors that group the fits (None: the verb's default); window: median over each run's last
    K measured steps (None: its measure.last_k); step: one measured step instead of the window;
    layer: agg (median over layers) | each (one value per layer); held: (factor, value) pairs every
    run must equal, bound as values (the report's baseline, delta's protocol).
    """
    strata: tuple[str, ...] | None = None
    site: str = "post"
    where: str | None = None
    include_diverged: bool = False
    by: tuple[str, ...] | None = None
    window: int | None = None
    step: int | None = None
    layer: str = "agg"
    held: tuple = ()  # (factor, value) pairs every run must equal (spectraldb.predicates.RunFilter)

    def __post_init__(self):
        if self.strata is not None and (isinstance(self.strata, str) or len(self.strata)) and not split(self.strata):
            # asked for, but blank (no stratum at all is an empty tuple or None: the verb's default)
            raise QueryError(f"--stratum: unknown stratum {self.strata!r} (expected one of: {', '.join(STRATA)})")
        strata = split(self.strata) or None
        object.__setattr__(self, "strata", tuple(check_strata(strata)) if strata else None)
        check_site(self.site)
        by = split(self.by) or None
        object.__setattr__(self, "by", check_factors(by, syntax_only=True) if by else None)
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise QueryError(f"--window: must be at least 1 measured step (got {self.window})")
        if self.step is not None and (isinstance(self.step, bool) or not isinstance(self.step, int)):
            raise QueryError(f"--step: must be a measured step, an integer (got {self.step!r})")
        if self.layer not in LAYER_MODES:
            raise QueryError(f"--layer: expected agg or each, got {self.layer!r}")
        if self.where is not None and not isinstance(self.where, str):
            raise QueryError("--where: must be text")
        if self.where is not None and not self.where.strip():
            object.__setattr__(self, "where", None)

    @property
    def runs(self) -> RunFilter:
        """The runs this selection reads, as every verb filters them (`where` and `held`)."""
        return RunFilter(self.where, tuple(self.held))

    @property
    def stratum(self) -> str:
        """The one stratum of a single-stratum question (its first; `all` by default)."""
        return self.strata[0] if self.strata else "all"

    def group_by(self, default: tuple[str, ...] = ("optimizer",)) -> tuple[str, ...]:
        return self.by or default

    def strata_or(self, default: tuple[str, ...] = STRATA) -> tuple[str, ...]:
        return self.strata or default

    def but(self, **changes) -> "Selection":
        return replace(self, **changes)
