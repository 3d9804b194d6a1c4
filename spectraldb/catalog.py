"""What a store holds, run by run: statuses, listings, one run, one spectrum (no fits here).

The CLI (`specdb status`), the service (/api/status, /api/runs, /api/runs/{id}, …/spectrum) and
the notebook API (spectraldb.open) read runs through these functions only.
"""

from __future__ import annotations


from contract.vocabulary import FACTORS, FINISHED
from spectraldb.answer import Answer
from spectraldb.errors import QueryError
from spectraldb.predicates import check_site, check_strata, check_where
from spectraldb.values import selected_statuses

RUN_COLUMNS = ("run_id", "optimizer", "optimizer_name", "ffn_mult", "ffn_width", "d_model", "n_layer", "n_head",
               "seed", "steps", "status", "final_val_ppl AS val_ppl", "protocol", "duration_s")
SIZES = """WITH size AS (SELECT run_id, count(*) AS spectra,
                                sum(coalesce(len(eigenvalues), 0)) * 8 / 1048576.0 AS eig_mib
                         FROM spectra GROUP BY run_id)"""


def _dicts(cur) -> list[dict]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def _answer(cur) -> Answer:
    cols = [d[0] for d in cur.description]
    return Answer([dict(zip(cols, r)) for r in cur.fetchall()], fields=cols)


def statuses(con) -> dict[str, str]:
    """run_id → status of every run."""
    return dict(con.execute("SELECT run_id, status FROM runs").fetchall())


def status_counts(con) -> dict[str, int]:
    """status → number of runs."""
    return dict(con.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())


def status_summary(con) -> Answer:
    """One row per status: runs, their optimizers, the eigenvalues they hold (MiB) in all and per run."""
    return _answer((con.execute(SIZES + """ SELECT r.status, count(*) AS runs,
        string_agg(DISTINCT r.optimizer, ', ' ORDER BY r.optimizer) AS optimizers,
        coalesce(sum(s.eig_mib), 0) AS eigenvalue_mib, coalesce(avg(s.eig_mib), 0) AS mib_per_run
        FROM runs r LEFT JOIN size s USING (run_id) GROUP BY r.status ORDER BY r.status""")))


def run_sizes(con) -> Answer:
    """One row per run: its factors, status, perplexity, spectra and the MiB of eigenvalues it holds."""
    return _answer((con.execute(SIZES + """ SELECT r.run_id, r.optimizer, r.ffn_mult, r.seed, r.steps, r.status,
        r.protocol, r.final_val_ppl AS val_ppl, coalesce(s.spectra, 0) AS spectra, coalesce(s.eig_mib, 0) AS eigenvalue_mib
        FROM runs r LEFT JOIN size s USING (run_id) ORDER BY r.optimizer, r.ffn_mult, r.seed""")))


def unfinished(con) -> list[dict]:
    """Runs not done (failed or diverged), with their error (a traceback for failed runs) and the
    checkpoint a measured one came from (its width is unknown when it failed to load)."""
    return _dicts(con.execute("SELECT run_id, optimizer, ffn_mult, json_extract_string(config, '$.checkpoint') "
                              "AS checkpoint, status, error FROM runs WHERE status <> 'done' ORDER BY run_id"))


def protocols(con) -> dict[int, int]:
    """protocol → number of runs (runs from before protocols were stored count as protocol 1)."""
    return dict(con.execute("SELECT coalesce(protocol, 1), count(*) FROM runs GROUP BY ALL ORDER BY 1").fetchall())


def _filter(con, status, optimizer, where) -> tuple[str, list]:
    return (f"(? IS NULL OR status = ?) AND (? IS NULL OR optimizer = ?) AND {check_where(con, where)}",
            [status, status, optimizer, optimizer])


