"""A run's point, defined once in SQL (docs/design.md §1, "Window and point").

`point_ctes` builds two common table expressions over `ranks k JOIN sel USING (run_id)` (the
caller supplies `sel`, the runs to read, with their `last_k`):

  per_layer  the median of each metric column over a series' window, per run × stratum (× site)
             × layer (× step), with the fewest tokens behind it;
  per_run    the median of that over layers, with the number of layers.

The store writes `run_points` with it (the default window: each series' last `last_k` values,
ranks.from_end ≤ runs.last_k) and `step_points` (one window per measured step, which `query
dynamics` reads), and `query --window/--step/--layer` ask it other windows. The `layer_points` view (a migration, so frozen SQL) is compared with it by a test.
"""

from __future__ import annotations

from spectraldb.predicates import METRICS

DEFAULT_WINDOW = "k.from_end <= sel.last_k"


def point_ctes(columns: list[str], *, filters: str = "TRUE", window: str = DEFAULT_WINDOW,
               by_site: bool = False, by_layer: bool = False, by_step: bool = False) -> str:
    """`per_layer AS (…), per_run AS (…)`; metric i is column m{i} in both."""
    series = ["run_id", "stratum"] + (["site"] if by_site else [])
    group = series + ["layer"] + (["step"] if by_step else [])
    keys = series + (["layer"] if by_layer else []) + (["step"] if by_step else [])
    return f"""
        per_layer AS (
            SELECT {", ".join(f"k.{g}" for g in group)},
                   {", ".join(f"median(k.{c}) AS m{i}" for i, c in enumerate(columns))},
                   min(k.n_tokens) AS n_tokens
            FROM ranks k JOIN sel USING (run_id)
            WHERE ({filters}) AND ({window})
            GROUP BY {", ".join(group)}),
        per_run AS (
            SELECT {", ".join(keys)}, {", ".join(f"median(m{i}) AS m{i}" for i in range(len(columns)))},
                   min(n_tokens) AS n_tokens, count(*) AS n_layers
            FROM per_layer GROUP BY {", ".join(keys)})"""


# Every metric of one run, as stored with it: run_points (run_id, site, stratum, metric, value,
# n_layers, n_tokens). One parameter: the run id.
RUN_POINTS_SQL = f"""
    INSERT INTO run_points
    WITH sel AS (SELECT run_id, last_k FROM runs WHERE list_contains(?::VARCHAR[], run_id)),
    {point_ctes(list(METRICS.values()), by_site=True)}
    SELECT run_id, site, stratum, metric, value, n_layers, n_tokens
    FROM (UNPIVOT per_run ON {", ".join(f'm{i} AS "{name}"' for i, name in enumerate(METRICS))}
          INTO NAME metric VALUE value)"""


# Every metric of one run at every measured step (the window is the step itself): step_points.
RUN_STEP_POINTS_SQL = f"""
    INSERT INTO step_points
    WITH sel AS (SELECT run_id, last_k FROM runs WHERE list_contains(?::VARCHAR[], run_id)),
    {point_ctes(list(METRICS.values()), window="TRUE", by_site=True, by_step=True)}
    SELECT run_id, site, stratum, metric, step, value, n_layers, n_tokens
    FROM (UNPIVOT per_run ON {", ".join(f'm{i} AS "{name}"' for i, name in enumerate(METRICS))}
          INTO NAME metric VALUE value)"""
