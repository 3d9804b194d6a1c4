"""`specdb export`: every table and view of the store as parquet or csv files."""

from __future__ import annotations

from pathlib import Path

from spectraldb.store.opening import connect

EXPORTED = ("runs", "evals", "spectra", "ranks", "reinjection", "run_points", "step_points", "rank_metrics", "layer_points",
            "points", "betas")


def export_all(path: str | Path, directory: Path, fmt: str) -> list[tuple[str, int]]:
    """Copy every table and view to DIR/<name>.<fmt>; returns (name, rows) per file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    options = "(FORMAT parquet)" if fmt == "parquet" else "(FORMAT csv, HEADER)"
    out = []
    with connect(path, read_only=True, external_access=True) as con:  # COPY … TO writes files
        for name in EXPORTED:
            target = str(directory / f"{name}.{fmt}").replace("'", "''")
            con.execute(f"COPY (SELECT * FROM {name}) TO '{target}' {options}")
            out.append((name, con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]))
    return out
