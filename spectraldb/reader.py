"""The notebook API: one object that answers the study's questions from a store.

    import spectraldb
    db = spectraldb.open("specdb.duckdb")
    tail = db.beta(strata="tail").to_arrow()        # β per optimizer, a pyarrow Table
    db.beta(strata="tail", by="optimizer,n_head").to_pandas()

Every call opens the store read-only for as long as it runs (so a sweep can commit between
calls) and passes a `Selection` (spectraldb.selection) to the same function the CLI and the
service call; answers carry `.rows`, `.notes`, `.groups` (the fits: `PowerLaw` with intercept)
and `.to_arrow()` / `.to_pandas()`.
"""

from __future__ import annotations

from pathlib import Path

from spectraldb import catalog, queries
from spectraldb.answer import Answer
from spectraldb.bounds import CLI_TIME_S, ReadLimits
from spectraldb.errors import StoreError
from spectraldb.selection import Selection
from spectraldb.store import connect

SELECTION_FIELDS = ("strata", "site", "where", "include_diverged", "by", "window", "step", "layer")


class Reader:
    """A store, read-only. Selection fields (strata, site, where, include_diverged, by, window,
    step, layer) are keyword arguments of every question; the rest are the question's own."""

    def __init__(self, path: str | Path, time_limit_s: float | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"{self.path}: no such store (run `specdb run SPEC` first)")
        self.time_limit_s = time_limit_s if time_limit_s is not None else ReadLimits.from_env(CLI_TIME_S).time_s

    def __repr__(self) -> str:
        return f"Reader({str(self.path)!r})"

    def _connect(self):
        return connect(self.path, read_only=True, time_limit_s=self.time_limit_s)

    def _ask(self, verb, kw: dict) -> Answer:
        sel = Selection(**{k: kw.pop(k) for k in SELECTION_FIELDS if k in kw})
        with self._connect() as con:
            return verb(con, sel, **kw)

    def beta(self, **kw) -> Answer:
        """β of rank vs FFN width per group (`specdb query beta`); `metric=` picks one metric."""
        return self._ask(queries.beta, kw)

    def dynamics(self, **kw) -> Answer:
        """β at every measured step (`specdb query dynamics`)."""
        return self._ask(queries.dynamics, kw)

    def depth(self, **kw) -> Answer:
        """β per layer (`specdb query depth`)."""
        return self._ask(queries.depth, kw)

    def matched(self, **kw) -> Answer:
        """Matched perplexity, divergent β (`specdb query matched`): metric, ppl_tol, min_dbeta."""
        return self._ask(queries.matched, kw)

    def delta(self, **kw) -> Answer:
        """Optimizer gain against architecture shift (`specdb query delta`): arch, baseline, reference."""
        return self._ask(queries.delta, kw)

    def renyi(self, ffn_mult: float, **kw) -> Answer:
        """R_α and ρ_α at one width (`specdb query renyi`)."""
        return self._ask(queries.renyi, {**kw, "ffn_mult": ffn_mult})

    def status(self) -> Answer:
        """Runs by status with the eigenvalue MiB they hold (`specdb status`)."""
        with self._connect() as con:
            return catalog.status_summary(con)

    def runs(self, *, status: str | None = None, optimizer: str | None = None, where: str | None = None,
             limit: int = 100_000, offset: int = 0) -> Answer:
        """Runs with their factors and final perplexity (`GET /api/runs`)."""
        with self._connect() as con:
            return catalog.list_runs(con, status=status, optimizer=optimizer, where=where, limit=limit, offset=offset)

    def run(self, run_id: str) -> dict | None:
        """One run: its row, evaluations and ranks (None: no such run)."""
        with self._connect() as con:
            return catalog.run(con, run_id)

    def spectrum(self, run_id: str, **kw) -> dict | None:
        """One spectrum's eigenvalues (step, layer, site, stratum; the last measured step by default)."""
        with self._connect() as con:
            return catalog.spectrum(con, run_id, **kw)

    def sql(self, text: str):
        """One read-only query (SELECT, or EXPLAIN of one) as a pyarrow Table."""
        from spectraldb.sqlshell import check_statement

        with self._connect() as con:
            check_statement(con, text)
            return con.sql(text).to_arrow_table()