def list_runs(con, *, status: str | None = None, optimizer: str | None = None, where: str | None = None,
              limit: int = 100, offset: int = 0) -> Answer:
    """Runs with their factors and final perplexity, filtered and paged (ordered by optimizer, width, seed)."""
    clause, params = _filter(con, status, optimizer, where)
    return _answer((con.execute(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE {clause} "
                                     "ORDER BY optimizer, ffn_mult, seed, run_id LIMIT ? OFFSET ?",
                                     [*params, limit, offset])))


def count_runs(con, *, status: str | None = None, optimizer: str | None = None, where: str | None = None) -> int:
    clause, params = _filter(con, status, optimizer, where)
    return con.execute(f"SELECT count(*) FROM runs WHERE {clause}", params).fetchone()[0]


def trainability(con, factors, *, where: str | None = None) -> Answer:
    """Per architecture (`factors`: names from contract.vocabulary.ARCHITECTURE_FACTORS) × width ×
    optimizer: how many runs finished, how many diverged, and the mean final validation perplexity
    of those that did not (None when every one diverged)."""
    from contract.vocabulary import ARCHITECTURE_FACTORS

    unknown = [f for f in factors if f not in ARCHITECTURE_FACTORS]
    if unknown or not factors:
        raise ValueError(f"not architecture factors: {unknown or factors}")
    cols = ", ".join(factors)
    return _answer(con.execute(
        f"""SELECT {cols}, ffn_mult, optimizer, count(*) AS runs, count(*) FILTER (status = 'diverged') AS diverged,
                   avg(final_val_ppl) FILTER (status = 'done') AS val_ppl
            FROM runs WHERE status IN (SELECT unnest(?)) AND {check_where(con, where)}
            GROUP BY ALL ORDER BY ALL""", [list(FINISHED)]))


def has_run(con, run_id: str) -> bool:
    return con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0] > 0


def run(con, run_id: str) -> dict | None:
    """One run: its `runs` row, its evaluations and its ranks at every measured step (None: no such run)."""
    cur = con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
    row = cur.fetchone()
    if row is None:
        return None
    info = dict(zip([d[0] for d in cur.description], row))
    evals = _dicts(con.execute("SELECT step, train_loss, val_loss, val_ppl FROM evals WHERE run_id = ? ORDER BY step",
                               [run_id]))
    ranks = _dicts(con.execute("""SELECT step, layer, site, stratum, n_tokens, soft_rank, hard_rank FROM ranks
                                  WHERE run_id = ? ORDER BY step, layer, site, stratum""", [run_id]))
    return {"run": info, "evals": evals, "ranks": ranks}


def spectrum(con, run_id: str, *, step: int | None = None, layer: int = 0, site: str = "post",
             stratum: str = "all") -> dict | None:
    """The eigenvalues (descending) of one spectrum; `step` defaults to the run's last measured one.
    None when the run holds no such spectrum."""
    check_site(site)
    check_strata(stratum)
    found = _dicts(con.execute("""SELECT step, n_tokens, n_dim, skipped, min_eigenvalue, eigenvalues FROM spectra
                                  WHERE run_id = ? AND layer = ? AND site = ? AND stratum = ?
                                    AND step = coalesce(?, (SELECT max(step) FROM spectra WHERE run_id = ?))""",
                                [run_id, layer, site, stratum, step, run_id]))
    return found[0] if found else None


def optimizer_names(con) -> dict:
    """optimizer label → optimizer name (adamw, muon, …) of every stored run."""
    return dict(con.execute("SELECT DISTINCT optimizer, optimizer_name FROM runs").fetchall())


def factor_counts(con, factor: str, runs, include_diverged: bool = False) -> list[tuple]:
    """(value, runs) of one factor (a runs column from the vocabulary) among the selected runs,
    the most common first (ties: the smallest value); NULL values left out."""
    if factor not in FACTORS:
        raise QueryError(f"{factor!r} is not a factor of runs (expected one of: {', '.join(FACTORS)})")
    return con.execute(f"SELECT {factor}, count(*) FROM runs WHERE status IN (SELECT unnest(?)) AND "
                       f"{check_where(con, runs)} AND {factor} IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1",
                       [selected_statuses(include_diverged)]).fetchall()
