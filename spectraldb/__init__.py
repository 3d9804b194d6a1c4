"""specdb: declarative experiment database for optimizer-induced spectral scaling.

This package must import without torch or ray (workers/ holds everything that trains).
In a notebook: `spectraldb.open("specdb.duckdb").beta(strata="tail").to_arrow()` (spectraldb.reader).
"""

__version__ = "0.1.0"


def open(path, time_limit_s: float | None = None):  # noqa: A001 - the notebook's one entry point
    """The store at `path`, read-only, as a `spectraldb.reader.Reader`."""
    from spectraldb.reader import Reader

    return Reader(path, time_limit_s)
