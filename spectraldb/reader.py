"""The notebook API: one object that answers the study's questions from a store.

    import spectraldb
    db = spectraldb.open("specdb.duckdb")
    tail = db.beta(strata="tail").to_arrow()        # β per optimizer, a pyarrow Table
    db.beta(strata="tail", by="optimizer,n_head").to_pandas()

Every call opens the store read-only for as long as it runs (so a sweep can commit between
calls; `with db:` holds one connection for many) and asks the declared question
(spectraldb.verbs) exactly as the CLI and the service do — they read through this object too;
answers carry `.rows`, `.notes`, `.groups` (the fits: `PowerLaw` with intercept) and
`.to_arrow()` / `.to_pandas()`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from spectraldb import catalog
from spectraldb.answer import Answer
from spectraldb.bounds import CLI_TIME_S, Deadline, ReadLimits
from spectraldb.errors import QueryError, StoreError
from spectraldb.plots import scaling_series
from spectraldb.store import connect
from spectraldb.verbs import BY_NAME, PLOTS, VERBS


class Reader:
    """A store, read-only: the one object every edge reads through (the notebook, `specdb query`,
    the service's routes, `specdb plot`, `report`, `sql` and `status`, and the driver's look at
    what is stored). One method per question declared in spectraldb/verbs.py (`beta`,
    `dynamics`, `trajectories`, `depth`, `matched`, `delta`, `renyi`), each taking that question's
    options as keywords (`stratum`, or the Selection's name `strata`; `site`, `where`, `by`, …),
    a required one also by position (`renyi(4)`). Each call opens the store for as long as it
    runs; inside `with reader:` one connection serves every call (a predicate is then checked once
    for all of them)."""

    def __init__(self, path: str | Path, time_limit_s: float | None = None, *, check: bool = True,
                 verify: bool = False, wait_s: float | None = None):
        """`verify`: also check the file holds every block its tables use (a truncated store is not
        "all done"); `wait_s`: how long to wait while a commit holds the store (0: refuse at once)."""
        self.path = Path(path)
        if check and not self.path.is_file():
            raise StoreError(f"{self.path}: no such store (run `specdb run SPEC` first)")
        self.time_limit_s = time_limit_s if time_limit_s is not None else ReadLimits.from_env(CLI_TIME_S).time_s
        self._options = {"verify": verify, **({"wait_s": wait_s} if wait_s is not None else {})}
        self._held = None

    def __repr__(self) -> str:
        return f"Reader({str(self.path)!r})"

    def __enter__(self) -> "Reader":
        self._stack = contextlib.ExitStack()
        self._held = self._stack.enter_context(self._open())
        return self

    def __exit__(self, *exc) -> None:
        self._held = None
        self._stack.close()

    def _open(self):
        return connect(self.path, read_only=True, time_limit_s=self.time_limit_s, **self._options)

    def _connect(self):
        return contextlib.nullcontext(self._held) if self._held is not None else self._open()

    def ask(self, verb, values: dict) -> Answer:
        """The answer to one declared question (a `Verb` or its name) for `values` (its options by
        name; missing ones take their defaults): what every edge calls."""
        if isinstance(verb, str):
            if verb not in BY_NAME:
                raise QueryError(f"{verb!r} is not a question (expected one of: {', '.join(BY_NAME)})")
            verb = BY_NAME[verb]
        with self._connect() as con:
            return verb.ask(con, values)

    def status(self) -> Answer:
        """Runs by status with the eigenvalue MiB they hold (`specdb status`)."""
        with self._connect() as con:
            return catalog.status_summary(con)

    def status_counts(self) -> dict[str, int]:
        """status → number of runs (`GET /api/status`)."""
        with self._connect() as con:
            return catalog.status_counts(con)

    def statuses(self) -> dict[str, str]:
        """run_id → status of every run (what the driver skips or resumes)."""
        with self._connect() as con:
            return catalog.statuses(con)

    def run_sizes(self) -> Answer:
        """Each run with the MiB of eigenvalues it holds (`specdb status --runs`)."""
        with self._connect() as con:
            return catalog.run_sizes(con)

    def unfinished(self) -> list[dict]:
        """Runs that started and did not finish, with their last error line (`specdb status`)."""
        with self._connect() as con:
            return catalog.unfinished(con)

    def protocols(self) -> dict[int, int]:
        """measurement protocol → number of runs measured under it."""
        with self._connect() as con:
            return catalog.protocols(con)

    def runs(self, *, status: str | None = None, optimizer: str | None = None, where: str | None = None,
             limit: int = 100_000, offset: int = 0) -> Answer:
        """Runs with their factors and final perplexity (`GET /api/runs`)."""
        with self._connect() as con:
            return catalog.list_runs(con, status=status, optimizer=optimizer, where=where, limit=limit, offset=offset)

    def count_runs(self, *, status: str | None = None, optimizer: str | None = None, where: str | None = None) -> int:
        """How many runs `runs` would list without its paging (`GET /api/runs`' total)."""
        with self._connect() as con:
            return catalog.count_runs(con, status=status, optimizer=optimizer, where=where)

    def has_run(self, run_id: str) -> bool:
        with self._connect() as con:
            return catalog.has_run(con, run_id)

    def scaling(self, selection) -> tuple[dict, list[str]]:
        """The main figure as data (`specdb plot scaling`, `GET /api/scaling`): per group, the
        seed-mean points, β with its interval, the fitted line with its 95% band; and the notes."""
        with self._connect() as con:
            return scaling_series(con, selection)

    def run(self, run_id: str) -> dict | None:
        """One run: its row, evaluations and ranks (None: no such run)."""
        with self._connect() as con:
            return catalog.run(con, run_id)

    def spectrum(self, run_id: str, **kw) -> dict | None:
        """One spectrum's eigenvalues (step, layer, site, stratum; the last measured step by default)."""
        with self._connect() as con:
            return catalog.spectrum(con, run_id, **kw)

    def figure(self, kind: str, selection, **options):
        """One of the study's figures (a matplotlib Figure; `specdb plot KIND`): a declared
        question's plot (spectraldb.verbs.PLOTS) or `scaling`; `options`: the figure's own, such as
        renyi's `ffn_mult`."""
        from spectraldb import plots

        if kind not in PLOTS:
            raise QueryError(f"plot: unknown figure {kind!r} (expected one of: {', '.join(PLOTS)})")
        with self._connect() as con:
            return getattr(plots, kind)(con, selection, **options)

    def report(self, selection, progress=None):
        """The study assembled (`specdb report`): a `spectraldb.report.Report` to render;
        `progress(done, total, title)` hears of each section as it is built."""
        from spectraldb import report

        with self._connect() as con:
            return report.build(con, selection, store=str(self.path), progress=progress)

    def sql(self, text: str):
        """One read-only query (SELECT, or EXPLAIN of one) as a pyarrow Table."""
        from spectraldb.sqlshell import check_statement

        with self._connect() as con:
            check_statement(con, text)
            return con.sql(text).to_arrow_table()

    def stream_sql(self, text: str, consume) -> None:
        """One read-only query handed to `consume(columns, rows)` as it streams (`specdb sql`,
        `POST /api/sql`); `consume` must finish with the rows before this returns. Python's side
        of the time limit runs beside the connection's own."""
        from spectraldb.sqlshell import stream

        with self._connect() as con:
            consume(*stream(con, text, Deadline(self.time_limit_s)))


def stored_statuses(path: str | Path) -> dict[str, str]:
    """run_id → status of every run in the store at `path` ({} while there is none): what the
    driver skips or resumes. The file is verified whole: a truncated store is not "all done"."""
    if not Path(path).exists():
        return {}
    return Reader(path, check=False, verify=True).statuses()


def _question(verb):
    """The Reader method of one declared question."""
    fields = {o.field: o.name for o in verb.options if o.field}
    required = [o.name for o in verb.options if o.required]

    def ask(self, *args, **kw) -> Answer:
        if len(args) > len(required):
            raise TypeError(f"{verb.name}() takes {len(required)} positional argument(s): {', '.join(required) or 'none'}")
        values = {**dict(zip(required, args)), **{fields.get(k, k): v for k, v in kw.items()}}
        missing = [name for name in required if values.get(name) is None]
        if missing:
            raise TypeError(f"{verb.name}() needs {missing[0]}=")
        return self.ask(verb, values)

    ask.__name__ = ask.__qualname__ = verb.name
    ask.__doc__ = f"{verb.help}\n\n(`specdb query {verb.name}`; options: {', '.join(o.name for o in verb.options)})"
    return ask


for _verb in VERBS:
    setattr(Reader, _verb.name, _question(_verb))
