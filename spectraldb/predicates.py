"""What a user may ask for, checked before any SQL runs: metrics, strata, sites, factors and the
`--where` predicate (docs/design.md §5, "Reads"). Errors are SpecErrors in the CLI's words, so a
library caller and a CLI user read the same message.
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from dataclasses import dataclass

import duckdb

from spectraldb.errors import QueryError
from contract.vocabulary import FACTORS, METRICS, SITES, STRATA

# every column of runs (a declared factor never shadows one; spectraldb.spec.tracked refuses it)
RUN_COLUMNS = {"run_id", "status", "error", "config", "source", "ffn_width", "factors", "tokens_seen", "gated",
               "strata_scope", "site_definition", "started_at", "finished_at", "last_k", "final_val_ppl",
               "final_val_loss", "git_commit", "versions", "host", "device", "duration_s", "keep_eigenvalues"}


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise QueryError(f"--metric: unknown metric {metric!r} (expected one of: {', '.join(METRICS)})")
    return METRICS[metric]


def check_strata(strata) -> list[str]:
    strata = [strata] if isinstance(strata, str) else list(strata)
    for st in strata:
        if st not in STRATA:
            raise QueryError(f"--stratum: unknown stratum {st!r} (expected one of: {', '.join(STRATA)})")
    return strata


def check_site(site: str) -> str:
    if site not in SITES:
        raise QueryError(f"--site: unknown site {site!r} (expected pre or post)")
    return site


def check_factors(names, declared=(), syntax_only: bool = False) -> tuple[str, ...]:
    """Factor names to group by: the built-in ones (FACTORS) and those tracked runs declared in
    this store (`declared`). With `syntax_only` (no store at hand yet) any well-formed name passes;
    the verb checks it against the store."""
    names = tuple(n.strip() for part in names for n in part.split(",") if n.strip())
    for n in names:
        if n in FACTORS or n in declared or (syntax_only and FACTOR_NAME.fullmatch(n)):
            continue
        known = ", ".join((*FACTORS, *sorted(declared)))
        raise QueryError(f"--by: unknown factor {n!r} (expected one of: {known})")
    return names or ("optimizer",)


FACTOR_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
MAX_FACTORS = 64  # declared factors a run may have (spectraldb.spec.tracked) and a store is read for


def declared_factors(con) -> dict[str, str]:
    """name → SQL type of every factor the store's tracked runs declared (`runs.factors`): DOUBLE
    where every value is a number, BOOLEAN where every value is one, VARCHAR otherwise."""
    rows = con.execute("""SELECT k, list(DISTINCT json_type(factors -> k))
                          FROM (SELECT factors, unnest(json_keys(factors)) AS k FROM runs WHERE factors IS NOT NULL)
                          GROUP BY k""").fetchall()
    out = {}
    for name, types in sorted(rows):
        if not FACTOR_NAME.fullmatch(name) or name in FACTORS or name in RUN_COLUMNS or len(out) == MAX_FACTORS:
            continue  # a hand-edited store: such a key (or one past the bound) is never read
        kinds = set(types)
        out[name] = ("DOUBLE" if kinds <= {"BIGINT", "UBIGINT", "DOUBLE"} else
                     "BOOLEAN" if kinds == {"BOOLEAN"} else "VARCHAR")
    return out


def runs_relation(con, declared: dict[str, str] | None = None) -> str:
    """`runs` with a typed column per declared factor (`declared`: declared_factors(con), read
    here when not given), so predicates and groupings read them like built-in columns (the names
    are checked identifiers, the values come through TRY_CAST)."""
    extras = declared_factors(con) if declared is None else declared
    if not extras:
        return "runs"
    cols = ", ".join(f"TRY_CAST(factors ->> '{k}' AS {t}) AS {k}" for k, t in sorted(extras.items()))
    return f"(SELECT *, {cols} FROM runs)"


MAX_WHERE = 4096
WHERE_HELP = 'one predicate on the runs table, e.g. "n_head = 12 AND seed < 3"'


@dataclass(frozen=True)
class RunFilter:
    """Which runs a question reads: the user's predicate `where` (checked once per connection) and
    `held`, (factor, value) pairs each run must equal — the report's baseline, delta's protocol.
    A held value never enters SQL text: it is bound to a session variable and read back with
    getvariable(), so the fragment stays parameter-free wherever a verb places it."""
    where: str | None = None
    held: tuple = ()

    def sql(self, con) -> str:
        parts = [check_where(con, self.where)]
        if self.held:
            relation = runs_relation(con)
            declared = declared_factors(con)
            for name, _ in self.held:
                if name not in FACTORS and name not in declared:
                    raise QueryError(f"held: unknown factor {name!r} (expected one of: "
                                     f"{', '.join((*FACTORS, *sorted(declared)))})")
            for name, value in self.held:
                key = hashlib.sha1(repr((type(value).__name__, value)).encode()).hexdigest()[:16]
                variable = f"specdb_held_{name}_{key}"  # a checked identifier and a hash: nothing of the value
                con.execute(f"SET VARIABLE {variable} = ?", [value])
                parts.append(f"run_id IN (SELECT run_id FROM {relation} runs "
                             f"WHERE {name} IS NOT DISTINCT FROM getvariable('{variable}'))")
        return " AND ".join(parts)


# read-only connection → {predicate: its checked fragment}: a question (or a report of many)
# checks each predicate once; a writer's runs may change under it, so it checks every time
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def check_where(con, where) -> str:
    """`_check_where`, once per predicate per read-only connection (a RunFilter: its fragment)."""
    if isinstance(where, RunFilter):
        return where.sql(con)
    if where is None or not where.strip():
        return "TRUE"
    memo = _CHECKED.get(con)
    if memo is None:
        read_only = con.execute("SELECT current_setting('access_mode')").fetchone()[0] == "read_only"
        memo = _CHECKED[con] = {} if read_only else None
    if memo is None:
        return _check_where(con, where)
    if where not in memo:
        memo[where] = _check_where(con, where)
    return memo[where]


def _check_where(con, where: str) -> str:
    """A user predicate on `runs`, as a fragment that selects run ids and nothing else.

    DuckDB's own parser (json_serialize_sql) must see exactly `SELECT run_id FROM runs WHERE
    <one expression>`: no set operation, CTE, GROUP BY, LIMIT, subquery, or column of another
    table, so a `)` in the predicate cannot reach the surrounding query. The predicate is then
    bound inside its own subquery; the connection itself cannot read files (store.connect)."""
    if where is None or not where.strip():
        return "TRUE"
    if len(where) > MAX_WHERE or "\x00" in where:
        raise QueryError(f"--where: longer than {MAX_WHERE} characters or holds a NUL byte; {WHERE_HELP}")
    sql = f"SELECT run_id FROM runs WHERE ({where})"
    try:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
        # unparenthesised too: "TRUE) OR (TRUE" parses inside parentheses, never without them,
        # so a predicate that passes is one balanced expression wherever a verb places it
        bare = json.loads(con.execute("SELECT json_serialize_sql(?)", [f"SELECT run_id FROM runs WHERE {where}"]
                                      ).fetchone()[0])
    except duckdb.InterruptException:
        raise  # the read's time limit (spectraldb.bounds), not the predicate's form
    except Exception:  # noqa: BLE001 - parser failures of every kind are the user's predicate
        raise QueryError(f"--where: not a predicate DuckDB can parse; {WHERE_HELP}") from None
    if not tree.get("error") and bare.get("error"):
        raise QueryError(f"--where: must be {WHERE_HELP} (its parentheses must balance)")
    if tree.get("error"):
        raise QueryError(f"--where: not a valid predicate ({str(tree.get('error_message', '')).splitlines()[0][:160]})")
    stmts = tree.get("statements", [])
    node = stmts[0].get("node", {}) if len(stmts) == 1 else {}
    frm = node.get("from_table") or {}
    if (node.get("type") != "SELECT_NODE" or node.get("modifiers") or node.get("cte_map", {}).get("map")
            or node.get("group_expressions") or node.get("having") or node.get("qualify")
            or node.get("sample") or len(node.get("select_list", [])) != 1
            or frm.get("type") != "BASE_TABLE" or frm.get("table_name") != "runs"):
        raise QueryError(f"--where: must be {WHERE_HELP}")
    for part in _walk(node.get("where_clause")):
        if part.get("class") == "SUBQUERY":
            raise QueryError("--where: subqueries are not allowed; use columns of runs only")
        names = part.get("column_names") if part.get("class") == "COLUMN_REF" else None
        if names and (len(names) > 2 or (len(names) == 2 and names[0].lower() != "runs")):
            raise QueryError(f"--where: {'.'.join(names)}: only columns of the runs table may be used")
    relation = runs_relation(con)
    bound = f"SELECT run_id FROM {relation} runs WHERE ({where})"
    try:
        con.execute(f"EXPLAIN {bound}")
    except duckdb.InterruptException:
        raise
    except Exception as exc:  # noqa: BLE001 - binder errors name the column, never a value
        raise QueryError(f"--where: {str(exc).splitlines()[0][:200]}") from None
    return f"run_id IN ({bound})"


def _walk(obj):
    """Every dict inside a parsed SQL tree."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            yield x
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
